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
from ..errors import OptionError
from ..graph_utils import warn_nothing_reached, weight_layers
from ..pass_base import PassContext, PassResult, register_pass
from ..quant import QuantCaps, require_torchao

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class QuantizeOptions:
    bits: int = 8
    symmetric: bool | None = None       # activations; none: the target's default
    per_channel: bool = True            # weights: one scale per output channel
    calib: Literal["minmax", "percentile", "mse", "entropy"] = "percentile"
    percentile: float = 99.99           # for calib=percentile
    weight_only: bool = False           # quantise Linear weights only; activations stay float
    group_size: int | None = None       # weight-only: input features sharing a scale; none: a whole row
    awq: bool = False                   # weight-only: AWQ's activation-aware scales (needs calibration)
    ignore: tuple[str, ...] = ()        # layer names or regexes (whole-name match) kept in float
    embeddings: bool = True             # embedding tables as int8 codes, a scale per row
    overflow_fix: Literal["auto", "all", "off"] = "auto"  # weights in 7 bits where int8 sums saturate;
                                        # auto: where the target's CPU saturates (x86 without VNNI)
    min_sqnr: float | None = None       # dB on the calibration data: keep the fewest most-sensitive
                                        # layers in float to reach it

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            raise OptionError(f"quantize option 'percentile' must be in (50, 100]; got {self.percentile}")
        if (self.group_size is not None or self.awq) and not self.weight_only:
            raise OptionError("quantize options 'group_size' and 'awq' apply to weight-only quantization: "
                              "add weight_only=true")
        if self.group_size is not None and self.group_size <= 0:
            raise OptionError(f"quantize option 'group_size' must be positive; got {self.group_size}")


def resolve_setup(opts: QuantizeOptions, caps: QuantCaps, target: str):
    """The quantizer settings for `opts` on a target with `caps`; errors where they conflict."""
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
    seven_bit = opts.overflow_fix == "all" or (opts.overflow_fix == "auto" and caps.saturating_int8)
    return QuantSetup(symmetric, opts.per_channel, opts.calib, opts.percentile, opts.weight_only, opts.ignore,
                      opts.bits, opts.group_size, opts.awq, opts.embeddings, weight_qmax=63 if seven_bit else 127)


@register_pass("quantize", options=QuantizeOptions)
def quantize(gm: torch.fx.GraphModule, opts: QuantizeOptions, ctx: PassContext) -> PassResult:
    """Insert int8 quantize/dequantize pairs calibrated on the `calibration` data, or (weight_only)
    replace Linear weights by int8/int4 codes and their scales."""
    require_torchao()
    from ..quant.quantizer import quantize_graph

    target = getattr(ctx.target, "name", "reference")
    setup = resolve_setup(opts, getattr(ctx.target, "quant_caps", QuantCaps()), target)
    if opts.min_sqnr is not None:
        return _quantize_within_budget(gm, setup, opts.min_sqnr, ctx)
    result = quantize_graph(gm, setup, ctx.calibration, ctx.example_inputs)
    quantizer = result.quantizer
    stats = {"layers_quantized": len(quantizer.annotated), "linear_conv_quantized": quantizer.linear_conv_annotated,
             "layers_ignored": len(quantizer.ignored),
             "weights": _weights_text(setup),
             "activations": "float" if setup.weight_only else ("int8 symmetric" if setup.symmetric else "uint8"),
             "calib": ("awq" if setup.awq else "-") if setup.weight_only else setup.calib,
             "skipped": quantizer.skipped}
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
