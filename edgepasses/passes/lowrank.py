"""`lowrank`: replace a weight by a product of smaller factors where that saves MACs.

Linear and 1×1 conv: two layers through a truncated SVD. k×k conv: a Tucker-2 chain
(1×1 → k×k core → 1×1) or a spatial split (k×1 → 1×k), chosen per layer by error at equal
MACs (`method=auto`) or by option; a 1×k conv (a conv1d, in the canonical conv2d form) by the
spatial split alone (1×1 → 1×k). The rank comes from exactly one of `rank`, `ratio` (of each
layer's full rank) or `energy` (kept singular-value energy; the default, 0.9), rounded up to a
multiple of `round_to`; a layer is split only when its MACs fall by at least `min_saving`.

Data-aware (with calibration data, or `data_aware=true`): each weight is factorised under its input
Gram G = Σ x·xᵀ (SVD-LLM style whitening), which minimises the output error over the data instead
of the weight error — inputs with a few strong directions keep far more accuracy at the same rank.
Convs use the im2col Gram: exactly for 1×1 convs and Tucker's output mode, its per-channel block sum
for Tucker's input mode, and its vertical-patch blocks for the spatial split.

Lossy: stats give each split layer's output SQNR on the calibration (or example) inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from ..analysis.flops import count_cost
from ..analysis.shape_prop import propagate_fake
from ..errors import OptionError
from ..graph_utils import inputs_have_values, remove_unused_attributes, warn_nothing_reached, weight_layer_ignore, \
    weight_layers
from ..lowrank.layers import collect_input_stats, find_layers, output_sqnr_db, replace_with_chain
from ..lowrank.plan import Plan, Settings, check_rank, methods_for, plan_layer
from ..pass_base import PassContext, PassResult, ignore_option, option, register_pass

log = logging.getLogger("edgepasses")

DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class LowRankOptions:
    rank: int | None = option(None, "One rank for every layer (Tucker-2: for both modes, each capped at its "
                                    "full rank). Give at most one of rank, ratio and energy.")
    ratio: float | None = option(None, "The rank as a share of each layer's full rank, in (0, 1].")
    energy: float | None = option(None, "The share of singular-value energy kept, in (0, 1] (data-aware: of "
                                        f"the layer's output on the data); {DEFAULT_ENERGY} when none of rank, "
                                        "ratio and energy is given.")
    min_saving: float = option(0.25, "Split a layer only where its MACs fall by at least this share "
                                     "(negative: they may grow).")
    method: Literal["auto", "svd", "tucker", "spatial"] = option(
        "auto", "How k×k convs split: tucker (1×1, k×k core, 1×1), spatial (k×1 then 1×k), svd (not at all: "
                "SVD splits only Linear layers and 1×1 convs, which always use it), or auto (the one with "
                "less error at equal MACs).")
    round_to: int = option(8, "Ranks are rounded up to a multiple of this (SIMD widths).")
    data_aware: bool | None = option(None, "Minimize the layer's output error over the calibration data "
                                           "instead of the weight error; none: when calibration data is given.")
    damping: float = option(0.01, "Data-aware: added to the input Gram's diagonal, as a share of its mean.")
    ignore: tuple[str, ...] = ignore_option("are left as they are")

    def __post_init__(self):
        given = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise OptionError(f"lowrank takes one of rank, ratio or energy; got {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise OptionError(f"lowrank option 'rank' must be >= 1; got {self.rank}")
        for key in ("ratio", "energy"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise OptionError(f"lowrank option {key!r} must be in (0, 1]; got {value}")
        if self.min_saving >= 1.0:
            raise OptionError(f"lowrank option 'min_saving' must be below 1; got {self.min_saving}")
        if self.round_to < 1:
            raise OptionError(f"lowrank option 'round_to' must be >= 1; got {self.round_to}")
        if self.damping < 0:
            raise OptionError(f"lowrank option 'damping' must be >= 0; got {self.damping}")

    @property
    def criterion(self) -> tuple[str, float]:
        for key in ("rank", "ratio", "energy"):
            if getattr(self, key) is not None:
                return key, getattr(self, key)
        return "energy", DEFAULT_ENERGY


def _one_dimensional(layer, methods):
    """A 1×k conv (a conv1d in the canonical conv2d form) splits spatially, into 1×1 then 1×k: Tucker-2's
    core would be a 1×k conv between two 1×1s, and its output rank can exceed what that core holds."""
    if isinstance(methods, str) or not layer.is_conv or layer.kernel[0] != 1 or layer.kernel[1] == 1:
        return methods
    spatial = [m for m in methods if m.name != "tucker"]
    return spatial or (f"a 1x{layer.kernel[1]} conv (conv1d) splits spatially only (1x1 then 1x{layer.kernel[1]}); "
                       "use method=auto or method=spatial")


def _layer_stats(plan: Plan, sqnr: float | None) -> dict:
    rank = plan.factors.rank
    return {"method": plan.factors.method, "rank": list(rank) if isinstance(rank, tuple) else rank,
            "energy": round(plan.factors.energy, 4), "macs_before": plan.macs_before,
            "macs_after": plan.macs_after, "sqnr_db": None if sqnr is None else round(sqnr, 2)}


# after sparsify_24, the factors of a 2:4 weight would be dense; after quantize, weights are no constants
@register_pass("lowrank", options=LowRankOptions, before=("sparsify_24", "quantize"))
def lowrank(gm: torch.fx.GraphModule, opts: LowRankOptions, ctx: PassContext) -> PassResult:
    """Split Linear/conv weights into low-rank factor chains (SVD, Tucker-2, spatial) where MACs fall."""
    data_aware = ctx.calibration is not None if opts.data_aware is None else opts.data_aware
    settings = Settings(opts.criterion, opts.min_saving, opts.round_to, opts.damping)
    layers, skipped = find_layers(gm, weight_layer_ignore(gm, opts.ignore, where="lowrank"))
    candidates = []
    for layer in layers:
        methods = _one_dimensional(layer, methods_for(layer, opts.method))
        if isinstance(methods, str):
            skipped[layer.name] = methods
            continue
        if settings.criterion[0] == "rank":
            methods = check_rank(layer, methods, opts.rank)
        candidates.append((layer, methods))
    before = count_cost(gm)
    # The Gram is measured whenever there are values: data-aware factorisation needs it, and it gives
    # each split's output SQNR (on the example inputs when data-blind).
    inputs = {}
    if data_aware or inputs_have_values(ctx.example_inputs):
        batches = ctx.calibration if data_aware else [ctx.example_inputs]
        inputs = collect_input_stats(gm, [layer for layer, _ in candidates], batches, ctx.example_inputs,
                                     needed_by="lowrank(data_aware=true)" if opts.data_aware else "lowrank")
    split = {}
    for layer, methods in candidates:
        stats = inputs.get(layer.node)
        plan = plan_layer(layer, methods, settings, stats.gram if data_aware else None)
        if isinstance(plan, str):
            skipped[layer.name] = plan
            continue
        sqnr = None if stats is None else output_sqnr_db(layer, plan.factors.approx, stats)
        split[layer.name] = _layer_stats(plan, sqnr)
        replace_with_chain(gm, layer, plan.factors)
    if split:
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        propagate_fake(gm, ctx.example_inputs)
    else:
        warn_nothing_reached(log, "lowrank", "split", weight_layers(gm), skipped)
    after = count_cost(gm)
    return PassResult(gm, modified=bool(split), stats={
        "layers_split": len(split), "data_aware": data_aware, "macs_before": before.macs,
        "macs_after": after.macs, "params_before": before.params, "params_after": after.params,
        "layers": split, "skipped": skipped})
