"""Quantized graphs on the `tvm` target: Q/DQ patterns to integer code, Relax converters for them.

TVM 0.27's `from_exported_program` converts no `quantized_decomposed` op. Before export the graph
is rewritten in a copy (`rewrite_int8`), then the importer gets converters for what is left
(`convert_map`):

- dq(x) → conv2d / linear(·, dq(W)) [+ bias] → `edge::int8_conv2d` / `edge::int8_linear` (the
  reference target's rewrite: weight codes quantized once, per-channel symmetric). In Relax, dense
  convs with 7-bit weights and whole channel blocks are TVM's own int8 code (`int8_conv`: u8·s8 dot
  products in blocked channels, quantize and dequantize fused); the other convs (depthwise, odd
  channel counts) and the linears are `R.call_dps_packed` calls of our C++ kernels (u8 activations
  quantized in the kernel as torch rounds, int32 accumulation, per-channel requantisation and bias
  fused). Everything around them stays TVM's, fused and tuned.
- dq(a) → matmul / bmm ← dq(b), both activations (attention) → `edgepasses_tvm::int8_matmul`, in
  Relax an integer matmul of (code − zero point) in int16 with int32 accumulation, times sa·sb.
- Remaining quantize/dequantize (around add, pooling, ...) → Relax elementwise ops with torch's
  semantics: float32 x·(1/scale), round half to even, + zero point, clamp, cast.

A conv/linear/matmul that reads a dequantized tensor but matches none of these runs as float
fake-quant in TVM (same numbers as the fake-quant graph, no integer speed-up); `report_float_ops`
says so once, and strict mode raises.
"""
from __future__ import annotations

import collections
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch import Tensor

from edgepasses.errors import UnsupportedOpError
from edgepasses.graph_utils import remove_unused_attributes, replace_with_call
from edgepasses.quant import patterns
from edgepasses.quant.patterns import DEQUANTIZE_OPS, QDQPattern

from ..reference.int8 import lower_kernel_patterns, why_no_kernel
from . import int8_conv

log = logging.getLogger("edgepasses")

CONV2D_KERNEL = "edgepasses.tvm.int8_conv2d"   # tvm_ffi global functions Relax calls
LINEAR_KERNEL = "edgepasses.tvm.int8_linear"


# ---- the activation × activation matmul, as an op the importer keeps whole -----------------------

@torch.library.custom_op("edgepasses_tvm::int8_matmul", mutates_args=())
def int8_matmul(a: Tensor, b: Tensor, a_scale: float, a_zero_point: int, b_scale: float,
                b_zero_point: int) -> Tensor:
    """matmul(dq(q(a)), dq(q(b))) with u8 codes (static per-tensor scale, zero point in [0, 255]):
    the fake-quant graph's computation, which the tvm target runs in integers."""
    def fake_quant(x, scale, zero_point):
        q = patterns.QUANTIZE_PER_TENSOR(x, scale, zero_point, 0, 255, torch.uint8)
        return patterns.DEQUANTIZE_PER_TENSOR(q, scale, zero_point, 0, 255, torch.uint8)

    return torch.matmul(fake_quant(a, a_scale, a_zero_point), fake_quant(b, b_scale, b_zero_point))


@int8_matmul.register_fake
def _(a, b, a_scale, a_zero_point, b_scale, b_zero_point):
    return torch.matmul(a, b)


# ---- the FX rewrite (before export) ------------------------------------------------------------

@dataclass
class Int8Graph:
    gm: torch.fx.GraphModule               # a rewritten copy; the caller's graph is untouched
    int8_ops: int                          # conv/linear/matmul that run in integers
    float_ops: dict[torch.fx.Node, str]    # quantized ones that run as float fake-quant, and why


def _rewrite_matmul(gm: torch.fx.GraphModule, pattern: QDQPattern) -> None:
    """A matched matmul/bmm of two quantized activations → int8_matmul."""
    node, a, b = pattern.node, pattern.activation, pattern.other
    args = (a.float_input(gm, before=node), b.float_input(gm, before=node), a.scale, a.uint8_zero_point, b.scale,
            b.uint8_zero_point)
    replace_with_call(gm, node, torch.ops.edgepasses_tvm.int8_matmul.default, args)


