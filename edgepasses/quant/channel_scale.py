"""Per-input-channel scaling of Linear layers: the common core of SmoothQuant and AWQ.

For any positive vector s, x·Wᵀ = (x / s)·(W·diag(s))ᵀ: dividing a Linear's input channels
by s and multiplying its weight columns by s leaves the float output unchanged while moving
range between what the activation quantizer and the weight quantizer see. Linears reading the
same activation (q, k and v) share one s. The 1/s folds into the LayerNorm that makes the
activation when the group's Linears are its only readers; otherwise an explicit multiply goes in
front of them (OpenVINO fuses it into the following FakeQuantize).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.fx

from ..analysis.observe import NodeObserver
from ..graph_utils import add_constant, constant_value, remove_unused_attributes, replace_arg
from .calibration import calibrate

aten = torch.ops.aten

EPS = 1e-5


@dataclass
class LinearGroup:
    """Linears with constant weights that all read `source` as their input."""
    source: torch.fx.Node
    linears: list[torch.fx.Node]

    def weight(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """The members' weights stacked along the output dim: (sum of outputs, in_features)."""
        return torch.cat([constant_value(gm, lin.args[1]) for lin in self.linears])


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one group's activation over the calibration batches."""
    absmax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)  # activation rows, for AWQ's search

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.rows

    def add(self, x: torch.Tensor, keep_rows: int) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        batch_max, batch_sum = rows.abs().amax(0), rows.abs().sum(0)
        self.absmax = batch_max if self.absmax is None else torch.maximum(self.absmax, batch_max)
        self.abs_sum = batch_sum if self.abs_sum is None else self.abs_sum + batch_sum
        self.rows += rows.shape[0]
        kept = sum(s.shape[0] for s in self.sample)
        if kept < keep_rows:
            step = max(1, rows.shape[0] // (keep_rows - kept))  # spread the sample over the batch
            self.sample.append(rows[::step][:keep_rows - kept].clone())


def linear_groups(gm: torch.fx.GraphModule, ignore=lambda node: False) -> list[LinearGroup]:
    by_source: dict[torch.fx.Node, list[torch.fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is aten.linear.default
                and constant_value(gm, node.args[1]) is not None and not ignore(node)):
            by_source[node.args[0]].append(node)
    return [LinearGroup(source, linears) for source, linears in by_source.items()]


def collect_stats(gm: torch.fx.GraphModule, groups: list[LinearGroup], batches, example_inputs: tuple, *,
                  needed_by: str, keep_rows: int = 0) -> dict[torch.fx.Node, ChannelStats]:
    """Run the calibration batches through `gm`, recording each group source's channel statistics."""
    stats = {group.source: ChannelStats() for group in groups}
    watch = {source: partial(stat.add, keep_rows=keep_rows) for source, stat in stats.items()}
    calibrate(NodeObserver(gm, watch).run, batches, example_inputs, needed_by=needed_by)
    return stats


def apply_input_scale(gm: torch.fx.GraphModule, group: LinearGroup, scale: torch.Tensor) -> str:
    """Divide the group's input by `scale` and multiply its weight columns by it.
    Returns where the 1/scale went: "layer_norm" (folded) or "multiply" (a node inserted)."""
    for lin in group.linears:
        weight = constant_value(gm, lin.args[1])
        replace_arg(gm, lin, 1, add_constant(gm, f"{lin.args[1].target}_scaled", weight * scale, before=lin))
    if _fold_into_layer_norm(gm, group, scale):
        return "layer_norm"
    inverse = add_constant(gm, f"{group.source.name}_inv_scale", 1.0 / scale,
                           before=group.linears[0])
    with gm.graph.inserting_before(group.linears[0]):
        scaled = gm.graph.call_function(aten.mul.Tensor, (group.source, inverse))
    scaled.meta.update({k: v for k, v in group.linears[0].meta.items() if k in ("nn_module_stack", "stack_trace")})
    for lin in group.linears:
        lin.replace_input_with(group.source, scaled)
    return "multiply"


def _fold_into_layer_norm(gm, group: LinearGroup, scale: torch.Tensor) -> bool:
    source = group.source
    if source.op != "call_function" or source.target is not aten.layer_norm.default:
        return False
    if set(source.users) != set(group.linears):  # e.g. the residual add also reads it
        return False
    weight, bias = (constant_value(gm, a) for a in (list(source.args) + [None, None])[2:4])
    if weight is None:
        return False
    source.args = tuple(source.args) + (None,) * (4 - len(source.args))
    replace_arg(gm, source, 2, add_constant(gm, f"{source.name}_weight_scaled", weight / scale, before=source))
    if bias is not None:
        replace_arg(gm, source, 3, add_constant(gm, f"{source.name}_bias_scaled", bias / scale, before=source))
    return True


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale for an activation range and the weights reading it:
    s_j = max|x_j|^alpha / max|W_:j|^(1-alpha) (Xiao et al. 2023)."""
    weight_absmax = weight.abs().amax(0).clamp(min=EPS)
    return (act_absmax.clamp(min=EPS).pow(alpha) / weight_absmax.pow(1.0 - alpha)).clamp(min=EPS)


def smooth_linears(gm: torch.fx.GraphModule, groups: list[LinearGroup], alpha: float, batches,
                   example_inputs: tuple, *, needed_by: str) -> dict[str, int]:
    """SmoothQuant on `groups` (in place, exact in float): one calibration run for the activation
    ranges, then each group's scale. Returns where the 1/s went, counted."""
    stats = collect_stats(gm, groups, batches, example_inputs, needed_by=needed_by)
    folded = {"layer_norm": 0, "multiply": 0}
    for group in groups:
        folded[apply_input_scale(gm, group, smoothing_scale(stats[group.source].absmax, group.weight(gm), alpha))] += 1
    remove_unused_attributes(gm)  # the weights before scaling
    gm.recompile()
    return folded
