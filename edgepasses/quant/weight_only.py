"""Weight-only quantization of Linear layers: int8 or int4 codes, a float scale per group.

A weight W (out, in) is cut along `in` into groups of `group_size`; each group of each output
row gets a symmetric scale absmax / qmax. The graph then holds the integer codes (int8
storage, also for int4) and rebuilds the float weight with plain aten ops,
codes → float → ×scale (→ reshape for groups): the decompression pattern OpenVINO's CPU plugin
keeps compressed and fuses into its MatMul, which ONNX and every other target also run.
"""
from __future__ import annotations

import torch
import torch.fx

from ..errors import OptionError
from ..graph_utils import add_constant, constant_value, replace_arg

aten = torch.ops.aten


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # narrow symmetric range: int4 → [-7, 7], int8 → [-127, 127]


def group_size_for(weight: torch.Tensor, group_size: int | None) -> int:
    """The group length along the input dim; None means one group per output row."""
    in_features = weight.shape[1]
    if group_size is None:
        return in_features
    if in_features % group_size:
        raise OptionError(f"quantize(group_size={group_size}): a Linear with {in_features} input features "
                          "does not split into whole groups; pick a divisor of it or ignore the layer")
    return group_size


def quantize_weight(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scales (out, in // group, 1)) with weight ≈ codes × scales per group."""
    grouped = weight.detach().float().reshape(weight.shape[0], -1, group)
    scales = (grouped.abs().amax(-1, keepdim=True) / qmax(bits)).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(grouped / scales).clamp(-qmax(bits), qmax(bits)).to(torch.int8)
    return codes.reshape(weight.shape), scales.to(weight.dtype)


def fake_quantize_weight(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The float weight the quantized graph computes with."""
    codes, scales = quantize_weight(weight, bits, group)
    return (codes.reshape(scales.shape[0], -1, group).to(scales.dtype) * scales).reshape(weight.shape)


def replace_with_codes(gm: torch.fx.GraphModule, linear: torch.fx.Node, bits: int, group_size: int | None,
                       weight_arg: int = 1) -> None:
    """Swap the float weight constant `linear.args[weight_arg]` (a 2-D (rows, features) matrix: a
    Linear's, or an embedding table with weight_arg=0) for int codes and the ops that dequantize them."""
    weight = constant_value(gm, linear.args[weight_arg])
    group = group_size_for(weight, group_size)
    codes, scales = quantize_weight(weight, bits, group)
    name = linear.args[weight_arg].target
    codes_node = add_constant(gm, f"{name}_int{bits}", codes, before=linear)
    if group == weight.shape[1]:
        scales = scales.reshape(-1, 1)
    scales_node = add_constant(gm, f"{name}_scales", scales, before=linear)
    graph = gm.graph
    with graph.inserting_before(linear):
        dequantized = graph.call_function(aten._to_copy.default, (codes_node,), {"dtype": weight.dtype})
        if group == weight.shape[1]:  # per output row: scales (out, 1) broadcast over the row
            dequantized = graph.call_function(aten.mul.Tensor, (dequantized, scales_node))
        else:
            dequantized = graph.call_function(aten.view.default, (dequantized, list(scales.shape[:2]) + [group]))
            dequantized = graph.call_function(aten.mul.Tensor, (dequantized, scales_node))
            dequantized = graph.call_function(aten.view.default, (dequantized, list(weight.shape)))
    replace_arg(gm, linear, weight_arg, dequantized)
