"""Calibration chosen per tensor by the error it causes where the tensor is used (`calib=auto`).

No one clipping rule suits every activation: min/max keeps a transformer's few outlier channels
that carry meaning, a percentile or the MSE range spends the levels on a CNN's bulk. The
activation's own squared error is the wrong yardstick too: what matters is the error of the
layer that reads it, where each input channel counts by the weights it meets. So each
`AutoRangeObserver`, after calibration, scores its candidate ranges on its recorded sample by
the squared output error of the convs and linears that read it, op(q(x) - x, W), and keeps the
best; a tensor that reaches no weight layer (activation matmuls, pools, residual adds) is
scored by its own error.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx

from ..graph_utils import CONV_OPS, LINEAR_OPS, constant_value, readers_through_reshapes
from .observers import AutoRangeObserver

ErrorOf = Callable[[torch.Tensor], torch.Tensor]  # an input error -> the error it causes downstream


def _float_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """The float weight behind a weight argument: a constant, or a constant behind its observer."""
    if isinstance(node, torch.fx.Node) and node.op == "call_module":
        node = node.args[0]
    return constant_value(gm, node)


def _layer_error(gm: torch.fx.GraphModule, reader: torch.fx.Node, value: torch.fx.Node) -> ErrorOf | None:
    """How `reader` turns an error in its input `value` into an output error; None where it has
    no constant weight to weigh the error with."""
    if reader.op != "call_function" or reader.target not in LINEAR_OPS | CONV_OPS or reader.args[0] is not value:
        return None
    weight = _float_weight(gm, reader.args[1])
    if weight is None:
        return None
    rest = tuple(reader.args[3:])  # stride, padding, ...: the layer is linear in its input, bias aside
    if reader.target in LINEAR_OPS:  # read through a reshape, maybe: rows of its input features
        return lambda delta: reader.target(delta.reshape(-1, weight.shape[1]), weight)
    return lambda delta: reader.target(delta, weight, None, *rest)


def _score(observer: AutoRangeObserver, errors_of: list[ErrorOf]) -> str:
    sample = observer.sample
    scores = {}
    for method, value_range in observer.candidate_ranges().items():
        delta = observer.fake_quantize(sample, value_range) - sample
        scores[method] = sum(error_of(delta).double().square().sum().item() for error_of in errors_of)
    return min(scores, key=scores.get)


def choose_activation_ranges(prepared: torch.fx.GraphModule) -> Counter:
    """Choose the range of every `AutoRangeObserver` in a calibrated `prepare_pt2e` graph.
    Returns how many tensors took each method."""
    chosen: Counter = Counter()
    for node in prepared.graph.nodes:
        observer = getattr(prepared, node.target, None) if node.op == "call_module" else None
        if not isinstance(observer, AutoRangeObserver) or observer.sample is None \
                or not observer.candidate_ranges():
            continue
        errors_of = [e for e in (_layer_error(prepared, *read) for read in readers_through_reshapes(node)) if e is not None]
        observer.choose(_score(observer, errors_of or [lambda delta: delta]))
        chosen[observer.chosen] += 1
    return chosen
