"""Quantize-dequantize patterns → `edge::int8_linear` / `edge::int8_conv2d` / `edge::int8_bmm`.

The pattern PT2E leaves (`convert_pt2e(fold_quantize=False)`; `edgepasses.quant.patterns` finds it):

    x ─ quantize_per_tensor ─ dequantize_per_tensor ─┐
    W ─ quantize_per_channel ─ dequantize_per_channel ┴─ linear / conv2d (+ bias)

becomes one kernel call that quantizes x itself, multiplies int8 codes with int32
accumulation and dequantizes per channel. A matmul of two dequantized activations (attention's
Q·Kᵀ and P·V) becomes `edge::int8_bmm`, which quantizes both; a Kᵀ made by a transpose is read
in place (`transpose_b`). The weight codes (a conv's packed channels-last,
`ops.pack_int8_conv2d_weight`) and their row sums (the zero-point correction) are computed
here once. A quantized op left in another form runs as
float fake-quant in PyTorch and is reported as a fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from edgepasses.graph_utils import (add_constant, constant_value, conv_args, layer_name, optional_arg,
                                    replace_with_call)
from edgepasses.kernels import ops, panels
from edgepasses.quant.patterns import ActivationQDQ, QDQPattern, Reason, WeightQDQ, find_patterns

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightCodes:
    codes: torch.Tensor     # int8, output channel first
    scale: torch.Tensor     # float32 per output channel
    bits: int               # 7 when every code fits |w| <= 64: the kernel's fast path is then exact


def weight_codes(gm: torch.fx.GraphModule, weight: WeightQDQ) -> WeightCodes:
    """The int8 codes of a symmetric per-output-channel quantized weight (`patterns.int8_weight`)."""
    codes = weight.codes(gm)
    return WeightCodes(codes, weight.scale.float(), 7 if int(codes.abs().max()) <= 64 else 8)


def _kernel_call(gm, node, x: ActivationQDQ, w: WeightCodes):
    """The edge:: op for a linear or 2-d conv `node`, and its arguments (new constants added to `gm`)."""
    is_linear = node.target == aten.linear.default
    # A conv's codes are packed here, once, in the layout its kernel reads.
    prepared = w.codes if is_linear else ops.pack_int8_conv2d_weight(w.codes)
    codes = add_constant(gm, f"{node.name}_codes", prepared, before=node)
    scale = add_constant(gm, f"{node.name}_scale", w.scale, before=node)
    sums = add_constant(gm, f"{node.name}_sum", ops.int8_weight_sum(w.codes), before=node)
    bias = _bias_copy(gm, node)
    source = x.float_input(gm, before=node)
    if is_linear:
        return torch.ops.edge.int8_linear.default, (source, codes, scale, sums, bias, x.scale, x.uint8_zero_point,
                                                    w.bits)
    conv = conv_args(node)
    return torch.ops.edge.int8_conv2d.default, (source, codes, scale, sums, bias, conv.stride, conv.padding,
                                                conv.dilation, conv.groups, x.scale, x.uint8_zero_point, w.bits)


def _bias_copy(gm, node):
    """The layer's bias as a constant of its own: the weight codes are frozen copies, so a bias shared
    with the model's parameter would let a later in-place edit reach half of the layer."""
    bias = optional_arg(node, 2)
    value = constant_value(gm, bias)
    return bias if value is None else add_constant(gm, f"{node.name}_bias", value.clone(), before=node)


def bmm_mismatch(pattern: QDQPattern) -> str | None:
    """Why `edge::int8_bmm` cannot run a matched matmul (None: it can): it takes two operands of at
    least 2 dims with the same batch dims (no broadcasting)."""
    a, b = (arg.meta["val"] for arg in pattern.node.args[:2])
    if a.dim() < 2 or b.dim() < 2 or a.shape[:-2] != b.shape[:-2]:
        return (f"int8_bmm needs two operands of >= 2 dims with the same batch dims, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}")
    return None


def _swaps_last_two(node) -> bool:
    """`node` is a transpose of its input's last two dims."""
    if not (isinstance(node, torch.fx.Node) and node.target == aten.transpose.int):
        return False
    rank = node.meta["val"].dim()
    return {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}


def _bmm_call(gm, node, pattern: QDQPattern):
    """edge::int8_bmm and its arguments for a matmul of two quantized activations."""
    a, b = pattern.activation, pattern.other
    left, right = a.float_input(gm, before=node), b.float_input(gm, before=node)
    transpose_b = _swaps_last_two(right)
    if transpose_b:  # Kᵀ: the kernel reads K's rows as they are, no transposed copy
        right = right.args[0]
    return torch.ops.edge.int8_bmm.default, (left, right, a.scale, a.uint8_zero_point, b.scale,
                                             b.uint8_zero_point, transpose_b)


