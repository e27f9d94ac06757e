"""Accuracy control with the user's own metric: int8 everywhere the metric allows.

`metric(model) -> float` (higher is better) is the user's validation, called with a callable like
their model. Float first: that is the reference. If the fully quantised model is within `max_drop`
of it, done. Otherwise the layers are ranked by the sensitivity report (output SQNR with each
layer alone in int8, all from one quantization) and a binary search finds how few of the most
sensitive ones must stay float for the metric to come back within `max_drop` — NNCF's accuracy
control, which NNCF offers for OpenVINO and ONNX models only, here on the PyTorch graph itself.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Real
from typing import Callable

import torch.fx

from ..errors import OptionError
from .quantizer import QuantSetup
from .sensitivity import RevertibleQuantization, fewest_float_layers, rank_layers

log = logging.getLogger("edgepasses")

# The ranking needs an order, not precise SQNRs: a few batches give it at a fraction of the runs.
RANKING_BATCHES = 4


@dataclass(frozen=True)
class AccuracyControl:
    """The user's metric and the drop they accept, relative to the float model's score."""
    evaluate: Callable[[torch.fx.GraphModule], float]  # a candidate graph -> the metric of the model with it
    max_drop: float = 0.01

    def __post_init__(self):
        check_max_drop(self.max_drop)


def check_max_drop(max_drop) -> None:
    if isinstance(max_drop, bool) or not isinstance(max_drop, Real) or not 0.0 <= max_drop < 1.0:
        raise OptionError(f"max_drop must be a number in [0, 1): the share of the float model's metric the "
                          f"compressed model may lose (0.01: 1 %); got {max_drop!r}")


def check_metric(metric) -> None:
    if not callable(metric):
        raise OptionError(f"metric must be a function taking the model (a callable like it) and returning a "
                          f"number, higher is better; got {type(metric).__name__}")


def score(metric: Callable, model: Callable, what: str) -> float:
    """metric(model) as a finite float, or an OptionError that names what was being scored."""
    try:
        value = metric(model)
    except Exception as exc:
        raise OptionError(f"metric raised {type(exc).__name__} on the {what}: {exc}") from exc
    if isinstance(value, bool) or not isinstance(value, Real) and not (
            hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1):
        raise OptionError(f"metric must return a number (higher is better); on the {what} it returned "
                          f"{type(value).__name__}")
    value = float(value.item() if hasattr(value, "item") else value)
    if not math.isfinite(value):
        raise OptionError(f"metric returned {value} on the {what}; it must be a finite number")
    return value


@dataclass
class ControlledQuantization:
    graph: torch.fx.GraphModule
    float_layers: list[str]
    metric_float: float
    metric_int8: float       # every layer int8
    metric: float            # the result


def quantize_within_drop(gm: torch.fx.GraphModule, setup: QuantSetup, batches: list[tuple], example_inputs: tuple,
                         control: AccuracyControl) -> ControlledQuantization:
    """Quantise `gm` keeping the fewest most-sensitive layers float for the metric to stay within
    `control.max_drop` of float."""
    reference = control.evaluate(gm)
    floor = reference - control.max_drop * abs(reference)
    quantization = RevertibleQuantization(gm, setup, batches, example_inputs)
    full = quantization.graph()
    all_int8 = control.evaluate(full)
    if all_int8 >= floor:
        return ControlledQuantization(full, [], reference, all_int8, all_int8)
    all_float = control.evaluate(quantization.graph(quantization.layers))
    if all_float < floor:
        raise OptionError(f"the float model itself does not reach the metric's target: it scored {reference:.6g}, "
                          f"then {all_float:.6g} on the same graph; make the metric deterministic (fixed data, "
                          "no sampling) or raise max_drop")
    ranking = rank_layers(quantization, gm, batches[:RANKING_BATCHES])
    graph, kept, value = fewest_float_layers(quantization, [s.layer for s in ranking], control.evaluate,
                                             lambda metric: metric >= floor)
    log.info("quantize: metric %.6g float, %.6g all int8, %.6g with %d layer(s) float: %s", reference, all_int8,
             value, len(kept), ", ".join(kept))
    return ControlledQuantization(graph, kept, reference, all_int8, value)
