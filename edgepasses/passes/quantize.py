"""`quantize`: int8 post-training quantization with calibration, as quantize/dequantize pairs.

PT2E's split: `EdgeQuantizer` annotates what to quantise (convs, linears, activation
matmuls; per-tensor activations, per-channel symmetric weights, within the target's
`QuantCaps`); torchao's `prepare_pt2e` inserts observers, the calibration batches run,
`convert_pt2e` turns observers into quantize/dequantize pairs. Targets pattern-match the
pairs to integer kernels (OpenVINO: FakeQuantize, run as int8). `weight_only=true` quantizes
Linear weights alone, int8 or int4 in groups, optionally with AWQ's scales (`quant.awq`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch.fx

from ..analysis.shape_prop import propagate_fake
from ..analysis.structure import model_type
from ..errors import OptionError
from ..graph_utils import warn_nothing_reached, weight_layers
from ..pass_base import NoOptions, PassContext, PassResult, ignore_option, option, register_pass
from .fold_bn import fold_bn
from ..quant import QuantCaps, require_torchao

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = option(8, "Bits of the weight codes: 8; with weight_only also 4. The target may allow fewer.")
    symmetric: bool | None = option(None, "Activations as symmetric int8 (true) or as uint8 with a zero "
                                          "point (false); none: the target's default.")
    per_channel: bool = option(True, "Weights with one scale per output channel; false: one per tensor.")
    calib: Literal["auto", "minmax", "percentile", "mse", "entropy"] = option(
        "auto", "How each activation's range is chosen from the calibration data; auto: per tensor, the "
                "candidate range with the least error in the layers reading it.")
    percentile: float = option(99.99, "With calib=percentile: the percentile of the values the range "
                                      "covers, in (50, 100].")
    model_type: Literal["auto", "transformer", "cnn"] = option(
        "auto", "Which defaults apply (a transformer gets SmoothQuant); auto: read from the graph, where "
                "attention means a transformer.")
    smooth_alpha: float | None = option(None, "SmoothQuant strength applied before quantizing, in [0, 1]; "
                                              "0: off; none: 0.95 for transformers, off for CNNs.")
    bias_correction: Literal["auto", "on", "off"] = option(
        "auto", "Shift each bias by the mean error its rounded weights add; auto: only where that raises "
                "the output SQNR on the calibration data.")
    rounding: Literal["nearest", "gptq"] = option(
        "nearest", "Weight rounding: to nearest, or gptq (each Linear's weights rounded to compensate "
                   "each other's error on the calibration data).")
    weight_only: bool = option(False, "Quantize Linear weights only (bits=8 or 4); activations stay float.")
    group_size: int | None = option(None, "With weight_only: input features that share a scale; none: one "
                                          "scale per output row.")
    awq: bool = option(False, "With weight_only: AWQ's activation-aware scales (needs calibration data).")
    ignore: tuple[str, ...] = ignore_option("stay float")
    embeddings: bool = option(True, "Embedding tables as int8 codes with a scale per row.")
    overflow_fix: Literal["auto", "all", "off"] = option(
        "auto", "7-bit weights, so that int8 sums cannot saturate: all layers, off, or auto: on CPUs whose "
                "int8 sums saturate (x86 without VNNI), the layers whose sums do on the calibration data "
                "(every layer unless calib=auto).")
    min_sqnr: float | None = option(None, "Output SQNR in dB to reach on the calibration data by keeping "
                                          "the fewest, most sensitive layers float; none: no such search.")

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"quantize option 'percentile' must be in (50, 100]; got {self.percentile}")
        if (self.group_size is not None or self.awq) and not self.weight_only:
            raise OptionError("quantize options 'group_size' and 'awq' apply to weight-only quantization: "
                              "add weight_only=true")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise OptionError(f"quantize option 'smooth_alpha' must be in [0, 1]; got {self.smooth_alpha}")
        if self.weight_only and (self.rounding != "nearest" or self.smooth_alpha):
            raise OptionError("quantize options 'rounding' and 'smooth_alpha' apply to static int8 "
                              "quantization; weight-only quantization has awq=true")
        if self.group_size is not None and self.group_size <= 0:
            raise OptionError(f"quantize option 'group_size' must be positive; got {self.group_size}")


TRANSFORMER_SMOOTH_ALPHA = 0.95  # NNCF's transformer preset smooths MatMul inputs with 0.95


def resolve_setup(opts: QuantizeOptions, caps: QuantCaps, target: str, gm: torch.fx.GraphModule | None = None):
    """The quantizer settings for `opts` on a target with `caps`, for the graph `gm` (read for its
    model type when that is "auto"; without a graph, no transformer settings); errors where they conflict."""
    from ..quant.quantizer import QuantSetup

    allowed = caps.weight_only_bits if opts.weight_only else caps.bits
    if opts.bits not in allowed:
        listed = ", ".join(map(str, allowed))
        hint = "" if opts.weight_only else f"; with weight_only=true: {', '.join(map(str, caps.weight_only_bits))}"
        raise OptionError(f"quantize(bits={opts.bits}): target {target!r} runs bits {listed}{hint}")
    symmetric = caps.symmetric_by_default if opts.symmetric is None else opts.symmetric
    if caps.symmetric_activations_only and opts.symmetric is False:
        raise OptionError(f"quantize(symmetric=false): target {target!r} runs symmetric int8 only")
    symmetric = symmetric or caps.symmetric_activations_only
    saturating = opts.overflow_fix == "auto" and caps.saturating_int8
    # per layer, measured on the sample calib=auto keeps, where the target allows; else every layer
    per_layer = saturating and caps.saturation_per_layer and opts.calib == "auto"
    seven_bit = opts.overflow_fix == "all" or (saturating and not per_layer)
    kind = opts.model_type if opts.model_type != "auto" else model_type(gm) if gm is not None else "cnn"
    alpha = opts.smooth_alpha
    if alpha is None:
        alpha = TRANSFORMER_SMOOTH_ALPHA if kind == "transformer" and not opts.weight_only else 0.0
    return QuantSetup(symmetric, opts.per_channel, opts.calib, opts.percentile, opts.weight_only, opts.ignore,
                      opts.bits, opts.group_size, opts.awq, opts.embeddings, weight_qmax=63 if seven_bit else 127,
                      overflow_check=per_layer,
                      smooth_alpha=alpha or None, bias_correction="off" if opts.weight_only else opts.bias_correction,
                      rounding=opts.rounding)


# version 2: the defaults for trained models (calib=auto, smoothing, bias correction, overflow per layer)
@register_pass("quantize", options=QuantizeOptions, version=2)
def quantize(gm: torch.fx.GraphModule, opts: QuantizeOptions, ctx: PassContext) -> PassResult:
    """Insert int8 quantize/dequantize pairs calibrated on the `calibration` data, or (weight_only)
    replace Linear weights by int8/int4 codes and their scales."""
    require_torchao()
    from ..quant.quantizer import quantize_graph

    target = getattr(ctx.target, "name", "reference")
    setup = resolve_setup(opts, getattr(ctx.target, "quant_caps", QuantCaps()), target, gm)
    if not setup.weight_only:
        # Exact, and what prepare_pt2e would do itself, but for weights frozen into buffers (the
        # backend's), where torchao's own folding fails registering the folded weight as a parameter.
        fold_bn(gm, NoOptions(), ctx)
    if ctx.accuracy is not None:
        if opts.min_sqnr is not None:
            raise OptionError("quantize: min_sqnr and a metric both choose which layers stay float; give one")
        return _quantize_within_drop(gm, setup, ctx)
    if opts.min_sqnr is not None:
        return _quantize_within_budget(gm, setup, opts.min_sqnr, ctx)
    result = quantize_graph(gm, setup, ctx.calibration, ctx.example_inputs)
    quantizer = result.quantizer
    stats = {"layers_quantized": len(quantizer.annotated), "linear_conv_quantized": quantizer.linear_conv_annotated,
             "layers_ignored": len(quantizer.ignored),
             "weights": _weights_text(setup),
             "activations": "float" if setup.weight_only else ("int8 symmetric" if setup.symmetric else "uint8"),
             "calib": ("awq" if setup.awq else "-") if setup.weight_only else setup.calib,
             "skipped": quantizer.skipped, **result.steps}
    if not quantizer.annotated:
        layers = weight_layers(gm)
        if layers:
            warn_nothing_reached(log, "quantize", "quantised (the graph is left in float)", layers, quantizer.skipped)
        else:
            log.warning("quantize: nothing to quantise (no conv, linear or activation matmul outside the ignore "
                        "list); the graph is left in float")
        return PassResult(gm, modified=False, stats=stats)
    stats["calibration_batches"] = result.calibration_batches
    propagate_fake(result.graph, ctx.example_inputs)
    return PassResult(result.graph, modified=True, stats=stats)


def _weights_text(setup) -> str:
    if setup.weight_only:
        return f"int{setup.bits}" + (f" groups of {setup.group_size}" if setup.group_size else "")
    return "int8" if setup.weight_qmax == 127 else "int8, 7-bit range (overflow_fix)"


def _quantize_within_budget(gm, setup, min_sqnr: float, ctx: PassContext) -> PassResult:
    from ..quant.calibration import checked_batches
    from ..quant.sensitivity import keep_sensitive_in_float

    batches = checked_batches(ctx.calibration, ctx.example_inputs, needed_by="quantize(min_sqnr=...)")
    quantized, float_layers, sqnr, ranking = keep_sensitive_in_float(gm, setup, batches, batches,
                                                                     ctx.example_inputs, min_sqnr)
    propagate_fake(quantized, ctx.example_inputs)
    stats = {"layers_quantized": len(ranking) - len(float_layers), "layers_kept_float": len(float_layers),
             "float_layers": float_layers, "output_sqnr_db": round(sqnr, 2), "calibration_batches": len(batches)}
    return PassResult(quantized, modified=len(float_layers) < len(ranking), stats=stats)


def _quantize_within_drop(gm, setup, ctx: PassContext) -> PassResult:
    from ..quant.accuracy_control import quantize_within_drop
    from ..quant.calibration import checked_batches

    batches = checked_batches(ctx.calibration, ctx.example_inputs, needed_by="quantize with a metric")
    result = quantize_within_drop(gm, setup, batches, ctx.example_inputs, ctx.accuracy)
    propagate_fake(result.graph, ctx.example_inputs)
    stats = {"layers_kept_float": len(result.float_layers), "float_layers": result.float_layers,
             "metric_float": result.metric_float, "metric_all_int8": result.metric_int8, "metric": result.metric,
             "max_drop": ctx.accuracy.max_drop, "calibration_batches": len(batches)}
    return PassResult(result.graph, modified=True, stats=stats)