def lower_kernel_patterns(gm: torch.fx.GraphModule, *, matmuls: bool = True) -> tuple[int, list[QDQPattern]]:
    """Rewrite every quantized linear/conv2d (and, with `matmuls`, activation matmul) into an int8 kernel
    call. Returns how many were rewritten and the patterns of the other convs/linears/matmuls that read
    a dequantized tensor."""
    rewritten, left = 0, []
    for pattern in find_patterns(gm):
        if pattern.mismatch is not None or (pattern.is_matmul and (not matmuls or bmm_mismatch(pattern))):
            left.append(pattern)
            continue
        node = pattern.node
        if pattern.is_matmul:
            replace_with_call(gm, node, *_bmm_call(gm, node, pattern))
        else:
            replace_with_call(gm, node, *_kernel_call(gm, node, pattern.activation, weight_codes(gm, pattern.weight)))
        rewritten += 1
    return rewritten, left


def why_no_kernel(pattern: QDQPattern) -> str:
    """Why a pattern `lower_kernel_patterns` left has no int8 kernel here."""
    if pattern.mismatch is None:  # a matmul the bmm kernel does not take
        return bmm_mismatch(pattern)
    if pattern.mismatch.reason is Reason.OP:
        return "no int8 kernel for this op (int8 kernels: linear, 2-d conv, matmul of two activations)"
    return pattern.mismatch.detail


def pack_linear_weights(gm: torch.fx.GraphModule) -> int:
    """Rewrite each `edge::int8_linear` on 7-bit codes into `edge::int8_linear_packed` on the same codes
    in panels (its faster AVX2 kernel), on the kept half alone where the codes are 2:4 sparse. Returns
    how many 2:4 ones."""
    sparse = 0
    for node in list(gm.graph.nodes):
        if node.target != torch.ops.edge.int8_linear.default or node.args[7] != 7:
            continue
        x, codes_node, scale, sums, bias, x_scale, x_zero_point, _ = node.args
        codes = constant_value(gm, codes_node)
        if panels.at_most_2_of_4(codes):
            values, shuffle = panels.pack_int8_panels_24(codes)
            shuffle_node = add_constant(gm, f"{node.name}_shuffle", shuffle, before=node)
            sparse += 1
        else:
            values, shuffle_node = panels.pack_int8_panels(codes), None
        packed = add_constant(gm, f"{node.name}_panels", values, before=node)
        replace_with_call(gm, node, torch.ops.edge.int8_linear_packed.default,
                          (x, packed, shuffle_node, codes.shape[0], scale, sums, bias, x_scale, x_zero_point))
    return sparse


def runs_packed_24(node: torch.fx.Node) -> bool:
    """`node` is the packed int8 linear on a 2:4 weight's kept half (it has a shuffle)."""
    return node.target == torch.ops.edge.int8_linear_packed.default and node.args[2] is not None


def kernel_form(node: torch.fx.Node) -> str | None:
    """The kernel an `edge::` call runs and the integer form of its operands (None: no kernel call)."""
    edge = torch.ops.edge
    if node.target == edge.int8_linear_packed.default:
        return f"int8_linear_packed, 7-bit weights{', 2:4 (kept half)' if runs_packed_24(node) else ''}, u8 activations"
    if node.target == edge.int8_linear.default:
        return f"int8_linear, {node.args[7]}-bit weights" + (", u8 activations" if node.args[5] is not None
                                                            else ", dynamic per-token activations")
    if node.target == edge.int8_conv2d.default:
        return f"int8_conv2d, {node.args[11]}-bit weights, u8 activations"
    if node.target == edge.int8_bmm.default:
        return "int8_bmm, two u8 activations (exact int16 products)"
    if node.target == edge.sparse24_linear.default:
        return "sparse24_linear, float 2:4"
    if node.target == edge.lowrank_linear.default:
        return "lowrank_linear, float"
    return None


def layer_kernels(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Each layer on one of our kernels (by `layer_name`; an attention matmul by its module and node) ->
    `kernel_form`."""
    def name(node):
        return f"{layer_name(node)}/{node.name}" if node.target == torch.ops.edge.int8_bmm.default else layer_name(node)

    return {name(node): form for node in gm.graph.nodes if (form := kernel_form(node)) is not None}


def lower_int8(gm: torch.fx.GraphModule) -> tuple[int, dict[torch.fx.Node, str]]:
    """`lower_kernel_patterns`, with why each op left runs as float fake-quant."""
    rewritten, left = lower_kernel_patterns(gm)
    return rewritten, {pattern.node: f"{why_no_kernel(pattern)}; it runs as float fake-quant (quantize-dequantize, "
                                     "float op) in PyTorch" for pattern in left}
