"""Activation calibration observers for the PT2E flow: min/max, percentile, MSE and entropy.

Every observer is a torchao ``UniformQuantizationObserverBase``: ``forward`` records
statistics and returns its input, ``calculate_qparams()`` returns ``(scale, zero_point)``
tensors, so ``prepare_pt2e``/``convert_pt2e`` handle them like torchao's ``MinMaxObserver``.
``observer_for`` builds the constructor a ``QuantizationSpec`` takes.

The histogram observers are per-tensor and keep ``bins`` counts however many batches they
see: the histogram spans the observed range and is re-binned onto the wider range when a
batch exceeds it (counts assumed uniform within a bin). Symmetric schemes histogram |x|
over [0, max|x|], the quantity their range depends on, at twice a signed histogram's
resolution; affine schemes histogram x over [min, max]. Each picks a clipping range from
its histogram and hands it to torchao's ``_calculate_qparams``, as min/max would be.
"""
from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torchao.quantization.pt2e.observer import MinMaxObserver, PartialWrapper, UniformQuantizationObserverBase

__all__ = ["AutoRangeObserver", "CALIBRATION_METHODS", "EntropyObserver", "MSEObserver", "PercentileObserver", "observer_for"]

_PER_TENSOR_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_ENTROPY_EPSILON = 1e-4  # counts; the smoothing constant of TensorRT/MXNet entropy calibration


