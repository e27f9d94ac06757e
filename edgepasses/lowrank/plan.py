"""Per layer: which factorisation, at which rank, and whether it is worth it.

Linear and 1×1 convs have one factorisation (SVD). A k×k conv has two (Tucker-2, spatial); with
`method=auto` each is fitted by the rank criterion, the cheaper one sets a MAC budget, the other is
refitted at the largest rank within it, and the one with the smaller error at that (equal or lower)
cost wins. Error: relative weight error, or with data the relative output error tr(ΔW·G·ΔWᵀ)/tr(W·G·Wᵀ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OptionError
from .factorize import (Factors, Projection, channel_gram, round_rank, spatial_factors, spatial_matrix,
                        svd_factors, tucker_core_projection, tucker_factors, tucker_input_matrix, vertical_gram)
from .layers import Layer, chain_macs, dense_macs


@dataclass(frozen=True)
class Settings:
    criterion: tuple[str, float]   # ("rank" | "ratio" | "energy", value)
    min_saving: float
    round_to: int
    damping: float


@dataclass
class Plan:
    factors: Factors
    macs_before: int
    macs_after: int

    @property
    def saving(self) -> float:
        return 1.0 - self.macs_after / self.macs_before


def _criterion_rank(settings: Settings, full: int, projection: Projection) -> int:
    kind, value = settings.criterion
    if kind == "rank":
        rank = min(int(value), full)
    elif kind == "ratio":
        rank = math.ceil(value * full)
    else:
        rank = projection.rank_for_energy(value)
    return round_rank(rank, full, settings.round_to)


def _descending(start: int, step: int):
    """start, then the multiples of `step` below it, down to 1."""
    yield start
    rank = (start - 1) // step * step
    while rank >= 1:
        yield rank
        rank -= step
    if step > 1 and start > 1:
        yield 1


class _Svd:
    """Linear or 1×1 conv → two layers."""
    name = "svd"

    def __init__(self, layer: Layer, gram, settings: Settings):
        self.layer, self.settings = layer, settings
        weight = layer.weight
        self.projection = Projection(weight.reshape(weight.shape[0], -1), gram, settings.damping)

    @staticmethod
    def max_rank(layer: Layer) -> int:
        return min(layer.weight.shape[:2])

    def convs(self) -> list[dict]:
        plain = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
        return [self.layer.conv(dilation=(1, 1)), plain]  # the first 1×1 keeps stride and padding

    def shapes(self, rank: int) -> list[tuple]:
        out, channels = self.layer.weight.shape[:2]
        return [(rank, channels, 1, 1), (out, rank, 1, 1)]

    def fit(self, rank: int) -> Factors:
        factors = svd_factors(self.layer.weight, self.projection, rank)
        factors.convs = self.convs() if self.layer.is_conv else []
        return factors

    def by_criterion(self) -> Factors:
        return self.fit(_criterion_rank(self.settings, self.projection.full_rank, self.projection))


class _Spatial(_Svd):
    """k×k conv → kh×1 then 1×kw."""
    name = "spatial"

    def __init__(self, layer: Layer, gram, settings: Settings):
        self.layer, self.settings = layer, settings
        channels, kh, kw = layer.weight.shape[1:]
        vertical = None if gram is None else vertical_gram(gram, channels, kh, kw)
        self.projection = Projection(spatial_matrix(layer.weight), vertical, settings.damping)

    @staticmethod
    def max_rank(layer: Layer) -> int:
        out, channels, kh, kw = layer.weight.shape
        return min(channels * kh, out * kw)

    def convs(self) -> list[dict]:
        (sh, sw), (ph, pw), (dh, dw) = self.layer.stride, self.layer.padding, self.layer.dilation
        return [{"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1)},
                {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw)}]

    def shapes(self, rank: int) -> list[tuple]:
        out, channels, kh, kw = self.layer.weight.shape
        return [(rank, channels, kh, 1), (out, rank, 1, kw)]

    def fit(self, rank: int) -> Factors:
        factors = spatial_factors(self.layer.weight, self.projection, rank)
        factors.convs = self.convs()
        return factors

    def within(self, budget: int) -> Factors | None:
        for rank in _descending(self.projection.full_rank, self.settings.round_to):
            if chain_macs(self.layer, self.shapes(rank), self.convs()) <= budget:
                return self.fit(rank)
        return None


class _Tucker:
    """k×k conv → 1×1, k×k core, 1×1."""
    name = "tucker"

    def __init__(self, layer: Layer, gram, settings: Settings):
        self.layer, self.settings, self.gram = layer, settings, gram
        channels, kh, kw = layer.weight.shape[1:]
        self.taps = kh * kw
        in_gram = None if gram is None else channel_gram(gram, channels, self.taps)
        self.in_projection = Projection(tucker_input_matrix(layer.weight), in_gram, settings.damping)

    @staticmethod
    def max_rank(layer: Layer) -> int:
        return max(layer.weight.shape[:2])

    def convs(self) -> list[dict]:
        plain = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
        return [plain, self.layer.conv(), plain]

    def shapes(self, r_in: int, r_out: int) -> list[tuple]:
        out, channels, kh, kw = self.layer.weight.shape
        return [(r_in, channels, 1, 1), (r_out, r_in, kh, kw), (out, r_out, 1, 1)]

    def fit(self, r_in: int, r_out: int | None = None) -> Factors:
        """Tucker-2 at (r_in, r_out); r_out None: by the rank criterion on the output mode."""
        first, out_projection = tucker_core_projection(self.layer.weight, self.in_projection, r_in, self.gram,
                                                       self.settings.damping)
        # The core's output mode has rank at most r_in·kh·kw: a wide conv (out > that) is capped there.
        if r_out is None:
            r_out = _criterion_rank(self.settings, out_projection.full_rank, out_projection)
        r_out = min(r_out, out_projection.full_rank)
        factors = tucker_factors(self.layer.weight, first, self.in_projection.kept_energy(r_in), out_projection,
                                 r_out)
        factors.convs = self.convs()
        return factors

    def by_criterion(self) -> Factors:
        return self.fit(_criterion_rank(self.settings, self.layer.weight.shape[1], self.in_projection))

    def within(self, budget: int, like: tuple[int, int]) -> Factors | None:
        """The largest ranks in the proportion `like` (r_in : r_out) whose chain fits `budget` MACs."""
        out, channels = self.layer.weight.shape[:2]
        for r_out in _descending(like[1], self.settings.round_to):
            r_in = round_rank(math.ceil(r_out * like[0] / like[1]), channels, self.settings.round_to)
            if chain_macs(self.layer, self.shapes(r_in, r_out), self.convs()) <= budget:
                return self.fit(r_in, r_out)
        return None


def methods_for(layer: Layer, method: str) -> list[type] | str:
    """The factorisations to try on `layer`, or why none applies."""
    if not layer.is_conv or layer.kernel == (1, 1):
        return [_Svd]
    if method == "svd":
        return f"a {layer.kernel[0]}x{layer.kernel[1]} conv and method=svd (SVD splits Linear and 1x1 convs only)"
    return {"auto": [_Tucker, _Spatial], "tucker": [_Tucker], "spatial": [_Spatial]}[method]


def check_rank(layer: Layer, methods: list[type], rank: int) -> list[type]:
    """The methods that can reach `rank` on this layer; an OptionError when none can."""
    usable = [m for m in methods if rank <= m.max_rank(layer)]
    if not usable:
        limits = ", ".join(f"{m.name} at most {m.max_rank(layer)}" for m in methods)
        raise OptionError(f"lowrank: rank={rank} is larger than layer {layer.name!r} (weight "
                          f"{tuple(layer.weight.shape)}) allows ({limits}); give a smaller rank, use ratio= or "
                          f"energy= (relative to each layer), or leave the layer out with ignore=[{layer.name!r}]")
    return usable


def relative_error(layer: Layer, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """‖ΔW‖²/‖W‖², or with data tr(ΔW·G·ΔWᵀ)/tr(W·G·Wᵀ): the share of the output energy lost."""
    w = layer.weight.reshape(layer.weight.shape[0], -1).double()
    delta = w - approx.reshape(w.shape).double()
    if gram is None:
        return float(delta.pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
    g = gram.double()
    return float(((delta @ g) * delta).sum() / ((w @ g) * w).sum().clamp(min=1e-30))


def _equal_cost(layer: Layer, fitters: list, fits: list[Factors], gram) -> Factors:
    """Of several methods' fits, the best error once each is brought to the cheapest one's MACs."""
    macs = [chain_macs(layer, [w.shape for w in f.weights], f.convs) for f in fits]
    budget = min(macs)
    candidates = []
    for fitter, fit, cost in zip(fitters, fits, macs):
        if cost > budget:
            fit = fitter.within(budget, fit.rank) if isinstance(fitter, _Tucker) else fitter.within(budget)
        if fit is not None:
            candidates.append(fit)
    return min(candidates, key=lambda f: relative_error(layer, f.approx, gram))


def plan_layer(layer: Layer, methods: list[type], settings: Settings, gram: torch.Tensor | None) -> Plan | str:
    """The factorisation of `layer`, or why it stays whole. `gram`: data-aware input Gram, or None."""
    fitters = [m(layer, gram, settings) for m in methods]
    fits = [f.by_criterion() for f in fitters]
    best = fits[0] if len(fits) == 1 else _equal_cost(layer, fitters, fits, gram)
    plan = Plan(best, dense_macs(layer), chain_macs(layer, [w.shape for w in best.weights], best.convs))
    if plan.saving < settings.min_saving:
        change = f"saves {plan.saving:.0%}" if plan.saving >= 0 else f"adds {-plan.saving:.0%}"
        return (f"best split ({best.method}, rank {_rank_text(best.rank)}) {change} of its MACs, below "
                f"min_saving={settings.min_saving}")
    return plan


def _rank_text(rank) -> str:
    return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)
