"""`prune`: dependency-aware structured pruning — a smaller dense graph, not a mask.

Channels that must go together (a conv and the batch norm, depthwise conv and consumers
after it; every member of a residual add; a concat's producers at their index ranges;
attention heads through reshape/permute) form a group, found by `prune.groups.analyze`.
Each group keeps `1 - ratio` of its channel units, ranked by `criterion`; weights are
sliced and shape arguments rewritten. A group touched by anything the analysis does not
understand, a model output or an ignored layer is left whole, and the stats say why.
Lossy: fine-tune afterwards.

`criterion=activation` is data-aware (structured Wanda): one pass over the `calibration`
batches measures E[x_c²] where each conv/linear reads channel c, and a channel scores
sqrt(Σ E[x_c²] · ||W_reader[:, c]||₂²) over its readers — the RMS error its removal adds to
them. Weight norms alone miss inputs of very different scales, channels a ReLU keeps dead and
what a batch norm scales.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.fx

from ..analysis.flops import count_cost
from ..analysis.shape_prop import propagate_fake
from ..errors import OptionError
from ..graph_utils import remove_unused_attributes, skipped_forms, weight_layers
from ..pass_base import PassContext, PassResult, ignore_option, option, register_pass
from ..prune import activation_stats
from ..prune.apply import apply_keep
from ..prune.criteria import element_scores, select
from ..prune.groups import Chan, Group, analyze, ignore_matcher
from ..quant.calibration import checked_batches

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = option(0.3, "Share of each group's channels to remove, in [0, 1).")
    criterion: Literal["l1", "l2", "bn_gamma", "activation"] = option(
        "l1", "How channels are ranked: l1 or l2, the norm of the producing layer's weights; bn_gamma, "
              "|gamma| of the batch norm that follows; activation, the RMS of the channel over the "
              "calibration data times the weight norms of the layers reading it (needs calibration data).")
    round_to: int = option(1, "Kept channel counts are rounded up to a multiple of this.")
    global_ranking: bool = option(False, "Rank the channels of all groups against one threshold instead "
                                         "of removing `ratio` of each group.")
    ignore: tuple[str, ...] = ignore_option("keep all their channels")

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"prune option 'ratio' must be in [0, 1); got {self.ratio}")
        if self.round_to < 1:
            raise OptionError(f"prune option 'round_to' must be >= 1; got {self.round_to}")


def _keep_flags(an, groups: list[Group], chosen: dict[int, np.ndarray]) -> np.ndarray:
    keep = np.ones(len(an.parent), dtype=bool)
    for i, group in enumerate(groups):
        kept = set(chosen[i].tolist())
        for j, atom in enumerate(group.atoms):
            if j not in kept:
                keep[atom] = False
    return keep


def _keep_one_everywhere(an, keep: np.ndarray, scores: np.ndarray) -> None:
    """No tensor may lose all its channels (a zero-width conv or split piece): where one would, keep its
    best atom back. Needed when atoms span layers unevenly (e.g. a grouped conv reading a concat)."""
    roots = np.array([an.find(e) for e in range(len(keep))])
    for chan in an.chans.values():
        for c in (chan if isinstance(chan, list) else [chan]):
            if isinstance(c, Chan) and c.ids.size and not keep[c.ids].any():
                best = c.ids.flat[int(np.argmax(scores[c.ids].ravel()))]
                keep[roots == roots[best]] = True


def _removed(groups: list[Group], keep: np.ndarray) -> dict[str, str]:
    """Per pruned group, channels removed from its first layer (the count `ratio` applies to)."""
    removed = {}
    for group in groups:
        if all(keep[s.base:s.base + s.size].all() for s in group.sources):
            continue
        first = group.sources[0]
        kept = int(keep[first.base:first.base + first.size].sum())
        removed[group.name] = f"{first.size - kept} of {first.size} removed"
    return removed


_NEEDED_BY = "prune(criterion=activation)"


def _scores(an, criterion: str, batches: list[tuple] | None, ctx: PassContext, stats: dict) -> np.ndarray:
    """Element scores for `criterion`; the data-aware one first runs the calibration batches."""
    activations = None
    if batches is not None:
        activations = activation_stats.collect(an, batches, ctx.example_inputs, needed_by=_NEEDED_BY)
        stats["calibration_batches"] = activations.batches
    return element_scores(an, criterion, activations)


# after sparsify_24, removed input channels would break its groups of 4; after quantize, weights are no constants
@register_pass("prune", options=PruneOptions, before=("sparsify_24", "quantize"))
def prune(gm: torch.fx.GraphModule, opts: PruneOptions, ctx: PassContext) -> PassResult:
    """Remove channels in dependency groups (conv/linear outputs, heads), leaving a smaller dense graph."""
    # a missing or malformed calibration fails before any work, even where nothing is prunable
    batches = checked_batches(ctx.calibration, ctx.example_inputs, needed_by=_NEEDED_BY) \
        if opts.criterion == "activation" else None
    before = count_cost(gm)
    an = analyze(gm, ignore_matcher(gm, opts.ignore))
    layers = weight_layers(gm)
    skipped = {layer.name: layer.unreachable or "not a prunable layer"
               for layer in layers if layer.node not in an.roles}
    groups = an.groups()
    left_whole = {g.name: "; ".join(g.reasons) for g in groups if g.reasons}
    left_whole.update({g.name: "a single channel unit" for g in groups if not g.reasons and len(g.atoms) < 2})
    prunable = [i for i, g in enumerate(groups) if g.name not in left_whole]
    stats = {"groups": len(groups), "groups_left_whole": len(left_whole), "params_before": before.params,
             "macs_before": before.macs, "criterion": opts.criterion, "calibration_batches": 0}
    chosen = {}
    if opts.ratio > 0 and prunable:
        scores = _scores(an, opts.criterion, batches, ctx, stats)
        picked = select([groups[i] for i in prunable], scores, opts.ratio,
                        opts.round_to, opts.global_ranking)
        chosen = {prunable[k]: v for k, v in picked.items()}
    keep = _keep_flags(an, groups, {i: chosen.get(i, np.arange(len(g.atoms))) for i, g in enumerate(groups)})
    if chosen:
        _keep_one_everywhere(an, keep, scores)
    removed = _removed(groups, keep)
    if not keep.all():
        apply_keep(gm, an, keep)
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        propagate_fake(gm, ctx.example_inputs)
    after = count_cost(gm)
    stats.update({"groups_pruned": len(removed), "params_after": after.params, "macs_after": after.macs,
                  "channels_removed": removed, "left_whole": left_whole, "skipped": skipped})
    if not removed and opts.ratio > 0:
        _warn_nothing_pruned(layers, left_whole, skipped)
    return PassResult(gm, modified=bool(removed), stats=stats)


def _warn_nothing_pruned(layers, left_whole: dict[str, str], skipped: dict[str, str]) -> None:
    """One WARNING: the groups left whole (with their first reasons) and the layers outside any group."""
    if not layers:
        log.warning("prune: the graph has no Linear or conv layer in any form; nothing was pruned")
        return
    reasons = "; ".join(f"{name}: {why}" for name, why in list(left_whole.items())[:3])
    if len(left_whole) > 3:
        reasons += f"; +{len(left_whole) - 3} more"
    log.warning("prune: no group could be pruned; of %d layers with weights, %d groups were left whole (%s); "
                "outside any group: %s", len(layers), len(left_whole), reasons or "-",
                skipped_forms(layers, skipped) or "none")