class _HistogramObserverBase(UniformQuantizationObserverBase):
    """Running histogram of a tensor's values; subclasses choose the clipping range from it."""

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int | None = None,
                 quant_max: int | None = None, factory_kwargs: dict | None = None, **kwargs) -> None:
        if qscheme not in _PER_TENSOR_SCHEMES:
            raise NotImplementedError(f"{type(self).__name__} supports per-tensor schemes only, not {qscheme}")
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max,
                         factory_kwargs=factory_kwargs, **kwargs)
        device = torch.nn.factory_kwargs(factory_kwargs).get("device")
        self.bins = bins
        # float64 keeps counts exact far past float32's 2**24 per bin over long calibrations.
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64, device=device))
        self.register_buffer("min_val", torch.tensor(float("inf"), device=device))
        self.register_buffer("max_val", torch.tensor(float("-inf"), device=device))

    @property
    def _histograms_magnitude(self) -> bool:
        """True when the histogram is of |x| over [0, max|x|], False when of x over [min, max]."""
        return self.qscheme == torch.per_tensor_symmetric

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        x = x_orig.detach().flatten().double()
        x = x[torch.isfinite(x)]  # an infinite range would be useless; quantization clamps these anyway
        if x.numel() == 0:
            return x_orig
        was_observed, previous_domain = self._is_observed(), self._domain()
        batch_min, batch_max = torch.aminmax(x)
        self.min_val.copy_(torch.minimum(self.min_val, batch_min))
        self.max_val.copy_(torch.maximum(self.max_val, batch_max))
        domain = self._domain()
        if was_observed and domain != previous_domain:
            self.histogram.copy_(self._rebinned(previous_domain, domain))
        self.histogram.add_(self._histogram_of(x.abs() if self._histograms_magnitude else x, domain))
        return x_orig

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self._domain()
        if high > low:
            clip_min, clip_max = (self.min_val.new_tensor(v) for v in self._clipping_range())
        else:  # unobserved (torchao warns, returns defaults) or constant input: nothing to clip
            clip_min, clip_max = self.min_val, self.max_val
        return self._calculate_qparams(clip_min, clip_max)

    @abstractmethod
    def _clipping_range(self) -> tuple[float, float]:
        """The (min, max) to quantize to, chosen from the histogram (whose domain is not empty)."""

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}, bins={self.bins}"

    def _is_observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def _domain(self) -> tuple[float, float]:
        """The value range the histogram spans, derived from the running min/max."""
        if self._histograms_magnitude:
            return 0.0, max(-self.min_val.item(), self.max_val.item())
        return self.min_val.item(), self.max_val.item()

    def _edges(self, domain: tuple[float, float]) -> torch.Tensor:
        return torch.linspace(*domain, self.bins + 1, dtype=torch.float64, device=self.histogram.device)

    def _histogram_of(self, values: torch.Tensor, domain: tuple[float, float]) -> torch.Tensor:
        low, high = domain
        bins_per_unit = self.bins / (high - low) if high > low else 0.0
        index = ((values - low) * bins_per_unit).long().clamp_(0, self.bins - 1)
        return torch.bincount(index, minlength=self.bins).to(self.histogram)

    def _rebinned(self, old: tuple[float, float], new: tuple[float, float]) -> torch.Tensor:
        """The recorded counts spread over the wider domain ``new``, each old bin's uniformly."""
        if old[0] == old[1]:  # everything so far was one value
            point = torch.tensor([old[0]], dtype=torch.float64, device=self.histogram.device)
            return self._histogram_of(point, new) * self.histogram.sum()
        cumulative = torch.cat([self.histogram.new_zeros(1), self.histogram.cumsum(0)])
        return _interp(self._edges(new), self._edges(old), cumulative).diff().clamp_(min=0)

    def _quantile(self, fraction: float) -> float:
        """The value below which ``fraction`` of the histogrammed values lie."""
        cumulative = torch.cat([self.histogram.new_zeros(1), self.histogram.cumsum(0)])
        target = cumulative[-1:] * fraction
        return _interp(target, cumulative, self._edges(self._domain())).item()


    def _percentile_range(self, percentile: float) -> tuple[float, float]:
        """Clipped at the `percentile`-th percentile: of |x| for symmetric schemes, of x at both
        ends (`100 - percentile` and `percentile`) for affine ones."""
        fraction = percentile / 100.0
        if self._histograms_magnitude:
            threshold = self._quantile(fraction)
            return -threshold, threshold
        return self._quantile(1.0 - fraction), self._quantile(fraction)

    def _mse_range(self, num_candidates: int) -> tuple[float, float]:
        """Of the observed range shrunk by k/`num_candidates`, the one of least expected squared error."""
        low, high = self._domain()
        shrink = torch.linspace(1.0 / num_candidates, 1.0, num_candidates,
                                dtype=torch.float64, device=self.histogram.device)
        candidate_min = -shrink * high if self._histograms_magnitude else shrink * low
        candidate_max = shrink * high
        scale, zero_point = self._calculate_qparams(candidate_min.float(), candidate_max.float())
        best = int(self._expected_squared_error(scale.double(), zero_point.double()).argmin())
        return candidate_min[best].item(), candidate_max[best].item()

    def _expected_squared_error(self, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Total squared quantization error of the histogram for each candidate (scale, zero_point)."""
        domain = self._domain()
        bin_width = (domain[1] - domain[0]) / self.bins
        scale, zero_point = scale[:, None], zero_point[:, None]
        grid_units = self._edges(domain) / scale + zero_point
        error_integral = _squared_error_antiderivative(grid_units, self.quant_min, self.quant_max)
        # a value uniform in a bin of width w errs on average s**3 / w times the integral (in steps) over it
        mean_error_per_bin = error_integral.diff(dim=1) * scale**3 / bin_width
        return mean_error_per_bin @ self.histogram


class PercentileObserver(_HistogramObserverBase):
    """Clips the range at the ``percentile``-th percentile: of |x| for symmetric schemes, of x
    at both ends (``100 - percentile`` and ``percentile``) for affine ones.

    Accurate to about one bin of the final histogram (two where batches widened the range).
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048, **kwargs) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(bins=bins, **kwargs)
        self.percentile = percentile

    def _clipping_range(self) -> tuple[float, float]:
        return self._percentile_range(self.percentile)


