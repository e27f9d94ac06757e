"""overflow_fix=auto: int16 saturation of u8·s8 neighbouring-channel pair sums, computed on the
calibration sample, and 7-bit weights only for the layers where it costs more than 7-bit rounding."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchao")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from edgepasses.passes.quantize import QuantizeOptions, resolve_setup
from edgepasses.quant import QuantCaps
from edgepasses.quant.calibration import calibrate
from edgepasses.quant.observers import AutoRangeObserver
from edgepasses.quant.overflow import (
    INT16_MAX,
    POSITIONS,
    _rows,
    narrow_saturating_weights,
    saturation_error,
)
from edgepasses.quant.quantizer import EdgeQuantizer, quantize_graph
from edgepasses.quant.range_choice import choose_activation_ranges


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# saturation_error on hand-built codes: rows are (positions, channels, taps) u8 codes, weights
# (outputs, channels, taps) s8 codes; channels 2i and 2i+1 form one int16 pair sum per tap.


def _codes(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def test_full_codes_with_max_weights_of_one_sign_saturate_by_the_exact_excess():
    rows = torch.full((1, 2, 1), 255.0)
    weights = torch.stack([torch.full((2, 1), 127.0), torch.full((2, 1), -127.0)])
    # 255·127 + 255·127 = 64770 is clipped to 32767 (32003 lost); -64770 to -32768 (32002 lost)
    torch.testing.assert_close(saturation_error(rows, weights),
                               torch.tensor([32003.0**2, 32002.0**2], dtype=torch.float64), rtol=0, atol=0)


def test_small_codes_or_opposite_signs_in_a_pair_never_saturate():
    small = torch.full((4, 6, 9), 10.0)
    assert saturation_error(small, torch.full((3, 6, 9), 127.0)).eq(0).all()
    # Opposite signs in each pair: |q_a·w_a + q_b·w_b| <= 255·127 = 32385, whatever the codes;
    # the whole dot product (64770 per two pairs) is far past int16, but it sums in int32.
    full = torch.full((2, 4, 1), 255.0)
    assert saturation_error(full, _codes([127, -127, 127, -127], (1, 4, 1))).eq(0).all()
    # One large weight per pair: 255·127 + 0 fits too
    assert saturation_error(full, _codes([127, 0, 0, 127], (1, 4, 1))).eq(0).all()
    # ...but the same weights paired the other way do not: channels 2i and 2i+1 are the pairs
    assert saturation_error(full[:1], _codes([127, 127, 0, 0], (1, 4, 1))).item() == 32003.0**2


def test_exact_lost_amount_of_a_tiny_case():
    rows = _codes([200, 100, 30, 7], (1, 4, 1))
    weights = _codes([[127, 100, 127, 127],     # 25400 + 10000 = 35400 -> 2633 lost; 3810 + 889 fits
                      [-127, -127, 0, 0],        # -38100 -> -32768: -5332 lost
                      [100, 100, 100, 100]],     # 30000 fits
                     (3, 4, 1))
    expected = torch.tensor([2633.0**2, 5332.0**2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(saturation_error(rows, weights), expected, rtol=0, atol=0)


def test_lost_amounts_add_up_over_pairs_and_taps_per_output_before_squaring_and_over_positions_after():
    # 40 channels (20 pairs: more than one chunk of 16) x 3 taps, every pair sum 64770
    rows, weights = torch.full((2, 40, 3), 255.0), torch.full((1, 40, 3), 127.0)
    per_position = 20 * 3 * (2 * 255 * 127 - INT16_MAX)
    assert saturation_error(rows, weights).item() == 2 * float(per_position) ** 2
    # One position saturating, one not: only the first counts
    rows[1] = 1.0
    assert saturation_error(rows, weights).item() == float(per_position) ** 2


def test_odd_channel_count_pairs_the_last_channel_with_zero():
    rows, weights = torch.full((1, 3, 1), 255.0), torch.full((1, 3, 1), 127.0)
    assert saturation_error(rows, weights).item() == 32003.0**2   # the pair (0, 1) only; 255·127 fits


# ---------------------------------------------------------------------------------------------
# narrow_saturating_weights on calibrated graphs


def _setup(gm, **options):
    options = {"calib": "auto", "bias_correction": "off", **options}
    setup = resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference", gm)
    return dataclasses.replace(setup, overflow_check=True, weight_qmax=127)


def _quantize(model, batches, **options):
    gm = torch.export.export(model, batches[0]).module()
    return quantize_graph(gm, _setup(gm, **options), batches, batches[0])


def _prepared(model, batches, **options):
    """prepare_pt2e'd and calibrated, ranges chosen: where narrow_saturating_weights runs."""
    gm = torch.export.export(model, batches[0]).module()
    prepared = prepare_pt2e(gm, EdgeQuantizer(_setup(gm, **options)))
    calibrate(prepared, batches, batches[0], needed_by="test")
    choose_activation_ranges(prepared)
    return prepared


