"""Calibration observers: ranges, error against min/max, accumulation over batches, the PT2E round trip."""
from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("torchao")
from torchao.quantization.pt2e.observer import ObserverBase, PerChannelMinMaxObserver  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import (  # noqa: E402
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

from edgepasses.quant.observers import CALIBRATION_METHODS, observer_for  # noqa: E402

SCHEMES = {
    "uint8-affine": dict(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine),
    "int8-symmetric": dict(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric),
}
each_scheme = pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
deterministic = settings(derandomize=True, deadline=None, max_examples=10, database=None)
BINS = 2048  # the histogram observers' default


class Sample(NamedTuple):
    bulk: torch.Tensor
    outliers: torch.Tensor

    @property
    def values(self) -> torch.Tensor:
        return torch.cat([self.bulk, self.outliers])


def _generator(draw: st.DrawFn) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


@st.composite
def gaussian_with_outliers(draw: st.DrawFn, outlier_sigmas: tuple[float, float] = (100.0, 1e4),
                           sizes: tuple[int, int] = (2048, 4096), max_outliers: int = 8) -> Sample:
    """A Gaussian bulk of thousands of values plus a few outliers (< 0.4%) far out."""
    generator = _generator(draw)
    size, count = draw(st.integers(*sizes)), draw(st.integers(1, max_outliers))
    sigma, centre = draw(st.floats(1e-2, 1e2)), draw(st.floats(-1.0, 1.0))
    distance = draw(st.floats(*outlier_sigmas))
    signs = torch.randint(0, 2, (count,), generator=generator) * 2 - 1
    outliers = signs * distance * (1 + torch.rand(count, generator=generator))
    return Sample((torch.randn(size, generator=generator) + centre) * sigma, outliers * sigma)


ACTIVATION_SHAPES = (lambda x: x, torch.relu, lambda x: -torch.relu(x), torch.zeros_like)


@st.composite
def activations(draw: st.DrawFn) -> torch.Tensor:
    """Any activation, including one-signed, constant, zero and tiny ones."""
    generator = _generator(draw)
    size = draw(st.integers(1, 4096))
    sigma = draw(st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3]))
    x = torch.randn(size, generator=generator) * sigma + draw(st.floats(-2.0, 2.0))
    return draw(st.sampled_from(ACTIVATION_SHAPES))(x)


@st.composite
def batches_of_changing_range(draw: st.DrawFn) -> list[torch.Tensor]:
    """2-4 batches whose ranges grow, shrink and shift, so the histogram must be re-binned."""
    generator = _generator(draw)
    spreads = draw(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=4))
    centres = draw(st.lists(st.floats(-3.0, 3.0), min_size=len(spreads), max_size=len(spreads)))
    return [torch.randn(draw(st.integers(256, 2048)), generator=generator) * s + c
            for s, c in zip(spreads, centres)]


def calibrated(method: str, scheme: dict, *batches: torch.Tensor, **options) -> ObserverBase:
    observer = observer_for(method, **scheme, **options)()
    for batch in batches:
        assert observer(batch) is batch
    return observer


def qparams(observer: ObserverBase) -> tuple[float, int]:
    scale, zero_point = observer.calculate_qparams()
    return float(scale), int(zero_point)


def representable_range(observer: ObserverBase, scheme: dict) -> tuple[float, float]:
    scale, zero_point = qparams(observer)
    return (scheme["quant_min"] - zero_point) * scale, (scheme["quant_max"] - zero_point) * scale


def quantization_mse(x: torch.Tensor, observer: ObserverBase, scheme: dict) -> float:
    scale, zero_point = qparams(observer)
    quantized = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, scheme["quant_min"], scheme["quant_max"])
    return float(((quantized - x) ** 2).mean())


def histogram_bin_width(x: torch.Tensor, scheme: dict) -> float:
    """Bin width of a histogram observer that saw x: over [0, max|x|] if symmetric, else [min, max]."""
    if scheme["qscheme"] == torch.per_tensor_symmetric:
        return float(x.abs().max()) / BINS
    return float(x.max() - x.min()) / BINS


def fraction(mask: torch.Tensor) -> float:
    return float(mask.double().mean())


@each_scheme
@deterministic
@given(sample=gaussian_with_outliers())
def test_minmax_covers_the_whole_observed_range(scheme, sample):
    x = sample.values
    scale, zero_point = qparams(calibrated("minmax", scheme, x))
    quantized = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, scheme["quant_min"], scheme["quant_max"])
    assert float((quantized - x).abs().max()) <= scale / 2 * (1 + 1e-4)  # rounding only: nothing clipped


@each_scheme
@deterministic
@given(sample=gaussian_with_outliers())
def test_percentile_clips_outliers_and_keeps_the_percentile_of_values(scheme, sample):
    x, percentile = sample.values, 99.0  # outliers are under 0.4% of the values
    observer = calibrated("percentile", scheme, x, percentile=percentile)
    scale, _ = qparams(observer)
    assert scale < qparams(calibrated("minmax", scheme, x))[0] / 5
    low, high = representable_range(observer, scheme)
    slack = histogram_bin_width(x, scheme) + scale  # histogram resolution, zero-point rounding
    kept = percentile / 100
    if scheme["qscheme"] == torch.per_tensor_symmetric:
        assert fraction(x.abs() < high - slack) <= kept <= fraction(x.abs() <= high + slack)
    else:
        assert fraction(x < low - slack) <= 1 - kept <= fraction(x <= low + slack)
        assert fraction(x < high - slack) <= kept <= fraction(x <= high + slack)