class MSEObserver(_HistogramObserverBase):
    """Picks, among the observed range shrunk by factors k/``num_candidates`` (k = 1..num_candidates,
    so min/max itself is a candidate), the range whose quantization has the least expected
    squared error over the histogram: rounding inside the range plus clipping outside it.

    The error is integrated in closed form with each bin's values uniform within it, so it
    stays exact when the quantization step is finer than a bin. For symmetric schemes the
    |x| histogram is scored as if all values were positive (clipped at ``quant_max``).
    Cost: O(num_candidates * bins) per ``calculate_qparams``.
    """

    def __init__(self, num_candidates: int = 100, bins: int = 2048, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        self.num_candidates = num_candidates

    def _clipping_range(self) -> tuple[float, float]:
        return self._mse_range(self.num_candidates)


class EntropyObserver(_HistogramObserverBase):
    """TensorRT's entropy calibration: the threshold T on |x| that minimises KL(P || Q) between
    the clipped reference histogram P and its quantized version Q.

    Always histograms |x|. Symmetric schemes quantize [-T, T] onto (quant_max - quant_min + 1) // 2
    levels per side; affine schemes clip to [max(min, -T), min(max, T)], and when all values share
    a sign every level lands on one side, so T is then chosen for the full level count.
    Cost: O(bins * levels) per ``calculate_qparams``.
    """

    def __init__(self, bins: int = 2048, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        if bins <= self.quant_max - self.quant_min:
            raise ValueError(f"EntropyObserver needs more bins ({bins}) than quantization levels "
                             f"({self.quant_max - self.quant_min + 1})")

    @property
    def _histograms_magnitude(self) -> bool:
        return True

    def _clipping_range(self) -> tuple[float, float]:
        levels = self._levels_over_magnitude()
        # divergences start at the shortest threshold, one of `levels` bins
        best_bins = levels + int(_kl_divergence_per_threshold(self.histogram, levels).argmin())
        threshold = self._edges(self._domain())[best_bins].item()
        if self.qscheme == torch.per_tensor_symmetric:
            return -threshold, threshold
        return max(self.min_val.item(), -threshold), min(self.max_val.item(), threshold)

    def _levels_over_magnitude(self) -> int:
        """How many quantization levels cover [0, T]."""
        levels = self.quant_max - self.quant_min + 1
        one_signed = self.min_val.item() >= 0 or self.max_val.item() <= 0
        return levels if one_signed and self.qscheme == torch.per_tensor_affine else levels // 2


class AutoRangeObserver(_HistogramObserverBase):
    """Records the histogram and a sample of the tensor, so that the range can be chosen per tensor
    by the error it causes where the tensor is used (`quant.range_choice`): among min/max, the
    99.99th and 99.999th percentiles and the MSE-optimal range of the histogram.

    Entropy is no candidate: it needs a histogram of |x|, the others one of x for affine schemes.
    Until `choose` is called (no sample, or no consumer to score with) the MSE range is used.
    """

    SAMPLE_ELEMENTS = 1 << 20   # leading batch entries kept until this many values (whole entries)

    def __init__(self, bins: int = 2048, **kwargs) -> None:
        super().__init__(bins=bins, **kwargs)
        self.sample: torch.Tensor | None = None
        self.mixed_shapes = False
        self.chosen: str | None = None
        self._candidates: dict[str, tuple[float, float]] | None = None

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        self._keep_sample(x_orig.detach())
        self._candidates = None
        return super().forward(x_orig)

    def _keep_sample(self, x: torch.Tensor) -> None:
        if self.mixed_shapes or x.dim() == 0 or not x.is_floating_point():
            return
        if self.sample is not None and x.shape[1:] != self.sample.shape[1:]:
            # One observer shared by tensors of different shapes (a pool's input and output): no
            # one consumer can score it, so it keeps the MSE range.
            self.sample, self.mixed_shapes = None, True
            return
        kept = 0 if self.sample is None else self.sample.numel()
        entries = (self.SAMPLE_ELEMENTS - kept) // max(1, x[:1].numel())
        if entries > 0:
            part = x[:entries].float().clone()
            self.sample = part if self.sample is None else torch.cat([self.sample, part])

    def candidate_ranges(self) -> dict[str, tuple[float, float]]:
        """The candidates, computed once per histogram (the MSE search is the costly one)."""
        if self._candidates is None:
            self._candidates = {} if not self._domain()[1] > self._domain()[0] else {
                "minmax": (self.min_val.item(), self.max_val.item()),
                "percentile": self._percentile_range(99.99),
                "percentile-99.999": self._percentile_range(99.999),
                "mse": self._mse_range(100)}
        return self._candidates

    def fake_quantize(self, x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
        """`x` quantized and dequantized with the qparams of `value_range`."""
        scale, zero_point = self._calculate_qparams(*(self.min_val.new_tensor(v) for v in value_range))
        return torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point.item()),
                                                     self.quant_min, self.quant_max)

    def choose(self, method: str) -> None:
        self.chosen = method

    def _clipping_range(self) -> tuple[float, float]:
        return self.candidate_ranges()[self.chosen or "mse"]


def _kl_divergence_per_threshold(histogram: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each threshold of i = levels..bins bins (TensorRT entropy calibration).

    P is histogram[:i] with the mass beyond added to its last bin. Q merges histogram[:i] into
    ``levels`` near-equal groups and spreads each group's mass evenly over the bins where P is
    non-zero. Where outliers land past an empty last group, that bin of Q holds
    ``_ENTROPY_EPSILON`` counts, as the classic code's smoothing gives it; thresholds with
    nothing below them score infinity. The sums run per group from prefix sums: O(levels)
    per threshold instead of O(bins).
    """
    bins = histogram.numel()
    zero = histogram.new_zeros(1)
    mass_before = torch.cat([zero, histogram.cumsum(0)])
    nonzero_before = torch.cat([zero, (histogram > 0).to(histogram).cumsum(0)])
    entropy_terms_before = torch.cat([zero, torch.special.xlogy(histogram, histogram).cumsum(0)])
    total = mass_before[-1]

    ends = torch.arange(levels, bins + 1, device=histogram.device)
    group_index = torch.arange(levels + 1, device=histogram.device)
    # group g of threshold i holds bins [ceil(g * i / levels), ceil((g + 1) * i / levels))
    bounds = torch.div(ends[:, None] * group_index + levels - 1, levels, rounding_mode="floor")
    group_mass = mass_before[bounds].diff(dim=1)
    group_support = nonzero_before[bounds].diff(dim=1)
    kept = mass_before[ends]
    outliers = total - kept
    last_bin = histogram[ends - 1] + outliers
    group_support[:, -1] += (histogram[ends - 1] == 0) & (outliers > 0)
    reference_mass = group_mass.clone()
    reference_mass[:, -1] += outliers
    quantized_per_bin = (group_mass / group_support.clamp(min=1)).clamp(min=_ENTROPY_EPSILON)
    quantized_total = kept + _ENTROPY_EPSILON * ((group_mass[:, -1] == 0) & (outliers > 0))

    sum_p_log_p = entropy_terms_before[ends - 1] + torch.special.xlogy(last_bin, last_bin)
    sum_p_log_q = torch.special.xlogy(reference_mass, quantized_per_bin).sum(dim=1)
    # P is normalised by the total, Q by its own total
    divergence = (sum_p_log_p - sum_p_log_q) / total - total.log() + quantized_total.log()
    return torch.where(kept > 0, divergence, math.inf)


def _squared_error_antiderivative(u: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    """An antiderivative of (u - clamp(round(u), quant_min, quant_max))**2, u in quantization steps.

    Inside the levels every whole step contributes 1/12 and the partial one (r**3 + 1/8) / 3 with
    r = u - round(u) (continuous at half-integers whichever way they round); past the end
    levels the error is the squared distance to them.
    """
    inside = u.clamp(quant_min, quant_max)
    nearest = inside.round()
    rounding = nearest / 12 + ((inside - nearest) ** 3 + 0.125) / 3
    below = (u.clamp(max=quant_min) - quant_min) ** 3 / 3
    above = (u.clamp(min=quant_max) - quant_max) ** 3 / 3
    return rounding + below + above


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for non-decreasing ``xp``: piecewise linear, constant past either end."""
    right = torch.searchsorted(xp, x).clamp_(1, xp.numel() - 1)
    left = right - 1
    span = (xp[right] - xp[left]).clamp(min=torch.finfo(xp.dtype).tiny)
    weight = ((x - xp[left]) / span).clamp_(0.0, 1.0)
    return torch.lerp(fp[left], fp[right], weight)


_OBSERVERS: dict[str, type[UniformQuantizationObserverBase]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "auto": AutoRangeObserver,
}
CALIBRATION_METHODS: tuple[str, ...] = tuple(_OBSERVERS)


def observer_for(method: str, *, dtype: torch.dtype, quant_min: int, quant_max: int,
                 qscheme: torch.qscheme, percentile: float = 99.99) -> PartialWrapper:
    """The observer constructor for an activation ``QuantizationSpec.observer_or_fake_quant_ctr``.

    ``percentile`` is used by the "percentile" method only. Bad arguments raise here rather
    than later inside ``prepare_pt2e``.
    """
    if method not in _OBSERVERS:
        raise ValueError(f"unknown calibration method {method!r}; valid methods: {', '.join(CALIBRATION_METHODS)}")
    extra = {"percentile": percentile} if method == "percentile" else {}
    constructor = _OBSERVERS[method].with_args(dtype=dtype, quant_min=quant_min, quant_max=quant_max,
                                               qscheme=qscheme, **extra)
    constructor()  # validates the arguments now
    return constructor
