"""Which layers int8 hurts: per-layer output SQNR, one-at-a-time sensitivity, and keeping
the fewest most-sensitive layers in float to meet an SQNR budget or the user's metric.

All of it starts from one quantization (`RevertibleQuantization`): a candidate with some layers
back in float is that graph with those layers reading float inputs, not a new calibration run —
ranking a transformer's 39 layers costs 39 forward passes instead of 39 quantizations.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..analysis.observe import NodeObserver
from ..analysis.sqnr import SqnrAccumulator
from ..graph_utils import copy_sharing_weights, layer_name
from .patterns import QDQ_PAIRS
from .quantizer import QuantSetup, quantizable_nodes, stage_quantization


class RevertibleQuantization:
    """`gm` quantised once (on a copy), from which any set of layers can go back to float.

    A layer goes back by reading the float values its inputs' quantize-dequantize pairs were fed.
    The activation ranges were observed on float values, so no other layer's range depends on
    which layers stay float: a candidate is what quantising with those layers ignored gives, but
    that SmoothQuant's scales (exact in float) stay and the layers' shared input pairs remain for
    the other readers. Weights are fitted to their rounding (bias correction, GPTQ) per candidate,
    for the layers it quantises; whether bias_correction=auto corrects is decided once, with
    every layer int8."""

    def __init__(self, gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple], example_inputs: tuple):
        stage = stage_quantization(copy_sharing_weights(gm), setup, calibration, example_inputs)
        self.nodes: dict[str, list[str]] = defaultdict(list)  # layer name -> its annotated nodes, graph order
        for node, layer in stage.quantizer.layer_of_node.items():
            self.nodes[layer].append(node)
        self.layers = list(self.nodes)
        every_layer = stage.finish(copy_sharing_weights(stage.graph))
        self.all_int8 = every_layer.graph
        self.stage = stage.with_bias_correction_as_decided(every_layer)

    def graph(self, float_layers: Iterable[str] = (), adjust_weights: bool = True) -> torch.fx.GraphModule:
        """The quantised graph with `float_layers` in float (`adjust_weights=False`: without bias
        correction and GPTQ, a cheaper stand-in for ranking)."""
        float_layers = list(float_layers)
        if not float_layers and adjust_weights:
            return self.all_int8
        gm = copy_sharing_weights(self.stage.graph)
        by_name = {n.name: n for n in gm.graph.nodes}
        float_nodes = frozenset(name for layer in float_layers for name in self.nodes[layer])
        for name in float_nodes:
            _read_float_inputs(by_name[name])
        gm.graph.eliminate_dead_code()
        return self.stage.finish(gm, float_nodes, adjust_weights).graph


def _read_float_inputs(node: torch.fx.Node) -> None:
    """Make `node` read, for each input that passes a quantize-dequantize pair, the pair's float input."""
    for index, arg in enumerate(node.args):
        source = arg.args[0] if isinstance(arg, torch.fx.Node) and arg.args else None
        if isinstance(source, torch.fx.Node) and QDQ_PAIRS.get(source.target) is arg.target:
            node.update_arg(index, source.args[0])


def output_sqnr(reference: Callable, test: Callable, batches: Iterable[tuple]) -> float:
    """SQNR in dB of `test` against `reference` over all batches and outputs together."""
    total = SqnrAccumulator()
    with torch.no_grad():
        for batch in batches:
            for ref, got in zip(pytree.tree_leaves(reference(*batch)), pytree.tree_leaves(test(*batch))):
                total.add(ref, got)
    return total.db


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    sqnr_alone_db: float      # model output SQNR when this layer alone is quantised
    sqnr_in_place_db: float   # this layer's output SQNR inside the fully quantised model


def rank_layers(quantization: RevertibleQuantization, float_gm: torch.fx.GraphModule,
                eval_batches: list[tuple]) -> list[LayerSensitivity]:
    """Every quantised layer, most sensitive first (lowest output SQNR when quantised alone)."""
    names = quantization.layers
    in_place = _per_layer_sqnr(float_gm, quantization.graph(), eval_batches)
    ranking = []
    for name in names:
        alone = quantization.graph([n for n in names if n != name], adjust_weights=False)
        ranking.append(LayerSensitivity(name, output_sqnr(float_gm, alone, eval_batches), in_place.get(name, math.nan)))
    return sorted(ranking, key=lambda s: s.sqnr_alone_db)