def _weight_range_by_layer(gm) -> dict[str, tuple[int, int]]:
    # quantized_decomposed.dequantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max, dtype)
    return {user.name: tuple(n.args[4:6]) for n in gm.graph.nodes if "dequantize_per_channel" in str(n.target)
            for user in n.users}


def _equal_sign_weights(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight near the same positive value: neighbouring products add up, near 127 each."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.05 * torch.randn(layer.weight.shape, generator=g))
    return layer


def _alternating_sign_weights(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Input channel 2i positive, 2i+1 negative: no pair sum of u8·s8 codes can leave int16."""
    _equal_sign_weights(layer, seed)
    with torch.no_grad():
        layer.weight[:, 1::2] *= -1
    return layer


class TwoLinears(nn.Module):
    """Two Linears with the same saturation-prone weights, each reading its own input."""

    def __init__(self):
        super().__init__()
        self.high = _equal_sign_weights(nn.Linear(16, 8), seed=0)
        self.low = _equal_sign_weights(nn.Linear(16, 8), seed=1)

    def forward(self, x, y):
        return self.high(x), self.low(y)


def _two_linear_batches(n: int = 3, rows: int = 64) -> list[tuple]:
    batches = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        # ReLU-like activations all in the top half of their range [0, 1]: codes 128..255, so
        # every pair sum is near 2·190·120 > 32767
        x = 0.5 + 0.5 * torch.rand(rows, 16, generator=g)
        # one outlier channel carrying the range, its neighbours tiny: codes 0..255 next to codes
        # 0..1, so no pair sum reaches 256·127 = 32512 (a LayerNorm output with an outlier dim)
        y = 0.004 * torch.rand(rows, 16, generator=g)
        y[:, 0::2] = 0.0
        y[:, 0] = torch.rand(rows, generator=g)
        batches.append((x, y))
    return batches


def test_only_the_linear_whose_pair_sums_saturate_gets_7_bit_weights():
    model, batches = TwoLinears().eval(), _two_linear_batches()
    result = _quantize(model, batches)
    assert result.steps["seven_bit_layers"] == 1
    ranges = _weight_range_by_layer(result.graph)
    assert ranges == {"linear": (-63, 63), "linear_1": (-127, 127)}
    # the narrowed scales are those of a 7-bit grid: max|w| of each row onto 63
    dq = next(n for n in result.graph.graph.nodes if "dequantize_per_channel" in str(n.target)
              and next(iter(n.users)).name == "linear")
    scales = getattr(result.graph, dq.args[1].target)
    torch.testing.assert_close(scales, model.high.weight.abs().amax(1) / 63)
    with torch.no_grad():  # and the graph still computes the model (7-bit weights: ~1% error)
        for got, want in zip(result.graph(*batches[0]), model(*batches[0])):
            torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_narrowing_sets_the_weight_observer_range_before_convert():
    model, batches = TwoLinears().eval(), _two_linear_batches()
    prepared = _prepared(model, batches)
    assert narrow_saturating_weights(prepared) == ["linear"]
    observers = {n.name: getattr(prepared, n.args[1].target) for n in prepared.graph.nodes
                 if n.target is torch.ops.aten.linear.default}
    assert (observers["linear"].quant_min, observers["linear"].quant_max) == (-63, 63)
    assert (observers["linear_1"].quant_min, observers["linear_1"].quant_max) == (-127, 127)
    converted = convert_pt2e(prepared, fold_quantize=False)
    assert _weight_range_by_layer(converted) == {"linear": (-63, 63), "linear_1": (-127, 127)}


def test_the_decision_reads_codes_not_magnitudes():
    # The same activations a thousand times smaller quantize to the same codes: the high-range
    # input still saturates, the outlier-channel one still does not.
    batches = [tuple(t * 1e-3 for t in b) for b in _two_linear_batches()]
    result = _quantize(TwoLinears().eval(), batches)
    assert _weight_range_by_layer(result.graph) == {"linear": (-63, 63), "linear_1": (-127, 127)}


def test_symmetric_int8_activations_are_shifted_to_u8_codes():
    # int8 codes near +127 are u8 codes near 255 in the kernel: the high-range input saturates
    result = _quantize(TwoLinears().eval(), _two_linear_batches(), symmetric=True)
    assert _weight_range_by_layer(result.graph)["linear"] == (-63, 63)


class StridedConvThenDepthwise(nn.Module):
    def __init__(self, saturating: bool):
        super().__init__()
        weights = _equal_sign_weights if saturating else _alternating_sign_weights
        self.conv = weights(nn.Conv2d(3, 8, 3, stride=2, padding=1))
        self.depthwise = _alternating_sign_weights(nn.Conv2d(8, 8, 3, padding=1, groups=8))

    def forward(self, x):
        return self.depthwise(torch.relu(self.conv(x)))


@pytest.mark.parametrize("saturating", [True, False])
def test_strided_padded_conv_is_checked_and_depthwise_conv_gets_7_bits(saturating):
    g = torch.Generator().manual_seed(0)
    batches = [(0.5 + 0.5 * torch.rand(2, 3, 16, 16, generator=g),) for _ in range(2)]
    result = _quantize(StridedConvThenDepthwise(saturating).eval(), batches)
    # the strided conv: checked on its patches; the depthwise conv: not checkable (grouped), so
    # 7-bit even though its weights alternate in sign
    expected = {"conv2d": (-63, 63) if saturating else (-127, 127), "conv2d_1": (-63, 63)}
    assert _weight_range_by_layer(result.graph) == expected
    assert result.steps["seven_bit_layers"] == 1 + saturating


def test_layer_reading_a_pool_with_a_shared_quantizer_gets_7_bits():
    # The pool's input and output share one observer, which keeps no sample (two shapes): nothing
    # shows the second conv safe, so it is narrowed even with weights that cannot saturate.
    torch.manual_seed(0)
    model = nn.Sequential(_alternating_sign_weights(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2),
                          _alternating_sign_weights(nn.Conv2d(8, 4, 3))).eval()
    batches = [(torch.rand(2, 3, 8, 8),) for _ in range(2)]
    result = _quantize(model, batches)
    assert _weight_range_by_layer(result.graph) == {"conv2d": (-127, 127), "conv2d_1": (-63, 63)}


class PaddedConv(nn.Module):
    """A conv whose pair sums saturate at one pixel; `explicit` pads with F.pad instead of the conv's
    own padding: the same function, the same codes in the kernel."""

    def __init__(self, explicit: bool):
        super().__init__()
        self.explicit = explicit
        self.conv = nn.Conv2d(2, 1, 3, padding=0 if explicit else 1, bias=False)
        with torch.no_grad():
            self.conv.weight[0, 0] = 1.0        # code 127
            self.conv.weight[0, 1] = 7 / 127    # code 7: 255·(127 + 7) = 34170 saturates; 7-bit code 3.47
        # rounds to 3, an error of half a 7-bit step on every tap of channel 1

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 1, 1)) if self.explicit else x)


def _padded_conv_batches() -> list[tuple]:
    x = torch.zeros(16, 2, 8, 8)
    x[0, :, 4, 4] = 1.0   # codes 255 in both channels: 9 output positions saturate by 1403 codes
    x[1, :, 2, 2] = -1.0  # the range [-1, 1]: zero point 127, so real zeros are codes 127
    return [(x,)]


def test_explicitly_padded_conv_with_a_saturating_pixel_is_narrowed():
    result = _quantize(PaddedConv(explicit=True).eval(), _padded_conv_batches())
    assert result.steps == {"ranges": {"minmax": 1}, "seven_bit_layers": 1}


def test_conv_padding_counts_as_real_zeros_like_explicit_padding():
    result = _quantize(PaddedConv(explicit=False).eval(), _padded_conv_batches())
    assert result.steps == {"ranges": {"minmax": 1}, "seven_bit_layers": 1}


def _head(flatten: bool) -> nn.Module:
    torch.manual_seed(0)
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if flatten else [Mean()]
    return nn.Sequential(_alternating_sign_weights(nn.Conv2d(3, 8, 3)), nn.ReLU(), *pool,
                         _alternating_sign_weights(nn.Linear(8, 4))).eval()


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def _head_ranges(flatten: bool) -> dict[str, tuple[int, int]]:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(4, 3, 8, 8, generator=g),) for _ in range(2)]
    return _weight_range_by_layer(_quantize(_head(flatten), batches).graph)


def test_classifier_head_linear_reading_the_average_directly_is_checked():
    # weights of alternating sign cannot saturate: both layers keep 8 bits
    assert _head_ranges(flatten=False) == {"conv2d": (-127, 127), "linear": (-127, 127)}


def test_classifier_head_linear_reading_the_average_through_flatten_is_checked():
    assert _head_ranges(flatten=True) == {"conv2d": (-127, 127), "linear": (-127, 127)}


def test_layers_whose_input_kept_no_sample_get_7_bits():
    # calib=minmax keeps no sample: every layer is narrowed (nothing shows any safe)
    model, batches = TwoLinears().eval(), _two_linear_batches()
    prepared = _prepared(model, batches, calib="minmax")
    assert not any(isinstance(m, AutoRangeObserver) for m in prepared.modules())
    assert sorted(narrow_saturating_weights(prepared)) == ["linear", "linear_1"]


# ---------------------------------------------------------------------------------------------
# The check's shortcuts: the patches of the kept positions only, the pair sums only where they can
# saturate; the same numbers as unfolding every patch and summing every pair.

class _Conv:
    """A stand-in conv node: `_rows` reads its target and stride/padding/dilation arguments."""

    def __init__(self, stride, padding, dilation):
        self.target, self.args = torch.ops.aten.conv2d.default, (None, None, None, stride, padding, dilation)


@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", [
    ((3, 5, 9, 7), (3, 3), [1, 1], [1, 1], [1, 1]),
    ((2, 8, 12, 12), (3, 3), [2, 2], [0, 0], [2, 2]),
    ((16, 4, 16, 16), (3, 1), [1, 2], [1, 0], [1, 1]),   # past POSITIONS: every step-th patch
    ((1, 3, 5, 5), (1, 1), [1, 1], [0, 0], [1, 1]),
])
def test_conv_rows_are_every_step_th_patch_of_unfold(shape, kernel, stride, padding, dilation):
    values = torch.rand(shape)
    weight = torch.randn(6, shape[1], *kernel)
    rows, flat = _rows(_Conv(stride, padding, dilation), values, weight)
    patches = F.unfold(values, kernel, dilation=dilation, padding=padding, stride=stride)
    patches = patches.transpose(1, 2).reshape(-1, shape[1], kernel[0] * kernel[1])
    expected = patches[::max(1, patches.shape[0] // POSITIONS)]
    assert rows.shape[0] <= 2 * POSITIONS
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    torch.testing.assert_close(flat, weight.flatten(2), rtol=0, atol=0)


def _every_pair_sum_saturation_error(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """saturation_error computed the plain way: every pair sum of every position, tap and output."""
    if rows.shape[1] % 2:
        rows, weights = F.pad(rows, (0, 0, 0, 1)), F.pad(weights, (0, 0, 0, 1))
    sums = torch.einsum("pcjt,ocjt->pcto", rows.double().unflatten(1, (-1, 2)), weights.double().unflatten(1, (-1, 2)))
    lost = (sums - sums.clamp(-INT16_MAX - 1, INT16_MAX)).sum(dim=(1, 2))
    return lost.square().sum(0)


@pytest.mark.parametrize("channels, taps, dense", [(33, 9, 0.3), (64, 1, 1.0), (16, 9, 0.05)])
def test_saturation_error_equals_the_sum_over_every_pair(channels, taps, dense):
    g = torch.Generator().manual_seed(channels)
    rows = torch.randint(0, 256, (200, channels, taps), generator=g).float()
    rows *= torch.rand(rows.shape, generator=g) < dense   # most codes zero, as after a ReLU
    weights = torch.randint(-127, 128, (12, channels, taps), generator=g).float()
    expected = _every_pair_sum_saturation_error(rows, weights)
    assert expected.sum() > 0
    torch.testing.assert_close(saturation_error(rows, weights), expected, rtol=0, atol=0)
