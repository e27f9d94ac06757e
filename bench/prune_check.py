"""`edgepasses prune-check`: does a pruned zoo model still run, with the right shapes, on every target?

Per model and ratio: compress with `verify=True` (every pass's `meta["val"]` re-propagated and
compared), check the output shape against the unpruned model, run the pruned graph on the
reference target (PyTorch) and on OpenVINO and compare them, and list the groups the pass left
whole with its reasons. No timing: `edgepasses bench` measures latency.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

import edgepasses
from edgepasses.pipeline import Pipeline

from edgepasses.zoo import get_model

DEFAULT_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "shufflenet_v2", "bert_encoder",
                  "regnet_x_400mf")
DEFAULT_RATIOS = (0.3, 0.5)
DEFAULT_PIPELINE = "fold_bn,prune(ratio={ratio},round_to=8)"
# OpenVINO's f32 CPU kernels reorder sums; a pruned graph's shapes, not its numerics, are in question.
RELATIVE_TOLERANCE = 1e-3


class PruneCheckError(AssertionError):
    """A pruned model failed a check; the message names the model, the ratio and what differs."""


@dataclass
class PruneCheck:
    model: str
    ratio: float
    pipeline: str
    params_before: int     # of the graph the prune step received (after fold_bn)
    params_after: int
    macs_before: int
    macs_after: int
    output_shapes: list[tuple[int, ...]]  # equal to the unpruned model's (checked)
    groups: int
    groups_pruned: int
    left_whole: dict[str, str] = field(default_factory=dict)  # group -> reasons
    max_abs_diff: float | None = None     # reference vs OpenVINO; None when OpenVINO is not installed
    output_scale: float = 0.0             # max |output| on the reference target

    @property
    def groups_rounded_whole(self) -> int:
        """Prunable groups that kept every channel: (1 - ratio) of them, rounded up, is all of them."""
        return self.groups - self.groups_pruned - len(self.left_whole)

    @property
    def relative_diff(self) -> float | None:
        return None if self.max_abs_diff is None else self.max_abs_diff / max(self.output_scale, 1e-12)


def prune_step_index(pipeline: str) -> int:
    """Where the one prune step is in `pipeline`; its stats are what the check reports."""
    names = [step.name for step in Pipeline.parse(pipeline)]
    if names.count("prune") != 1:
        raise ValueError(f"prune-check needs a pipeline with exactly one prune step; got {pipeline!r}")
    return names.index("prune")


def _leaves(output) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def _shapes(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


def _check_shapes(gm: torch.fx.GraphModule, expected: list[tuple[int, ...]], got: list[torch.Tensor],
                  where: str) -> None:
    """The pruned outputs, run and recorded in `meta["val"]`, must have the unpruned model's shapes."""
    if _shapes(got) != expected:
        raise PruneCheckError(f"{where}: pruned output shapes {_shapes(got)} differ from the unpruned "
                              f"model's {expected}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    recorded = [tuple(n.meta["val"].shape) for n in pytree.tree_leaves(output.args) if isinstance(n, torch.fx.Node)]
    if recorded != expected:
        raise PruneCheckError(f"{where}: output meta['val'] shapes {recorded} differ from the run's {expected}")


def _openvino_diff(gm: torch.fx.GraphModule, inputs: tuple, reference: list[torch.Tensor],
                   where: str) -> float | None:
    """Max abs difference of OpenVINO (whole graph, no fallback) against the reference target."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return None
    try:
        compiled = edgepasses.lower(gm, inputs, target="openvino", strict=True)
    except Exception as exc:
        raise PruneCheckError(f"{where}: OpenVINO cannot run the pruned graph: {exc}") from exc
    got = _leaves(compiled(*inputs))
    if _shapes(got) != _shapes(reference):
        raise PruneCheckError(f"{where}: OpenVINO output shapes {_shapes(got)} differ from the reference "
                              f"target's {_shapes(reference)}")
    return max((g - r).abs().max().item() for g, r in zip(got, reference))


def check_model(name: str, ratio: float, pipeline: str = DEFAULT_PIPELINE) -> PruneCheck:
    """Prune zoo model `name` (batch 1) with `pipeline` (`{ratio}` filled in) and check it; raises
    `PruneCheckError` on a wrong shape or an OpenVINO result off by more than `RELATIVE_TOLERANCE`."""
    text = pipeline.format(ratio=ratio)
    where = f"{name} at ratio {ratio} ({text})"
    step = prune_step_index(text)
    zoo = get_model(name)
    inputs = zoo.example_inputs
    with torch.no_grad():
        expected = _shapes(_leaves(zoo.module(*inputs)))
        gm = edgepasses.compress(zoo.module, inputs, text, verify=True)
        stats = gm.edge_report.records[step].stats
        reference = _leaves(edgepasses.lower(gm, inputs, target="reference")(*inputs))
        _check_shapes(gm, expected, reference, where)
        diff = _openvino_diff(gm, inputs, reference, where)
    scale = max(r.abs().max().item() for r in reference)
    check = PruneCheck(name, ratio, text, stats["params_before"], stats["params_after"], stats["macs_before"],
                       stats["macs_after"], expected, stats["groups"], stats["groups_pruned"],
                       dict(stats["left_whole"]), diff, scale)
    rel = check.relative_diff
    if rel is not None and not rel <= RELATIVE_TOLERANCE:  # `not <=` also catches NaN
        raise PruneCheckError(f"{where}: OpenVINO differs from the reference target by {diff:.3g} "
                              f"(relative to output scale {scale:.3g}: {rel:.2e} > {RELATIVE_TOLERANCE:g})")
    return check


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _row(c: PruneCheck) -> str:
    ov = ("n/a (no openvino)" if c.max_abs_diff is None
          else f"{c.max_abs_diff:.2e} ({c.relative_diff:.1e} of scale)")
    shapes = ", ".join("×".join(map(str, s)) for s in c.output_shapes)
    return (f"| {c.model} | {c.ratio:g} | {_count(c.params_before)} → {_count(c.params_after)} "
            f"({c.params_after / c.params_before:.2f}) | {_count(c.macs_before)} → {_count(c.macs_after)} "
            f"({c.macs_after / c.macs_before:.2f}) | {shapes} ✓ | {ov} | {c.groups_pruned} / "
            f"{len(c.left_whole)} / {c.groups_rounded_whole} of {c.groups} |")


# "add_7", "layer_norm_6": one reason per layer would differ only in the node's number.
_NODE_NUMBER = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*?)_\d+\b")


def _reason_counts(left_whole: dict[str, str]) -> list[str]:
    """Reasons that are identical up to node numbers aggregated: `×count: reason (first groups)`."""
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for group, reason in left_whole.items():
        by_reason[_NODE_NUMBER.sub(r"\1", reason)].append(group)
    lines = []
    for reason, groups in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        named = ", ".join(groups[:4]) + (f", … {len(groups) - 4} more" if len(groups) > 4 else "")
        lines.append(f"×{len(groups)}: {reason} ({named})")
    return lines


def _left_whole_section(checks: list[PruneCheck]) -> list[str]:
    """One entry per model; per ratio only where the ratios left different groups whole."""
    by_model: dict[str, list[PruneCheck]] = collections.defaultdict(list)
    for c in checks:
        by_model[c.model].append(c)
    lines = ["", "Groups left whole, and why (reasons counted alike up to node numbers):", ""]
    for model, runs in by_model.items():
        same = all(r.left_whole == runs[0].left_whole for r in runs)
        for run in runs[:1] if same else runs:
            label = f"{model} (every ratio)" if same and len(runs) > 1 else f"{model} at {run.ratio:g}"
            reasons = _reason_counts(run.left_whole)
            lines.append(f"- {label}:" + ("" if reasons else " none"))
            lines += [f"  - {line}" for line in reasons]
    return lines


def to_markdown(checks: list[PruneCheck]) -> str:
    """The table (one row per model and ratio) and the groups left whole below it."""
    pipelines = sorted({c.pipeline.replace(f"ratio={c.ratio}", "ratio=R") for c in checks})
    lines = [f"### Pruned models on the reference and OpenVINO targets (`{'`, `'.join(pipelines)}`, batch 1)",
             "",
             "| model | ratio | params (after/before) | MACs (after/before) | output shape = unpruned | "
             "OpenVINO vs reference, max abs diff | groups pruned / left whole / rounded to full width, of all |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(c) for c in checks]
    lines.append("")
    lines.append("Params and MACs are counted on the graph the prune step receives (after fold_bn); "
                 "every pass is verified (`meta[\"val\"]` re-propagated) and OpenVINO runs the whole graph "
                 "(strict, no fallback). Rounded to full width: `round_to` rounds the kept channel count up to "
                 "the whole group.")
    return "\n".join(lines + _left_whole_section(checks))


def prune_check(models: list[str], ratios: list[float], pipeline: str = DEFAULT_PIPELINE,
                progress=print) -> tuple[list[PruneCheck], list[str]]:
    """Check every model at every ratio; a failing pair is reported in the errors, the rest still run."""
    checks, errors = [], []
    for name in models:
        for ratio in ratios:
            try:
                checks.append(check_model(name, ratio, pipeline))
                progress(_row(checks[-1]))
            except PruneCheckError as exc:
                errors.append(str(exc))
                progress(f"FAILED: {exc}")
    return checks, errors
