"""Channel importance and the choice of what each group keeps.

Scores are per channel element; an atom scores the mean of its elements (a channel shuffle ties
channels into units of unequal size: by sums the small units would always go first). Each layer's scores
are divided by their mean first, so layers of different scale weigh equally inside a group
and scores compare across groups (global ranking).

`l1`/`l2` rank by the producer's weight rows, `bn_gamma` by the batch norm the channels pass
through, `activation` by what the channel contributes to the layers that read it (structured
Wanda: the RMS of x_c over calibration data times ||W_reader[:, c]||₂, as energies summed over
readers and positions).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import OptionError
from ..graph_utils import constant_value
from .activation_stats import ActivationStats
from .groups import Analysis, Group


def _normalised(score: torch.Tensor) -> np.ndarray:
    score = score.double()
    mean = score.mean()
    return (score / mean if mean > 0 else score).numpy()


def _weight_norms(weight: torch.Tensor, criterion: str) -> torch.Tensor:
    flat = weight.detach().flatten(1)
    return flat.abs().sum(1) if criterion == "l1" else flat.pow(2).sum(1).sqrt()


def element_scores(an: Analysis, criterion: str, activations: ActivationStats | None = None) -> np.ndarray:
    """Importance of every channel element. `bn_gamma`: |gamma| of the batch norms the channels pass
    through; `activation` (needs `activations`): contribution to the layers reading them. Layers
    that meet no batch norm (e.g. after fold_bn) or no measured reader fall back to l1."""
    scores = np.zeros(len(an.parent))
    seen = np.zeros(len(an.parent), dtype=bool)
    if criterion == "bn_gamma":
        _bn_gamma(an, scores, seen)
    elif criterion == "activation":
        if activations is None:
            raise ValueError("criterion 'activation' needs the calibration statistics (activation_stats.collect)")
        _activation(an, activations, scores, seen)
    for src in an.sources:
        if src.node is None or seen[src.base:src.base + src.size].any():
            continue
        weight = constant_value(an.gm, src.node.args[1])
        scores[src.base:src.base + src.size] += _normalised(_weight_norms(weight, "l2" if criterion == "l2" else "l1"))
    return scores


def _bn_gamma(an: Analysis, scores: np.ndarray, seen: np.ndarray) -> None:
    for node, (kind, _) in an.roles.items():
        gamma = constant_value(an.gm, node.args[1]) if kind == "bn" else None
        chan = an.chans.get(node.args[0])
        if gamma is not None and chan is not None:
            np.add.at(scores, chan.ids, _normalised(gamma.abs()))
            seen[chan.ids] = True


def _activation(an: Analysis, stats: ActivationStats, scores: np.ndarray, seen: np.ndarray) -> None:
    """sqrt(Σ E[x_c²] · ||W[:, c]||₂²) over readers and positions: the RMS error removing the channel
    adds to what reads it. Summed per union class (a residual stream's channel is one class of every
    producer writing it), shared equally by the class's elements, normalised per layer."""
    roots = np.array([an.find(e) for e in range(len(an.parent))], dtype=np.int64)
    total = np.zeros(len(roots))
    measured = np.zeros(len(roots), dtype=bool)
    for read in stats.reads:
        mean_square = stats.mean_square[read.input]
        norms = read.column_norms(constant_value(an.gm, read.layer.args[1])).numpy()
        np.add.at(total, roots[read.chan.ids], mean_square * norms ** 2)
        measured[roots[read.chan.ids]] = True
    share = np.sqrt(total[roots]) / np.bincount(roots, minlength=len(roots))[roots]
    for src in an.sources:
        span = slice(src.base, src.base + src.size)
        if src.node is not None and measured[roots[span]].any():
            scores[span] += _normalised(torch.from_numpy(share[span]))
            seen[span] = True


def atom_scores(group: Group, scores: np.ndarray) -> np.ndarray:
    return np.array([scores[a].mean() for a in group.atoms])


def kept_atoms(group: Group, ratio: float, round_to: int) -> int:
    """How many atoms `group` keeps: (1 - ratio) of them, rounded so the first layer's channel count
    is a multiple of `round_to` where that is reachable."""
    n = len(group.atoms)
    keep = math.floor((1.0 - ratio) * n + 0.5)
    if keep == 0:
        raise OptionError(f"prune ratio {ratio} would leave 0 of {n} channel units in group {group.name!r}; "
                          f"use a ratio below {1 - 0.5 / n:.3f} or add the layer to `ignore`")
    return _round(keep, n, group.atom_width(), round_to)


def _round(keep: int, n: int, width: int, round_to: int) -> int:
    step = round_to // math.gcd(width, round_to) if round_to > 1 else 1
    return min(n, math.ceil(keep / step) * step)


def select(groups: list[Group], scores: np.ndarray, ratio: float, round_to: int,
           global_ranking: bool) -> dict[int, np.ndarray]:
    """Per prunable group (by index), the atom indices it keeps, best first."""
    ranked = {i: atom_scores(g, scores) for i, g in enumerate(groups)}
    counts = {i: kept_atoms(g, ratio, round_to) for i, g in enumerate(groups)}
    if global_ranking and ranked:
        counts = _global_counts(groups, ranked, ratio, round_to)
    return {i: np.argsort(-ranked[i], kind="stable")[:counts[i]] for i in ranked}


def _global_counts(groups, ranked, ratio, round_to) -> dict[int, int]:
    """Rank every atom by its score relative to its group's mean and drop the lowest `ratio` of them
    all (ties spread evenly over groups); each group keeps at least one."""
    rel = {i: s / s.mean() if s.mean() > 0 else s for i, s in ranked.items()}
    owners = np.concatenate([np.full(len(r), i) for i, r in rel.items()])
    # equal scores (e.g. untrained batch norms): spread the cut evenly over the groups
    spread = np.concatenate([np.arange(len(r)) / len(r) for r in rel.values()])
    order = np.lexsort((spread, np.round(np.concatenate(list(rel.values())), 9)))
    dropped = np.bincount(owners[order[:int(ratio * len(order))]], minlength=max(rel) + 1)
    return {i: _round(max(1, len(r) - int(dropped[i])), len(r), groups[i].atom_width(), round_to)
            for i, r in rel.items()}