def keep_sensitive_in_float(gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple],
                            eval_batches: list[tuple], example_inputs: tuple, min_sqnr_db: float):
    """The fewest most-sensitive layers left in float so the output SQNR reaches `min_sqnr_db`.
    Returns (quantised graph, float layers, achieved SQNR, ranking)."""
    quantization = RevertibleQuantization(gm, setup, calibration, example_inputs)
    ranking = rank_layers(quantization, gm, eval_batches)
    quantized, kept, sqnr = fewest_float_layers(quantization, [s.layer for s in ranking],
                                                lambda candidate: output_sqnr(gm, candidate, eval_batches),
                                                lambda sqnr: sqnr >= min_sqnr_db)
    return quantized, kept, sqnr, ranking


def fewest_float_layers(quantization: RevertibleQuantization, order: list[str],
                        score: Callable[[torch.fx.GraphModule], float], good_enough: Callable[[float], bool]):
    """The quantised graph that keeps the fewest of `order`'s first layers in float and still scores
    `good_enough`. Binary search over how many stay float: the score grows with that count, and all
    of them in float always passes. Returns (quantised graph, float layers, its score)."""
    attempts: dict[int, tuple] = {}  # only the last passing graph is kept: each holds a model's graph

    def passes(k: int) -> bool:
        quantized = quantization.graph(order[:k])
        value = score(quantized)
        if good_enough(value):
            attempts.clear()
            attempts[k] = (quantized, value)
        return good_enough(value)

    low, high = 0, len(order)  # the answer lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid + 1
    if high not in attempts and not passes(high):
        raise RuntimeError("unreachable: every layer in float must pass")  # callers check it first
    quantized, value = attempts[high]
    return quantized, order[:high], value


def _layer_outputs(gm: torch.fx.GraphModule, wanted: dict[str, str], batch: tuple) -> dict[str, torch.Tensor]:
    """Runs `gm` on `batch`; the outputs of the nodes named in `wanted`, keyed by their layer names."""
    seen: dict[str, torch.Tensor] = {}
    watch = {n: partial(seen.__setitem__, wanted[n.name]) for n in gm.graph.nodes if n.name in wanted}
    NodeObserver(gm, watch).run(*batch)
    return seen


def _per_layer_sqnr(float_gm: torch.fx.GraphModule, quantized: torch.fx.GraphModule,
                    batches: list[tuple]) -> dict[str, float]:
    """Output SQNR of each quantised layer's node inside the quantised graph (nodes keep their names)."""
    compute = {n.name: layer_name(n) for n in quantizable_nodes(float_gm, weight_only=False)}
    per_layer: dict[str, SqnrAccumulator] = {}
    with torch.no_grad():
        for batch in batches:
            ref, got = _layer_outputs(float_gm, compute, batch), _layer_outputs(quantized, compute, batch)
            for layer, value in got.items():
                per_layer.setdefault(layer, SqnrAccumulator()).add(ref[layer], value)
    return {layer: accumulator.db for layer, accumulator in per_layer.items()}


@dataclass
class QuantReport:
    """Per-layer SQNR and one-at-a-time sensitivity of a quantised graph, most sensitive first."""
    model_sqnr_db: float
    layers: list[LayerSensitivity]

    def __str__(self) -> str:
        lines = [f"model output SQNR, all layers int8: {self.model_sqnr_db:.1f} dB",
                 "| rank | layer | output SQNR, only this layer int8 (dB) | layer SQNR in the int8 model (dB) |",
                 "|---|---|---|---|"]
        lines += [f"| {i} | {s.layer} | {s.sqnr_alone_db:.1f} | {s.sqnr_in_place_db:.1f} |"
                  for i, s in enumerate(self.layers, start=1)]
        return "\n".join(lines)