def _why_float(pattern: QDQPattern) -> str:
    if pattern.is_matmul:
        return f"an input is not a quantized activation ({pattern.mismatch})"
    return why_no_kernel(pattern)


def rewrite_int8(gm: torch.fx.GraphModule) -> Int8Graph:
    """Quantized conv2d/linear → edge:: kernel ops, quantized activation matmuls → int8_matmul, in a copy."""
    if not any(n.target in DEQUANTIZE_OPS for n in gm.graph.nodes):  # a float graph stays as it is (and
        return Int8Graph(gm, 0, {})                                    # keeps its tuning records' key)
    lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # new attribute owners, same tensors
    # Activation matmuls stay for `int8_matmul`: Relax runs them as integer matmuls of its own.
    int8_ops, left = lower_kernel_patterns(lowered, matmuls=False)
    float_ops = {}
    for pattern in left:
        if pattern.is_matmul and pattern.mismatch is None:
            _rewrite_matmul(lowered, pattern)
            int8_ops += 1
        else:
            float_ops[pattern.node] = _why_float(pattern)
    lowered.graph.eliminate_dead_code()
    remove_unused_attributes(lowered)
    lowered.recompile()
    return Int8Graph(lowered, int8_ops, float_ops)


def report_float_ops(target: str, float_ops: dict[torch.fx.Node, str], *, strict: bool) -> None:
    """One WARNING (strict: an error) naming the quantized ops that run as float fake-quant."""
    if not float_ops:
        return
    from edgepasses.canonical import user_source

    listing = "\n".join(f"  - {n.target} (node {n.name}, {user_source(n)}): {why}" for n, why in float_ops.items())
    message = (f"target {target!r} has no integer converter for {len(float_ops)} quantized op(s); they run as "
               f"float fake-quant (quantize-dequantize, float op) in TVM:\n{listing}")
    if strict:
        raise UnsupportedOpError(message + "\nstrict=True forbids it: quantize these layers in a form listed in "
                                 "edgepasses.backends.tvm.quant, or keep them float (quantize(ignore=...)).")
    log.warning(message)


# ---- Relax converters (the importer's custom_convert_map) ---------------------------------------

def _relax():
    from tvm import relax

    return relax


def _value(importer, arg):
    """The Relax expression of an FX argument (None: an empty float tensor, the kernels' "no bias")."""
    import numpy as np

    return importer.env[arg] if isinstance(arg, torch.fx.Node) else _relax().const(np.zeros(0, "float32"))


def _f32(value: float):
    return _relax().const(value, "float32")


def _codes(x, scale: float, zero_point: int, qmin: int, qmax: int):
    """torch's quantize in float32: round(x · float32(1/scale)) + zero point, clamped (not yet cast)."""
    op = _relax().op
    # torch multiplies by the Python double 1/scale cast to float32; Relax's round is half to even.
    q = op.add(op.round(op.multiply(x, _f32(1.0 / scale))), _f32(float(zero_point)))
    return op.minimum(op.maximum(q, _f32(float(qmin))), _f32(float(qmax)))


def _dtype(torch_dtype: torch.dtype) -> str:
    return str(torch_dtype).removeprefix("torch.")


def _quantize_per_tensor(node, importer):
    x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
    codes = _codes(importer.env[x], float(scale), int(zero_point), qmin, qmax)
    return importer.block_builder.emit(_relax().op.astype(codes, _dtype(dtype)))


def _dequantize_per_tensor(node, importer):
    q, scale, zero_point = node.args[:3]
    op = _relax().op
    value = op.subtract(op.astype(importer.env[q], "float32"), _f32(float(zero_point)))
    return importer.block_builder.emit(op.multiply(value, _f32(float(scale))))


def _per_channel(importer, node, vector):
    """A per-channel [C] vector of `node`'s args, shaped to broadcast along its axis."""
    axis, rank = node.args[3], len(node.meta["val"].shape)
    shape = [1] * rank
    shape[axis % rank] = -1
    return _relax().op.reshape(_relax().op.astype(importer.env[vector], "float32"), shape)


