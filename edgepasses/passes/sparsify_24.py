"""`sparsify_24`: 2:4 semi-structured sparsity — in every group of 4 consecutive weights along
the reduction dimension, 2 are zero.

Linear: groups along the input features. Conv: groups along the input channels at each kernel
tap (the weight read as [out, kh, kw, in], the implicit-GEMM order TensorRT's sparse kernels
and NVIDIA's ASP use), so `in/groups` must be a multiple of 4; depthwise and grouped convs are
skipped with the reason. Which 2 of 4 survive:

- `magnitude`: the larger |w|;
- `activation` (Wanda): the larger |w|·‖x‖, with ‖x‖ the input feature's RMS over the
  calibration data — a small weight on a large input matters more than a large one on a
  near-silent input, so this keeps more accuracy.
`auto` (the default) is `activation` when calibration data is given. With data, the mean of
what the removed weights contributed, Σ (W − W')·E[x], also moves into the bias (bias correction).

Masked layers carry `node.meta["sparse24"] = True`; lowerings read it (the reference target
runs linears on `edge::sparse24_linear`; OpenVINO runs them dense and says so). Lossy: stats
give each layer's sparsity and output SQNR on the calibration (or example) inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from ..graph_utils import (SPARSE24, add_constant, inputs_have_values, remove_unused_attributes, replace_arg,
                           warn_nothing_reached, weight_layer_ignore, weight_layers)
from ..lowrank.layers import Layer, collect_input_stats, find_layers, output_sqnr_db
from ..pass_base import PassContext, PassResult, ignore_option, option, register_pass

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class Sparsify24Options:
    criterion: Literal["auto", "magnitude", "activation"] = option(
        "auto", "Which 2 of each 4 weights stay: magnitude, the largest |w|; activation (Wanda), the largest "
                "|w| times the input's RMS over the calibration data; auto: activation when calibration "
                "data is given.")
    ignore: tuple[str, ...] = ignore_option("stay dense")


def keep_2_of_4(scores: torch.Tensor) -> torch.Tensor:
    """A boolean mask keeping the 2 highest scores in every group of 4 along the last dim."""
    groups = scores.reshape(*scores.shape[:-1], -1, 4)
    top = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(scores.shape)


def _groups_last(weight: torch.Tensor) -> torch.Tensor:
    """The weight with its grouping dim last: [out, in] as is, [out, in, kh, kw] → [out, kh, kw, in]."""
    return weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight


def _groups_back(weight: torch.Tensor) -> torch.Tensor:
    return weight.permute(0, 3, 1, 2) if weight.dim() == 4 else weight


def _fits(layer: Layer) -> str | None:
    reduction = layer.weight.shape[1]
    if reduction % 4:
        kind = "input channels" if layer.is_conv else "input features"
        return f"{reduction} {kind} per group is not a multiple of 4; 2:4 groups would straddle the end"
    return None


def layer_mask(layer: Layer, input_mean_square: torch.Tensor | None) -> torch.Tensor:
    """Which weights of `layer` survive, in the weight's own shape. `input_mean_square`: E[x²] per
    weight column (im2col order c, kh, kw for a conv); None ranks by magnitude."""
    scores = layer.weight.detach().abs().double()
    if input_mean_square is not None:
        scores = scores * input_mean_square.double().clamp_min(0).sqrt().reshape(scores.shape[1:])
    return _groups_back(keep_2_of_4(_groups_last(scores)))


def _input_stats(gm, layers: list[Layer], ctx: PassContext, activation: bool) -> dict:
    """Input Grams (their diagonals rank weights for `activation`; they also give SQNR) when there is data."""
    if not activation and not inputs_have_values(ctx.example_inputs):
        return {}
    batches = ctx.calibration if activation else [ctx.example_inputs]
    return collect_input_stats(gm, layers, batches, ctx.example_inputs,
                               needed_by="sparsify_24(criterion=activation)")


def bias_shift(layer: Layer, sparse_weight: torch.Tensor, stats) -> torch.Tensor:
    """What the removed weights added on average, Σ_k (W − W')[:, k]·E[x_k], moved into the bias: the
    masked layer's output error then has zero mean over the data (post-ReLU inputs have a large one)."""
    removed = (layer.weight.detach() - sparse_weight).reshape(sparse_weight.shape[0], -1).double()
    return (removed @ (stats.total.double() / stats.rows)).to(sparse_weight.dtype)


def _set_bias(gm: torch.fx.GraphModule, layer: Layer, shift: torch.Tensor) -> None:
    bias = shift if layer.bias_value is None else layer.bias_value.detach() + shift
    node = add_constant(gm, f"{layer.name}.bias_24", bias, before=layer.node)
    if len(layer.node.args) > 2:
        replace_arg(gm, layer.node, 2, node)
    else:
        layer.node.args = (*layer.node.args, node)


def _apply(gm: torch.fx.GraphModule, layer: Layer, sparse_weight: torch.Tensor, shift: torch.Tensor | None) -> None:
    replace_arg(gm, layer.node, 1, add_constant(gm, f"{layer.name}.weight_24", sparse_weight, before=layer.node))
    if shift is not None:
        _set_bias(gm, layer, shift)
    layer.node.meta[SPARSE24] = True


# after quantize, weights are no constants to mask
@register_pass("sparsify_24", options=Sparsify24Options, before=("quantize",))
def sparsify_24(gm: torch.fx.GraphModule, opts: Sparsify24Options, ctx: PassContext) -> PassResult:
    """Zero 2 of every 4 weights along the reduction dim of Linear/conv layers (magnitude or Wanda)."""
    activation = opts.criterion == "activation" or (opts.criterion == "auto" and ctx.calibration is not None)
    found, skipped = find_layers(gm, weight_layer_ignore(gm, opts.ignore, where="sparsify_24"))
    layers = []
    for layer in found:
        reason = _fits(layer)
        if reason:
            skipped[layer.name] = reason
        else:
            layers.append(layer)
    stats = _input_stats(gm, layers, ctx, activation)
    done = {}
    for layer in layers:
        layer_stats = stats.get(layer.node)
        diagonal = layer_stats.gram.diagonal() / layer_stats.rows if activation else None
        mask = layer_mask(layer, diagonal)
        sparse = layer.weight.detach() * mask
        shift = bias_shift(layer, sparse, layer_stats) if activation else None
        sqnr = None if layer_stats is None else output_sqnr_db(layer, sparse, layer_stats, shift)
        _apply(gm, layer, sparse, shift)
        done[layer.name] = {"sparsity": round((sparse == 0).float().mean().item(), 4),
                            "sqnr_db": None if sqnr is None else round(sqnr, 2)}
    if done:
        remove_unused_attributes(gm)
        gm.recompile()
    else:
        warn_nothing_reached(log, "sparsify_24", "sparsified", weight_layers(gm), skipped)
    return PassResult(gm, modified=bool(done), stats={
        "criterion": "activation" if activation else "magnitude", "layers_sparsified": len(done),
        "layers": done, "skipped": skipped})
