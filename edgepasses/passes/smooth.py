"""`smooth`: SmoothQuant — migrate activation outliers into the weights before int8 quantization.

Transformer activations carry a few channels 10-100x larger than the rest; a per-tensor
activation scale then wastes most int8 levels on them. Per input channel j, with calibration
statistics, s_j = max|x_j|^alpha / max|W_:j|^(1-alpha) divides the activation and multiplies
the weight column (Xiao et al. 2023), which is exact in float. Run it before `quantize`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx

from ..analysis.shape_prop import propagate_fake
from ..errors import OptionError
from ..graph_utils import ignore_matcher, layer_name
from ..pass_base import PassContext, PassResult, ignore_option, option, register_pass
from ..quant.channel_scale import linear_groups, smooth_linears

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class SmoothOptions:
    alpha: float = option(0.5, "Share of each input channel's range moved from the activation into the "
                               "weights, in [0, 1]: 0 none, 1 all.")
    ignore: tuple[str, ...] = ignore_option("are left as they are")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise OptionError(f"smooth option 'alpha' must be in [0, 1]; got {self.alpha}")


def _ignore_matcher(gm: torch.fx.GraphModule, patterns: tuple[str, ...]):
    linears = [n for g in linear_groups(gm) for n in g.linears]
    return ignore_matcher(patterns, linears, layer_name, where="smooth", kind="Linear")


# after quantize, no Linear weight is a constant to scale
@register_pass("smooth", options=SmoothOptions, before=("quantize",))
def smooth(gm: torch.fx.GraphModule, opts: SmoothOptions, ctx: PassContext) -> PassResult:
    """Scale Linear inputs down and weights up per channel so both quantise well (exact in float)."""
    groups = linear_groups(gm, _ignore_matcher(gm, opts.ignore))
    if not groups:
        log.warning("smooth: no Linear with a constant weight outside the ignore list; nothing to smooth")
        return PassResult(gm, modified=False, stats={"groups": 0})
    folded = smooth_linears(gm, groups, opts.alpha, ctx.calibration, ctx.example_inputs, needed_by="smooth")
    propagate_fake(gm, ctx.example_inputs)
    return PassResult(gm, modified=True, stats={"groups": len(groups),
                                                 "linears": sum(len(g.linears) for g in groups),
                                                 "folded_into_layer_norm": folded["layer_norm"],
                                                 "multiplies_inserted": folded["multiply"]})