def _quantize_per_channel(node, importer):
    x, scales, zero_points, _, qmin, qmax, dtype = node.args[:7]
    op = _relax().op
    # torch: x · (1 / scales) in float32, round, + zero points, clamp.
    inverse = op.divide(_f32(1.0), _per_channel(importer, node, scales))
    q = op.add(op.round(op.multiply(importer.env[x], inverse)), _per_channel(importer, node, zero_points))
    q = op.minimum(op.maximum(q, _f32(float(qmin))), _f32(float(qmax)))
    return importer.block_builder.emit(op.astype(q, _dtype(dtype)))


def _dequantize_per_channel(node, importer):
    q, scales, zero_points = node.args[:3]
    op = _relax().op
    value = op.astype(importer.env[q], "float32")
    if zero_points is not None:
        value = op.subtract(value, _per_channel(importer, node, zero_points))
    return importer.block_builder.emit(op.multiply(value, _per_channel(importer, node, scales)))


def _int8_matmul(node, importer):
    a, b, a_scale, a_zero_point, b_scale, b_zero_point = node.args
    op = _relax().op

    def centred(x, scale, zero_point):
        # code − zero point is in [−255, 255]: int16 operands, whose products LLVM can sum pairwise
        # (vpmaddwd); the sums are exact in int32.
        codes = _codes(importer.env[x], float(scale), int(zero_point), 0, 255)
        return op.astype(op.subtract(codes, _f32(float(zero_point))), "int16")

    acc = op.matmul(centred(a, a_scale, a_zero_point), centred(b, b_scale, b_zero_point), out_dtype="int32")
    scale = torch.tensor(a_scale, dtype=torch.float32) * torch.tensor(b_scale, dtype=torch.float32)
    return importer.block_builder.emit(op.multiply(op.astype(acc, "float32"), _f32(float(scale))))


def _out_type(node):
    val = node.meta["val"]
    return _relax().TensorType([int(d) for d in val.shape], "float32")


def _int8_conv2d(node, importer):
    x, codes, scale, weight_sum, bias, stride, padding, dilation, groups, x_scale, x_zero_point, bits = node.args
    relax = _relax()
    out_channels, in_channels = codes.meta["val"].shape[::3]  # packed codes [O, KH, KW, C/groups]
    if int8_conv.supported(in_channels, out_channels, groups, dilation, bits):
        return _tvm_int8_conv2d(node, importer)
    params = relax.ShapeExpr([*stride, *padding, *dilation, groups, x_zero_point, bits])
    args = [_value(importer, a) for a in (x, codes, scale, weight_sum, bias)] + [params, relax.prim_value(float(x_scale))]
    return importer.block_builder.emit(relax.call_dps_packed(CONV2D_KERNEL, relax.Tuple(args), _out_type(node)))


def _int8_linear(node, importer):
    x, codes, scale, weight_sum, bias, x_scale, x_zero_point, bits = node.args
    relax = _relax()
    # x_scale None (dynamic per-token) reads as a scale <= 0 in the kernel.
    args = [_value(importer, a) for a in (x, codes, scale, weight_sum, bias)]
    args += [relax.ShapeExpr([x_zero_point, bits]), relax.prim_value(float(x_scale or 0.0))]
    return importer.block_builder.emit(relax.call_dps_packed(LINEAR_KERNEL, relax.Tuple(args), _out_type(node)))


def _tvm_int8_conv2d(node, importer):
    """The conv as TVM's own int8 code (`int8_conv`): one scheduled PrimFunc."""
    x, codes, scale, weight_sum, bias, stride, padding, _, _, x_scale, x_zero_point, _ = node.args
    relax, bb = _relax(), importer.block_builder
    # Packed by a layout transform of the (still symbolic) weight, which FoldConstant computes once; it
    # starts from torch's [O, C, KH, KW], so the C++ kernels' packing [O, KH, KW, C] is undone first.
    weight = bb.normalize(relax.op.permute_dims(importer.env[codes], [0, 3, 1, 2]))
    packed = relax.op.layout_transform(weight, int8_conv.packing(codes.meta["val"].shape[3]), pad_value=0)
    packed_shape = [int(d) for d in bb.normalize(packed).ty.shape]
    func = int8_conv.compute(tuple(x.meta["val"].shape), packed_shape, stride, padding, float(x_scale),
                             int(x_zero_point), bias is not None)
    args = [importer.env[x], packed, relax.op.astype(importer.env[scale], "float32"),
            relax.op.astype(importer.env[weight_sum], "int32")]
    args += [relax.op.astype(importer.env[bias], "float32")] if bias is not None else []
    gvar = bb.add_func(int8_conv.schedule(func), int8_conv.FUNC_NAME)
    return bb.emit(relax.call_tir(gvar, [bb.emit(a) for a in args], _out_type(node)))


