"""Which layers int8 hurts: per-layer output SQNR, one-at-a-time sensitivity, and keeping
the fewest most-sensitive layers in float to meet an SQNR budget.

All of it re-runs the same PT2E quantization with different ignore lists, so what is
measured is exactly what the quantize pass produces.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..analysis.observe import NodeObserver
from ..analysis.sqnr import SqnrAccumulator
from ..graph_utils import copy_sharing_weights, layer_name
from .quantizer import QuantSetup, quantizable_nodes, quantize_graph


def quantize_copy(gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple],
                  example_inputs: tuple) -> torch.fx.GraphModule:
    """Quantise a copy of `gm` (prepare_pt2e rewrites its input in place)."""
    return quantize_graph(copy_sharing_weights(gm), setup, calibration, example_inputs).graph


def output_sqnr(reference: Callable, test: Callable, batches: Iterable[tuple]) -> float:
    """SQNR in dB of `test` against `reference` over all batches and outputs together."""
    total = SqnrAccumulator()
    with torch.no_grad():
        for batch in batches:
            for ref, got in zip(pytree.tree_leaves(reference(*batch)), pytree.tree_leaves(test(*batch))):
                total.add(ref, got)
    return total.db


def _only(setup: QuantSetup, float_layers: Iterable[str]) -> QuantSetup:
    return dataclasses.replace(setup, ignore=setup.ignore + tuple(re.escape(n) for n in float_layers))


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    sqnr_alone_db: float      # model output SQNR when this layer alone is quantised
    sqnr_in_place_db: float   # this layer's output SQNR inside the fully quantised model


def layer_names(gm: torch.fx.GraphModule, setup: QuantSetup) -> list[str]:
    patterns = [re.compile(p) for p in setup.ignore]
    names = [layer_name(n) for n in quantizable_nodes(gm, setup.weight_only, setup.embeddings)]
    return [n for n in names if not any(p.fullmatch(n) for p in patterns)]


def rank_layers(gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple],
                eval_batches: list[tuple], example_inputs: tuple) -> list[LayerSensitivity]:
    """Every quantisable layer, most sensitive first (lowest output SQNR when quantised alone)."""
    names = layer_names(gm, setup)
    quantized = quantize_copy(gm, setup, calibration, example_inputs)
    in_place = _per_layer_sqnr(gm, quantized, eval_batches)
    ranking = []
    for name in names:
        alone = quantize_copy(gm, _only(setup, [n for n in names if n != name]), calibration, example_inputs)
        ranking.append(LayerSensitivity(name, output_sqnr(gm, alone, eval_batches), in_place.get(name, math.nan)))
    return sorted(ranking, key=lambda s: s.sqnr_alone_db)


def keep_sensitive_in_float(gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple],
                            eval_batches: list[tuple], example_inputs: tuple, min_sqnr_db: float):
    """The fewest most-sensitive layers left in float so the output SQNR reaches `min_sqnr_db`.
    Returns (quantised graph, float layers, achieved SQNR, ranking)."""
    ranking = rank_layers(gm, setup, calibration, eval_batches, example_inputs)
    quantized, kept, sqnr = fewest_float_layers(gm, setup, calibration, example_inputs, [s.layer for s in ranking],
                                                lambda candidate: output_sqnr(gm, candidate, eval_batches),
                                                lambda sqnr: sqnr >= min_sqnr_db)
    return quantized, kept, sqnr, ranking


def fewest_float_layers(gm: torch.fx.GraphModule, setup: QuantSetup, calibration: list[tuple], example_inputs: tuple,
                        order: list[str], score: Callable[[torch.fx.GraphModule], float],
                        good_enough: Callable[[float], bool]):
    """The quantised graph that keeps the fewest of `order`'s first layers in float and still scores
    `good_enough`. Binary search over how many stay float: the score grows with that count, and all
    of them in float always passes. Returns (quantised graph, float layers, its score)."""
    attempts: dict[int, tuple] = {}  # only the last passing graph is kept: each holds a model's graph

    def passes(k: int) -> bool:
        quantized = quantize_copy(gm, _only(setup, order[:k]), calibration, example_inputs)
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
