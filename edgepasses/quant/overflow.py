"""7-bit weights only where int8 sums would really saturate (`overflow_fix=auto`).

x86 CPUs without VNNI multiply u8 activations by s8 weights with `vpmaddubsw`, which adds each
pair of neighbouring products (input channels 2i and 2i+1) into a saturating int16: where
q_a·w_a + q_b·w_b leaves [-32768, 32767] the result is silently clipped. Weights in [-63, 63]
can never saturate, but lose a bit of precision on every layer. Instead, each layer's pair sums
are computed on the calibration sample its input observer kept, with the activation and weight
codes calibration chose, and a layer gets 7-bit weights only where the error saturation adds to
its outputs exceeds the error 7-bit rounding would add.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..graph_utils import CONV_OPS, LINEAR_OPS, constant_value, conv_args, through_reshapes
from .observers import AutoRangeObserver

INT16_MAX = 32767
SEVEN_BIT = 63
POSITIONS = 256         # input rows (linear) or patches (conv) checked per layer: the pair sums cost
                        # positions x channels x taps x outputs


def _pair(value) -> tuple[int, int]:
    return tuple(value) * (2 // len(value)) if isinstance(value, (list, tuple)) else (value, value)


def _rows(layer: torch.fx.Node, codes: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions x channels x taps) activations and (out x channels x taps) weights: the kernel pairs
    neighbouring channels at the same tap."""
    if layer.target in LINEAR_OPS:  # (its input may be read through a reshape: a classifier's flatten)
        return codes.reshape(-1, weight.shape[1], 1), weight.unsqueeze(-1)
    kernel = weight.shape[2:]
    stride, padding, dilation = (_pair(layer.args[i]) if len(layer.args) > i else default
                                 for i, default in ((3, (1, 1)), (4, (0, 0)), (5, (1, 1))))
    patches = F.unfold(codes, kernel, dilation=dilation, padding=padding, stride=stride)  # N, C*taps, L
    patches = patches.transpose(1, 2).reshape(-1, weight.shape[1], kernel.numel())
    return patches, weight.flatten(2)


def _pair_sums(rows: torch.Tensor, weights: torch.Tensor):
    """Each chunk of neighbouring-channel pair sums, positions x pairs x taps x outputs, skipping the
    chunks whose largest codes times the weights cannot leave int16 (most of them)."""
    if rows.shape[1] % 2:  # an odd channel count: the last channel pairs with zero padding
        rows, weights = F.pad(rows, (0, 0, 0, 1)), F.pad(weights, (0, 0, 0, 1))
    pairs_x, pairs_w = rows.unflatten(1, (-1, 2)), weights.unflatten(1, (-1, 2))
    largest = pairs_x.abs().amax(0)                 # pairs x 2 x taps
    for start in range(0, pairs_x.shape[1], 16):    # a few channel pairs at a time bounds the memory
        chunk = slice(start, start + 16)
        if torch.einsum("cjt,ocjt->cto", largest[chunk], pairs_w[:, chunk].abs()).max() > INT16_MAX:
            yield torch.einsum("pcjt,ocjt->pcto", pairs_x[:, chunk], pairs_w[:, chunk])


def saturation_error(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per output channel, the squared error (in code units) int16 saturation of the pair sums of
    u8 `rows` and s8 `weights` adds to the layer's outputs, summed over the positions."""
    lost = torch.zeros(rows.shape[0], weights.shape[0], dtype=torch.float64)
    for sums in _pair_sums(rows.float(), weights.float()):  # integers below 2**24: exact in float32
        lost += (sums - sums.clamp(-INT16_MAX - 1, INT16_MAX)).sum(dim=(1, 2)).double()
    return lost.square().sum(0)


def _rounding_error(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per output channel, the squared output error of `weight` rounded to [-qmax, qmax] at `scale`."""
    codes = torch.clamp(torch.round(weight / scale), -qmax, qmax)
    error = torch.einsum("pct,oct->po", rows.double(), (codes * scale - weight).double())
    return error.square().sum(0)


def _seven_bit_is_better(layer: torch.fx.Node, act: AutoRangeObserver, weight_observer, weight: torch.Tensor) -> bool:
    """Whether 7-bit weights cost the layer's outputs less than the saturation of 8-bit ones does."""
    act_scale, zero_point = act.calculate_qparams()
    codes = torch.clamp(torch.round(act.sample / act_scale) + zero_point, act.quant_min, act.quant_max)
    # The kernel multiplies u8 codes (s8 ones shifted by 128); the zero point is compensated after.
    rows, flat_weight = _rows(layer, codes - act.quant_min, weight)
    # The inputs as the layer sees them (a conv's padding is a real zero, not code 0).
    inputs, _ = _rows(layer, (codes - zero_point) * act_scale, weight)
    step = max(1, rows.shape[0] // POSITIONS)
    rows, inputs, weight = rows[::step], inputs[::step], flat_weight
    scale = weight_observer.calculate_qparams()[0].reshape(-1, 1, 1)  # of 8-bit codes
    eight_bit = torch.clamp(torch.round(weight / scale), -127, 127)
    saturated = saturation_error(rows, eight_bit) * (act_scale * scale.flatten()).double().square()
    extra = _rounding_error(inputs, weight, scale * 127 / SEVEN_BIT, SEVEN_BIT) - _rounding_error(inputs, weight, scale, 127)
    return bool(saturated.sum() > extra.sum())


def _checkable(layer: torch.fx.Node, weight: torch.Tensor | None, act) -> bool:
    """Linears, and 2-d convs of one group with numeric padding, whose input kept a sample."""
    if weight is None or not isinstance(act, AutoRangeObserver) or act.sample is None:
        return False
    if layer.target in LINEAR_OPS:
        return True
    conv = conv_args(layer)
    return weight.dim() == 4 and conv.groups == 1 and not isinstance(conv.padding, str)


def narrow_saturating_weights(prepared: torch.fx.GraphModule) -> list[str]:
    """Give 7-bit weights to the calibrated layers where saturation of int8 sums costs more output
    error on the calibration sample than 7-bit rounding would (before `convert_pt2e`, which reads
    each observer's range). Grouped convs and layers whose input kept no sample get 7-bit weights:
    nothing shows them safe. Returns the layers' node names."""
    narrowed = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS | CONV_OPS:
            continue
        act, weight = (getattr(prepared, a.target, None) if isinstance(a, torch.fx.Node) and a.op == "call_module"
                       else None for a in (through_reshapes(node.args[0]), node.args[1]))
        if weight is None:
            continue
        float_weight = constant_value(prepared, node.args[1].args[0])
        if not _checkable(node, float_weight, act) or _seven_bit_is_better(node, act, weight, float_weight):
            weight.quant_min, weight.quant_max = -SEVEN_BIT, SEVEN_BIT
            narrowed.append(node.name)
    return narrowed