def convert_map() -> dict[str, Callable]:
    """`from_exported_program(custom_convert_map=...)`: op name (`OpOverload.__name__`) → converter."""
    return {
        patterns.QUANTIZE_PER_TENSOR.__name__: _quantize_per_tensor,
        patterns.DEQUANTIZE_PER_TENSOR.__name__: _dequantize_per_tensor,
        patterns.QUANTIZE_PER_CHANNEL.__name__: _quantize_per_channel,
        patterns.DEQUANTIZE_PER_CHANNEL.__name__: _dequantize_per_channel,
        "int8_matmul.default": _int8_matmul,
        "int8_conv2d.default": _int8_conv2d,
        "int8_linear.default": _int8_linear,
    }


# ---- the packed functions Relax calls -----------------------------------------------------------
# They run the kernels on the calling thread: TVM's pool owns the cores, and the kernels' OpenMP threads
# beside it spin after each call, taking a core from TVM's next parallel loop (a ResNet-18 int8, whose
# last linear is such a call, runs markedly slower with two kernel threads than with one).
KERNEL_THREADS = 1


def _tensors(*values) -> list[Tensor | None]:
    """TVM tensors as torch views of the same memory (DLPack, no copy); empty ones as None."""
    return [torch.from_dlpack(v) if v.numel() else None for v in values]


# The kernels check weight values once per torch tensor object (a scan of the whole weight): a
# program's constants must reach them as the same view on every call, not a new one.
_CONSTANT_VIEWS: collections.OrderedDict = collections.OrderedDict()
CONSTANT_VIEWS_KEPT = 4096


def _constants(*values) -> list[Tensor | None]:
    """`_tensors` for a program's constants (weights, scales, sums, biases): one torch view per TVM
    constant, kept while it is among the last CONSTANT_VIEWS_KEPT used. A kept view holds its
    memory, so no other tensor can take that address while the view is keyed by it."""
    views = []
    for value in values:
        if not value.numel():
            views.append(None)
            continue
        key = (value.data_ptr(), tuple(value.shape), str(value.dtype))
        view = _CONSTANT_VIEWS.pop(key, None)
        _CONSTANT_VIEWS[key] = view = torch.from_dlpack(value) if view is None else view
        if len(_CONSTANT_VIEWS) > CONSTANT_VIEWS_KEPT:
            _CONSTANT_VIEWS.popitem(last=False)
        views.append(view)
    return views


def _conv2d_kernel(x, codes, scale, weight_sum, bias, params, x_scale, out) -> None:
    from edgepasses.kernels import ops

    sh, sw, ph, pw, dh, dw, groups, x_zero_point, bits = (int(p) for p in params)
    (x, out), (codes, scale, weight_sum, bias) = _tensors(x, out), _constants(codes, scale, weight_sum, bias)
    ops.int8_conv2d_into(out, x, codes, scale, weight_sum, bias, [sh, sw], [ph, pw], [dh, dw], groups, x_scale,
                         x_zero_point, bits, KERNEL_THREADS)


def _linear_kernel(x, codes, scale, weight_sum, bias, params, x_scale, out) -> None:
    from edgepasses.kernels import ops

    x_zero_point, bits = (int(p) for p in params)
    (x, out), (codes, scale, weight_sum, bias) = _tensors(x, out), _constants(codes, scale, weight_sum, bias)
    ops.int8_linear_into(out, x, codes, scale, weight_sum, bias, x_scale if x_scale > 0 else None, x_zero_point,
                         bits, KERNEL_THREADS)


@functools.cache
def register_kernels() -> None:
    """Register the kernels' packed functions with TVM's FFI, once per process: before any VM that
    calls them is created (built here or loaded from an artifact)."""
    import tvm_ffi

    tvm_ffi.register_global_func(CONV2D_KERNEL, _conv2d_kernel, override=True)
    tvm_ffi.register_global_func(LINEAR_KERNEL, _linear_kernel, override=True)
