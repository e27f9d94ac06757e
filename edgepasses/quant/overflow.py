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


def _rows(layer: torch.fx.Node, values: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions x channels x taps) inputs, every `_step`-th position of `values` (at most about
    POSITIONS), and (out x channels x taps) weights: the kernel pairs neighbouring channels at the
    same tap. Only the kept positions are gathered: a conv's sample has tens of thousands of patches."""
    if layer.target in LINEAR_OPS:  # (its input may be read through a reshape: a classifier's flatten)
        rows = values.reshape(-1, weight.shape[1], 1)
        return rows[::_step(rows.shape[0])], weight.unsqueeze(-1)
    stride, padding, dilation = (_pair(layer.args[i]) if len(layer.args) > i else default
                                 for i, default in ((3, (1, 1)), (4, (0, 0)), (5, (1, 1))))
    return _patches(values, weight.shape[2:], stride, padding, dilation), weight.flatten(2)


def _step(positions: int) -> int:
    return max(1, positions // POSITIONS)


def _patches(values: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """What `F.unfold` gives as (positions x channels x taps), every `_step`-th position only."""
    values = values if values.dim() == 4 else values.unsqueeze(0)
    n, _, height, width = values.shape
    out_h, out_w = ((size + 2 * pad - dil * (k - 1) - 1) // st + 1
                    for size, pad, dil, k, st in zip((height, width), padding, dilation, kernel, stride))
    kept = torch.arange(0, n * out_h * out_w, _step(n * out_h * out_w))
    image, place = kept // (out_h * out_w), kept % (out_h * out_w)
    top = (place // out_w * stride[0])[:, None, None] + dilation[0] * torch.arange(kernel[0])[None, :, None]
    left = (place % out_w * stride[1])[:, None, None] + dilation[1] * torch.arange(kernel[1])[None, None, :]
    padded = F.pad(values, (padding[1], padding[1], padding[0], padding[0]))
    patches = padded[image[:, None, None], :, top, left]  # positions x kernel rows x kernel columns x channels
    return patches.permute(0, 3, 1, 2).flatten(2)


FLAGGED_CHUNK = 4096    # (position, pair, tap) triples whose pair sums are computed at once, for every output


def _pair_sums(rows: torch.Tensor, weights: torch.Tensor):
    """(positions, pair sums: triples x outputs) for each chunk of the (position, pair, tap) triples whose
    neighbouring-channel pair sum can leave int16 for some output; the others (most) cannot saturate:
    their |sum| is at most the codes times each channel's largest weight over the outputs."""
    if rows.shape[1] % 2:  # an odd channel count: the last channel pairs with zero padding
        rows, weights = F.pad(rows, (0, 0, 0, 1)), F.pad(weights, (0, 0, 0, 1))
    pairs_x = rows.unflatten(1, (-1, 2)).transpose(2, 3)            # positions x pairs x taps x 2
    pairs_w = weights.unflatten(1, (-1, 2)).permute(1, 3, 2, 0)     # pairs x taps x 2 x outputs
    bound = (pairs_x.abs() * pairs_w.abs().amax(-1)).sum(-1)        # positions x pairs x taps
    position, pair, tap = (bound > INT16_MAX).nonzero(as_tuple=True)
    for start in range(0, len(position), FLAGGED_CHUNK):
        p, c, t = (index[start:start + FLAGGED_CHUNK] for index in (position, pair, tap))
        x, w = pairs_x[p, c, t], pairs_w[c, t]                      # triples x 2; triples x 2 x outputs
        yield p, x[:, :1] * w[:, 0] + x[:, 1:] * w[:, 1]


def saturation_error(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per output channel, the squared error (in code units) int16 saturation of the pair sums of
    u8 `rows` and s8 `weights` adds to the layer's outputs, summed over the positions."""
    lost = torch.zeros(rows.shape[0], weights.shape[0], dtype=torch.float64)
    for positions, sums in _pair_sums(rows.float(), weights.float()):  # integers below 2**24: exact in float32
        lost.index_add_(0, positions, (sums - sums.clamp(-INT16_MAX - 1, INT16_MAX)).double())
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
    scale = weight_observer.calculate_qparams()[0].reshape(-1, 1, 1)  # of 8-bit codes
    eight_bit = torch.clamp(torch.round(flat_weight / scale), -127, 127)
    saturated = saturation_error(rows, eight_bit) * (act_scale * scale.flatten()).double().square()
    extra = (_rounding_error(inputs, flat_weight, scale * 127 / SEVEN_BIT, SEVEN_BIT)
             - _rounding_error(inputs, flat_weight, scale, 127))
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
