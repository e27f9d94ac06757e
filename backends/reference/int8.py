"""Quantize-dequantize patterns → `edge::int8_linear` / `edge::int8_conv2d`.

The pattern PT2E leaves (`convert_pt2e(fold_quantize=False)`):

    x ─ quantize_per_tensor ─ dequantize_per_tensor ─┐
    W ─ quantize_per_channel ─ dequantize_per_channel ┴─ linear / conv2d (+ bias)

becomes one kernel call that quantizes x itself, multiplies int8 codes with int32
accumulation and dequantizes per channel. The weight codes (and their row sums, the
zero-point correction) are computed here once. A quantized op left in another form runs as
float fake-quant in PyTorch and is reported as a fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
import torch.fx

from edgepasses.graph_utils import ACTIVATION_MATMUL_OPS, CONV_OPS, LINEAR_OPS, add_constant, constant_value
from edgepasses.kernels import ops

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
QUANTIZE_TENSOR, DEQUANTIZE_TENSOR = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
QUANTIZE_CHANNEL, DEQUANTIZE_CHANNEL = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
DEQUANTIZE_OPS = {DEQUANTIZE_TENSOR, DEQUANTIZE_CHANNEL, qd.dequantize_per_tensor.tensor}
# Ops that read dequantized tensors and for which an integer kernel is the point. Others that read
# them (add, pooling, reshapes) compute on the dequantized values exactly as the fake-quant graph does.
COMPUTE_OPS = CONV_OPS | LINEAR_OPS | ACTIVATION_MATMUL_OPS


# Ops that only move values: quantizing before or after them is the same, so a linear reading a
# dequantized tensor through them (a classifier head reads the pooled average through a flatten)
# takes the float tensor through the same ops.
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.squeeze.dims,
             aten.unsqueeze.default, aten.permute.default, aten.transpose.int}


@dataclass(frozen=True)
class ActivationQuant:
    source: torch.fx.Node   # the float input (of the quantize)
    scale: float
    zero_point: int         # as a uint8 zero point
    moves: tuple[torch.fx.Node, ...] = ()  # shape ops between the dequantize and the reader, in order

    def float_input(self, gm: torch.fx.GraphModule, before: torch.fx.Node) -> torch.fx.Node:
        """The float tensor the reader would see unquantized: `source` through the same shape ops."""
        value = self.source
        for move in self.moves:
            with gm.graph.inserting_before(before):
                value = gm.graph.call_function(move.target, (value, *move.args[1:]), move.kwargs)
            value.meta = {**move.meta}
        return value


def _through_shape_ops(node) -> tuple[object, tuple[torch.fx.Node, ...]]:
    moves = []
    while isinstance(node, torch.fx.Node) and node.target in SHAPE_OPS:
        moves.append(node)
        node = node.args[0]
    return node, tuple(reversed(moves))


@dataclass(frozen=True)
class WeightCodes:
    codes: torch.Tensor     # int8, output channel first
    scale: torch.Tensor     # float32 per output channel
    bits: int               # 7 when every code fits |w| <= 64: the kernel's fast path is then exact


def activation_quant(node) -> ActivationQuant | str:
    """The static per-tensor quantization feeding `node` (a dequantize, possibly through shape ops),
    or why there is none."""
    node, moves = _through_shape_ops(node)
    if not isinstance(node, torch.fx.Node) or node.target != DEQUANTIZE_TENSOR:
        return "its input is not a per-tensor dequantize with a constant scale"
    quant = node.args[0]
    if not isinstance(quant, torch.fx.Node) or quant.target != QUANTIZE_TENSOR or quant.args[1:] != node.args[1:]:
        return "its input dequantize does not read a matching quantize_per_tensor"
    source, scale, zero_point, qmin, qmax, dtype = quant.args[:6]
    if (dtype, qmin, qmax) == (torch.uint8, 0, 255):
        return ActivationQuant(source, float(scale), int(zero_point), moves)
    if (dtype, qmin, qmax) == (torch.int8, -128, 127):  # the same codes shifted by 128
        return ActivationQuant(source, float(scale), int(zero_point) + 128, moves)
    return f"activation range {dtype} [{qmin}, {qmax}] is neither u8 [0, 255] nor s8 [-128, 127]"


def weight_codes(gm: torch.fx.GraphModule, node) -> WeightCodes | str:
    """The int8 codes of a per-channel, symmetric, output-channel-first quantized constant weight."""
    if not isinstance(node, torch.fx.Node) or node.target != DEQUANTIZE_CHANNEL:
        return "its weight is not a per-channel dequantize"
    source, scale_node, zp_node, axis, qmin, qmax, dtype = node.args[:7]
    scale, zero_point = constant_value(gm, scale_node), constant_value(gm, zp_node)
    if axis != 0 or dtype != torch.int8 or scale is None or zero_point is None or zero_point.any():
        return "its weight is not symmetric int8 per output channel with constant scales"
    if isinstance(source, torch.fx.Node) and source.target == QUANTIZE_CHANNEL:
        weight = constant_value(gm, source.args[0])
        codes = None if weight is None else QUANTIZE_CHANNEL(weight, scale, zero_point, 0, qmin, qmax, torch.int8)
    else:  # weight quantize already folded into an int8 constant
        codes = constant_value(gm, source)
    if codes is None:
        return "its weight is not a constant"
    return WeightCodes(codes, scale.float(), 7 if int(codes.abs().max()) <= 64 else 8)


def _conv_args(node: torch.fx.Node) -> tuple | None:
    """(stride, padding, dilation, groups) of a 2-d aten.conv2d with numeric padding, else None."""
    if node.target != aten.conv2d.default or node.meta["val"].dim() != 4:
        return None
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = (args[3] or [1, 1], args[4] or [0, 0], args[5] or [1, 1], args[6] or 1)
    expand = lambda v: list(v) * 2 if len(v) == 1 else list(v)  # noqa: E731
    return expand(stride), expand(padding), expand(dilation), groups


def _kernel_call(gm, node, x: ActivationQuant, w: WeightCodes):
    """The edge:: op for a linear or 2-d conv `node`, and its arguments (new constants added to `gm`)."""
    codes = add_constant(gm, f"{node.name}_codes", w.codes, before=node)
    scale = add_constant(gm, f"{node.name}_scale", w.scale, before=node)
    sums = add_constant(gm, f"{node.name}_sum", ops.int8_weight_sum(w.codes), before=node)
    bias = node.args[2] if len(node.args) > 2 else None
    source = x.float_input(gm, before=node)
    if node.target == aten.linear.default:
        return torch.ops.edge.int8_linear.default, (source, codes, scale, sums, bias, x.scale, x.zero_point, w.bits)
    stride, padding, dilation, groups = _conv_args(node)
    return torch.ops.edge.int8_conv2d.default, (source, codes, scale, sums, bias, stride, padding, dilation,
                                                groups, x.scale, x.zero_point, w.bits)


def _why_not(gm, node) -> tuple[ActivationQuant, WeightCodes] | str:
    if node.target != aten.linear.default and _conv_args(node) is None:
        return "no int8 kernel for this op (int8 kernels: linear, 2-d conv)"
    x, w = activation_quant(node.args[0]), weight_codes(gm, node.args[1])
    return x if isinstance(x, str) else w if isinstance(w, str) else (x, w)


def lower_int8(gm: torch.fx.GraphModule) -> tuple[int, dict[torch.fx.Node, str]]:
    """Rewrite every quantized linear/conv2d into an int8 kernel call. Returns how many were
    rewritten and, for each conv/linear/matmul that reads a dequantized tensor but was not, why not."""
    rewritten, left = 0, {}
    for node in list(gm.graph.nodes):
        if node.target not in COMPUTE_OPS or not any(getattr(_through_shape_ops(a)[0], "target", None) in DEQUANTIZE_OPS
                                                     for a in node.all_input_nodes):
            continue
        match = _why_not(gm, node)
        if isinstance(match, str):
            left[node] = f"{match}; it runs as float fake-quant (quantize-dequantize, float op) in PyTorch"
            continue
        op, args = _kernel_call(gm, node, *match)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(op, args)
        call.meta = {**node.meta}
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        rewritten += 1
    return rewritten, left