@each_scheme
@deterministic
@given(sample=gaussian_with_outliers(outlier_sigmas=(5.0, 1e4)))
def test_mse_quantization_error_is_no_worse_than_minmax(scheme, sample):
    x = sample.values
    minmax_error = quantization_mse(x, calibrated("minmax", scheme, x), scheme)
    # the histogram models values as uniform within each bin; allow for that approximation
    assert quantization_mse(x, calibrated("mse", scheme, x), scheme) <= 1.02 * minmax_error


@each_scheme
@deterministic
# Farther outliers would squeeze the bulk into a bin or two, and with fewer values per outlier
# their share of P outweighs what the bulk loses in Q, so KL rightly keeps them (as TensorRT's does).
@given(sample=gaussian_with_outliers(outlier_sigmas=(20.0, 100.0), sizes=(16384, 16384), max_outliers=4))
def test_entropy_clips_outliers_and_fits_the_bulk_better_than_minmax(scheme, sample):
    x = sample.values
    entropy, minmax = calibrated("entropy", scheme, x), calibrated("minmax", scheme, x)
    low, high = representable_range(entropy, scheme)
    assert float(x.min()) < low or high < float(x.max())
    assert quantization_mse(sample.bulk, entropy, scheme) < quantization_mse(sample.bulk, minmax, scheme)


@each_scheme
@deterministic
@given(batches=batches_of_changing_range())
def test_percentile_of_batches_one_by_one_matches_their_concatenation(scheme, batches):
    everything = torch.cat(batches)
    one_by_one = calibrated("percentile", scheme, *batches, percentile=99.9)
    at_once = calibrated("percentile", scheme, everything, percentile=99.9)
    assert float(one_by_one.histogram.sum()) == pytest.approx(everything.numel())
    levels = scheme["quant_max"] - scheme["quant_min"]
    range_difference = abs(qparams(one_by_one)[0] - qparams(at_once)[0]) * levels
    # each clipping end lands within two bins: one for re-binning, one for the histogram itself
    assert range_difference <= 4 * histogram_bin_width(everything, scheme)


@each_scheme
@deterministic
@given(batches=batches_of_changing_range())
def test_mse_of_batches_one_by_one_matches_their_concatenation(scheme, batches):
    everything = torch.cat(batches)
    one_by_one = calibrated("mse", scheme, *batches)
    at_once = calibrated("mse", scheme, everything)
    assert float(one_by_one.histogram.sum()) == pytest.approx(everything.numel())
    error_one_by_one = quantization_mse(everything, one_by_one, scheme)
    error_at_once = quantization_mse(everything, at_once, scheme)
    assert error_one_by_one == pytest.approx(error_at_once, rel=0.05)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@each_scheme
@settings(derandomize=True, deadline=None, max_examples=8, database=None)
@given(x=activations())
def test_qparams_are_valid(method, scheme, x):
    scale, zero_point = calibrated(method, scheme, x).calculate_qparams()
    assert scale.shape == zero_point.shape == (1,)
    assert float(scale) > 0 and scheme["quant_min"] <= int(zero_point) <= scheme["quant_max"]


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="minmax, percentile, mse, entropy"):
        observer_for("kl", **SCHEMES["int8-symmetric"])


def test_bad_percentile_raises_when_the_constructor_is_built():
    with pytest.raises(ValueError, match="percentile"):
        observer_for("percentile", **SCHEMES["int8-symmetric"], percentile=30.0)


class LinearInputQuantizer(Quantizer):
    """Quantizes the activation and weight inputs of every aten.linear."""

    def __init__(self, activation_spec: QuantizationSpec):
        super().__init__()
        self.activation_spec = activation_spec
        self.weight_spec = QuantizationSpec(
            dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric, ch_axis=0,
            observer_or_fake_quant_ctr=PerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_symmetric))

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.target == torch.ops.aten.linear.default:
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: self.activation_spec, node.args[1]: self.weight_spec},
                    _annotated=True)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


@pytest.fixture(scope="module")
def exported_linear() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.export.export(nn.Linear(8, 4).eval(), (torch.randn(16, 8),)).module()


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@each_scheme
def test_prepare_and_convert_quantize_with_the_observer_qparams(method, scheme, exported_linear):
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(16, 8, generator=generator) for _ in range(3)]
    calibration[1][0, 0] = 40.0  # an outlier for the clipping methods to clip
    spec = QuantizationSpec(observer_or_fake_quant_ctr=observer_for(method, **scheme), **scheme)

    prepared = prepare_pt2e(copy.deepcopy(exported_linear), LinearInputQuantizer(spec))
    for batch in calibration:
        prepared(batch)
    converted = convert_pt2e(prepared)

    quantize = [n for n in converted.graph.nodes
                if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default]
    assert len(quantize) == 1
    scale, zero_point = qparams(calibrated(method, scheme, *calibration))
    assert quantize[0].args[1] == pytest.approx(scale, rel=1e-6)
    assert quantize[0].args[2] == zero_point
