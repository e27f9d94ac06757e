"""Fast bias correction (NNCF's `FastBiasCorrection`) for PT2E-converted graphs.

Rounding a layer's weight shifts the mean of its output: with inputs of non-zero mean (ReLU
outputs) the per-channel errors of the rounded weights add up instead of cancelling. The shift is
measured on calibration data and subtracted from the layer's bias, which costs nothing at
inference time.

The weight pattern `convert_pt2e(fold_quantize=False)` leaves, found by `patterns.weight_qdq`:

    W (get_attr) ─ quantize_per_channel / quantize_per_tensor ─ dequantize_* ─ linear / conv (arg 1)
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.fx

from ..analysis.observe import NodeObserver
from ..errors import OptionError
from ..graph_utils import LINEAR_OPS, add_constant, constant_value, copy_sharing_weights, replace_arg
from . import patterns
from .patterns import WeightQDQ


def weight_qdq(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> WeightQDQ | None:
    """The quantize-dequantize pair on `layer`'s weight (`patterns.weight_qdq`); None unless `layer` is a
    linear/conv whose float weight is a constant read through one matching pair with constant scale and
    zero point."""
    found = patterns.weight_qdq(gm, layer)
    return found if isinstance(found, WeightQDQ) and found.quantize is not None else None


def quantized_layers(gm: torch.fx.GraphModule, keep: Callable[[WeightQDQ], bool] = lambda m: True) -> list[WeightQDQ]:
    """`weight_qdq` of every layer that has one and that `keep` accepts, in graph order."""
    found = (weight_qdq(gm, node) for node in gm.graph.nodes)
    return [m for m in found if m is not None and keep(m)]


def weights_dequantized(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, torch.fx.Node]]:
    """A copy of `gm` to evaluate on calibration data, and the node of the copy that computes each of
    `gm`'s node names. In the copy every quantize/dequantize of constants (a weight's pair, or the
    dequantize of folded codes) is computed once, by the graph's own ops: its readers read the result as
    a constant. Every call of `gm` re-quantizes each weight, which costs more than the rest of a CNN's
    forward at batch 1; the copy computes the same values at the cost of a float forward. `gm` itself
    keeps its Q/DQ pairs (what targets lower)."""
    evaluation = copy_sharing_weights(gm)
    node_of = {node.name: node for node in evaluation.graph.nodes}
    computed: dict[torch.fx.Node, torch.Tensor] = {}

    def value(arg):
        return computed[arg] if arg in computed else constant_value(evaluation, arg)

    for node in list(evaluation.graph.nodes):
        if not (patterns.is_quantize(node) or patterns.is_dequantize(node)) or not all(
                n in computed or n.op == "get_attr" for n in node.all_input_nodes):
            continue
        with torch.no_grad():
            computed[node] = node.target(*torch.fx.node.map_arg(node.args, value),
                                         **torch.fx.node.map_arg(node.kwargs, value))
        if patterns.is_dequantize(node):
            constant = add_constant(evaluation, f"{node.name}_value", computed[node], before=node)
            node.replace_all_uses_with(constant)
            node_of[node.name] = constant
    if computed:
        evaluation.graph.eliminate_dead_code()
        evaluation.recompile()
    return evaluation, node_of


def observe_layer_inputs(gm: torch.fx.GraphModule, layers: list[WeightQDQ], batches: list[tuple],
                         on_input: Callable[[WeightQDQ, torch.Tensor], None], *, needed_by: str) -> list:
    """One run of `gm` over `batches`, handing every layer's actual input (what its arg 0 computes,
    in the quantized graph: the dequantized activation) to `on_input`. One run for all layers, not one
    per layer: that would cost layers x batches forward passes. The run is of `weights_dequantized(gm)`:
    the same values, each weight quantized once. Returns the graph's outputs on each batch."""
    if not batches:
        raise OptionError(f"{needed_by} needs calibration batches; got none")
    readers: dict[str, list[WeightQDQ]] = defaultdict(list)
    for layer in layers:
        readers[layer.layer.args[0].name].append(layer)

    def watcher(group: list[WeightQDQ]) -> Callable[[torch.Tensor], None]:
        return lambda x: [on_input(layer, x) for layer in group]

    evaluation, node_of = weights_dequantized(gm)
    observer = NodeObserver(evaluation, {node_of[name]: watcher(group) for name, group in readers.items()})
    with torch.no_grad():
        return [observer.run(*batch) for batch in batches]


def _has_constant_bias(gm: torch.fx.GraphModule, layer: WeightQDQ) -> bool:
    args = layer.layer.args
    return len(args) > 2 and constant_value(gm, args[2]) is not None


def _output_error(layer: WeightQDQ, x: torch.Tensor, weight_error: torch.Tensor) -> torch.Tensor:
    """layer(x, W_dq) - layer(x, W) per output channel, as a [channels, -1] matrix: the layer's own op
    (stride, padding, groups...) applied to the weight error, without bias."""
    node = layer.layer
    error = node.target(x, weight_error, None, *node.args[3:], **node.kwargs)
    # Linear: channels last. Conv: channels right before the spatial dims (dim 1 batched, 0 unbatched).
    channel_dim = -1 if node.target in LINEAR_OPS else error.dim() - weight_error.dim() + 1
    return error.movedim(channel_dim, 0).reshape(error.shape[channel_dim], -1)


def correct_biases(gm: torch.fx.GraphModule, batches: list[tuple], uncorrected_outputs: list | None = None) -> int:
    """Subtract from each quantized linear/conv's bias the mean output shift its weight rounding
    causes on `batches`. In place; returns how many layers were corrected. `uncorrected_outputs`, a
    list, gets `gm`'s outputs on `batches` before the correction (the run that measures it computes them).

    Layers: every linear/conv whose weight passes through a quantize-dequantize pair (`weight_qdq`)
    and which has a constant bias. Layers without a bias are left alone: adding one would change the
    graph's structure, and a target's fused kernel may have no bias input to put it in.

    The mean error of each layer is measured on its actual input in the quantized graph, all layers in
    one run (not NNCF's per-layer subgraph runs): a layer's correction then ignores that the layers
    before it were corrected too, a second-order effect. Run it after anything else that changes the
    weights (GPTQ). The corrected biases are new attributes (the old tensors may be the caller's
    parameters); the old ones stay until `remove_unused_attributes`.
    """
    layers = quantized_layers(gm, lambda m: _has_constant_bias(gm, m))
    weight_error = {m.layer: m.dequantized_weight(gm) - m.float_weight(gm) for m in layers}
    sums: dict[torch.fx.Node, torch.Tensor] = {}
    counts: dict[torch.fx.Node, int] = defaultdict(int)

    def accumulate(layer: WeightQDQ, x: torch.Tensor) -> None:
        error = _output_error(layer, x, weight_error[layer.layer].to(x.dtype)).double()
        sums[layer.layer] = sums.get(layer.layer, 0) + error.sum(dim=1)
        counts[layer.layer] += error.shape[1]

    outputs = observe_layer_inputs(gm, layers, batches, accumulate, needed_by="bias correction")
    if uncorrected_outputs is not None:
        uncorrected_outputs.extend(outputs)
    for layer in layers:
        bias_node = layer.layer.args[2]
        bias = constant_value(gm, bias_node)
        corrected = bias - (sums[layer.layer] / counts[layer.layer]).to(bias.dtype)
        replace_arg(gm, layer.layer, 2, add_constant(gm, f"{bias_node.name}_corrected", corrected,
                                                     before=bias_node))
    if layers:
        gm.recompile()
    return len(layers)
