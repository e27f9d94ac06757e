"""Quantization-aware training: the `quantize` pass's annotation with fake-quantize modules in
place of observers, trained in plain eager PyTorch with straight-through gradients.

    gm = edgepasses.prepare_qat(model, (x,), "fold_bn,quantize", calibration=batches)
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-4)
    for x, y in loader:                    # batches shaped like (x,): the graph has static shapes
        optimizer.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        optimizer.step()
    int8 = edgepasses.convert_qat(gm)      # the Q/DQ form `quantize` makes; lower() runs it as int8

Ranges: the calibration batches set each activation range with the pipeline's `calib` method,
exactly as `quantize` would, and the ranges stay fixed while training (to let them move, call
`gm.apply(torchao.quantization.pt2e.enable_observer)`). Weight ranges follow the weights: each
forward fake-quantizes a weight over the range of its current value, and `convert_qat` takes
them from the weights as trained. Without training, `convert_qat(prepare_qat(...))` is the
graph `compress(..., pipeline)` returns.

Train/eval: `gm.train()` and `gm.eval()` work and change nothing the graph computes: it is
exported from the eval-mode model, so it has no dropout, and batch norm is folded into the
conv before it or else keeps its running statistics. torchao's `move_exported_model_to_train/eval`
are not needed (they rewrite only those two ops). The converted graph is fixed in eval mode,
like `quantize`'s output.

Why `prepare_pt2e` and not torchao's `prepare_qat_pt2e`: they insert the same modules (the
constructors in the specs are fake-quantizers either way; `is_qat` only matters for fixed-qparams
specs, which we do not use) and differ in batch norm. `prepare_pt2e` folds eval-mode batch norm
into the conv before annotating, as `quantize` does, so the QAT graph is `quantize`'s graph;
`prepare_qat_pt2e` looks for training-mode conv-bn patterns, which a graph exported in eval mode
never has, and tracing them (and their counterparts in `convert_pt2e`) costs a minute.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx
from torch import nn

from ..errors import OptionError
from . import require_torchao

require_torchao()  # the friendly message, before the imports below fail

from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant  # noqa: E402
from torchao.quantization.pt2e.fake_quantize import FakeQuantize  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import QuantizationSpec  # noqa: E402

from ..analysis.shape_prop import propagate_fake  # noqa: E402
from ..graph_utils import constant_value, remove_unused_attributes  # noqa: E402
from ..pass_base import PassContext  # noqa: E402
from ..pipeline import PassRecord, Pipeline, PipelineReport, Step  # noqa: E402
from .calibration import calibrate, checked_batches  # noqa: E402
from ..finetune import make_weights_trainable  # noqa: E402
from .quantizer import EdgeQuantizer, convert  # noqa: E402

__all__ = ["convert_qat", "prepare_qat"]

log = logging.getLogger("edgepasses")
_STATE = "edge_qat"  # the attribute of a prepared graph that convert_qat reads
aten = torch.ops.aten



class WeightFakeQuantize(FakeQuantize):
    """Fake-quantizes a weight over the range of its current value, the range `quantize` would give
    the trained weight (a running min/max would keep the extremes of weights long since updated)."""

    def forward(self, X):
        if self.observer_enabled[0] == 1:
            self.activation_post_process.reset_min_max_vals()
            self.activation_post_process.to(X.device)  # the per-channel reset makes its statistics CPU tensors
        return super().forward(X)


class FakeQuantQuantizer(EdgeQuantizer):
    """`EdgeQuantizer`'s annotation, each observer wrapped in a fake-quantize module."""

    def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        super().annotate(gm)
        # One fake-quant spec per distinct observer spec, so prepare shares modules where it
        # shares observers for `quantize`.
        wrapped: dict[tuple[int, bool], QuantizationSpec] = {}
        for node in gm.graph.nodes:
            annotation = node.meta.get("quantization_annotation")
            if annotation is None:
                continue
            for arg, spec in annotation.input_qspec_map.items():
                key = (id(spec), arg.op == "get_attr")
                if key not in wrapped:
                    wrapped[key] = _fake_quant_spec(spec, weight=key[1])
                annotation.input_qspec_map[arg] = wrapped[key]
        return gm


def _fake_quant_spec(spec: QuantizationSpec, *, weight: bool) -> QuantizationSpec:
    fake_quant = (WeightFakeQuantize if weight else FakeQuantize).with_args(observer=spec.observer_or_fake_quant_ctr)
    return dataclasses.replace(spec, observer_or_fake_quant_ctr=fake_quant)


@dataclass
class _QatState:
    """What convert_qat needs from prepare_qat."""
    context: PassContext          # example inputs, calibration batches, target: for the steps after quantize
    pipeline: str                 # the whole pipeline, for the report (quant_report reads it)
    records: list[PassRecord]     # the steps before quantize, and quantize itself
    after: Pipeline               # the steps after quantize: they run on the converted graph


def prepare_qat(model: nn.Module, example_inputs: tuple, pipeline: "str | Pipeline" = "fold_bn,quantize(bits=8)", *,
                calibration: Iterable[tuple] | None, target: str = "auto") -> torch.fx.GraphModule:
    """`model` exported, with the steps of `pipeline` before its `quantize` step applied, and the
    annotation `quantize` makes realised as fake-quantize modules whose ranges are calibrated on
    `calibration`. Train it like any module (its conv/linear/norm weights and biases are parameters
    of its own, the user's model is left alone), then `convert_qat` it. Batches must be shaped like
    `example_inputs`: the graph is specialised to them.
    """
    from ..api import compress
    from ..backends import get_target
    from ..passes.quantize import resolve_setup

    parsed = Pipeline.parse(pipeline)
    before, step, after = _split_at_quantize(parsed)
    example_inputs = tuple(example_inputs)
    batches = checked_batches(calibration, example_inputs, needed_by="prepare_qat")  # before the slow export
    resolved = get_target(target)
    setup = _for_training(resolve_setup(step.options, resolved.quant_caps, resolved.name))

    gm = compress(model, example_inputs, before, calibration=batches, target=target)
    records = list(gm.edge_report.records)
    start = time.perf_counter()
    make_weights_trainable(gm)  # first: prepare's batch-norm folding copies requires_grad from the conv weights
    quantizer = FakeQuantQuantizer(setup)
    gm = prepare_pt2e(gm, quantizer)  # not prepare_qat_pt2e: see the module's docstring
    remove_unused_attributes(gm)  # e.g. weights that batch-norm folding replaced: they would get no gradient
    if quantizer.annotated:
        used = _calibrate_ranges(gm, batches, example_inputs)
    else:
        used = 0
        log.warning("prepare_qat: nothing to quantise (no conv, linear or activation matmul outside the ignore "
                    "list); the graph trains in float")
    _allow_train_eval(gm)
    gm.train()
    records.append(_quantize_record(step, quantizer, used, time.perf_counter() - start))
    context = PassContext(example_inputs=example_inputs, calibration=batches, target=resolved)
    setattr(gm, _STATE, _QatState(context, str(parsed), records, after))
    gm.edge_report = PipelineReport(str(parsed), list(records))
    return gm


def convert_qat(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The trained `gm` from `prepare_qat` with its ranges frozen into the quantize/dequantize pairs
    `quantize` produces; inference only, no parameter needs grad. It consumes `gm` (they share the
    graph and the weights). The pipeline's steps after quantize run on it; `edge_report` covers
    the whole pipeline."""
    state: _QatState | None = getattr(gm, _STATE, None)
    if state is None:
        raise OptionError("convert_qat takes the graph prepare_qat returned, once (it consumes it: "
                          "copy.deepcopy it first to keep training)")
    delattr(gm, _STATE)
    with torch.no_grad():
        _observe_current_weights(gm)
        converted = convert(gm)
    converted.requires_grad_(False)
    for module in converted.modules():  # convert_pt2e forbids .eval(); the graph is fixed already
        module.training = False
    propagate_fake(converted, state.context.example_inputs)
    records = list(state.records)
    if state.after.steps:
        with torch.no_grad():
            converted = state.after.run(converted, state.context)
        records += converted.edge_report.records
    converted.edge_report = PipelineReport(state.pipeline, records)
    return converted


def _quantize_record(step: Step, quantizer: FakeQuantQuantizer, batches: int, seconds: float) -> PassRecord:
    """The report line of the quantize step, with the stats `quantize` reports."""
    setup = quantizer.setup
    stats = {"layers_quantized": len(quantizer.annotated), "layers_ignored": len(quantizer.ignored),
             "weights": f"int{setup.bits}", "activations": "int8 symmetric" if setup.symmetric else "uint8",
             "calib": setup.calib, "calibration_batches": batches, "training": "qat"}
    return PassRecord(str(step), bool(quantizer.annotated), stats, seconds)


def _split_at_quantize(pipeline: Pipeline) -> tuple[Pipeline, Step, Pipeline]:
    """The steps before the one quantize step, that step, and the steps after it."""
    positions = [i for i, s in enumerate(pipeline.steps) if s.name == "quantize"]
    if len(positions) != 1:
        found = "no quantize step" if not positions else f"{len(positions)} quantize steps"
        raise OptionError(f"prepare_qat needs a pipeline with exactly one quantize step; {str(pipeline)!r} "
                          f"has {found}")
    i = positions[0]
    step = pipeline.steps[i]
    if step.options.weight_only:
        raise OptionError("prepare_qat: quantize(weight_only=true) is not supported for QAT (QAT trains "
                          "through fake-quantized activations and weights); quantize weights only with "
                          "compress(model, inputs, 'quantize(weight_only=true)')")
    if step.options.min_sqnr is not None:
        raise OptionError("prepare_qat: quantize(min_sqnr=...) is not supported for QAT (its layer search "
                          "measures post-training quantization); keep layers in float with "
                          "quantize(ignore=[...]) — edgepasses.quant_report ranks them")
    return Pipeline(pipeline.steps[:i]), step, Pipeline(pipeline.steps[i + 1:])


def _for_training(setup):
    """The quantize settings QAT trains with: training adjusts weights and ranges itself, so the
    post-training steps that do it from calibration data (smoothing, GPTQ, bias correction, the
    per-layer saturation check) are left out; on saturating CPUs every weight is 7-bit."""
    if setup.rounding != "nearest":
        raise OptionError("prepare_qat: quantize(rounding=...) is post-training rounding; training "
                          "rounds the weights itself (leave rounding out)")
    return dataclasses.replace(setup, smooth_alpha=None, bias_correction="off", overflow_check=False,
                               weight_qmax=63 if setup.overflow_check else setup.weight_qmax)


def _calibrate_ranges(gm: torch.fx.GraphModule, batches: list[tuple], example_inputs: tuple) -> int:
    """Set every range from the calibration batches, then fix the activation ranges for training."""
    # Fake-quant off: each observer sees what `quantize`'s would, float values all the way.
    gm.apply(disable_fake_quant)
    used = calibrate(gm, batches, example_inputs, needed_by="prepare_qat")
    gm.apply(enable_fake_quant)
    for module in gm.modules():
        if isinstance(module, FakeQuantize) and not isinstance(module, WeightFakeQuantize):
            module.disable_observer()
    return used


def _allow_train_eval(gm: torch.fx.GraphModule) -> None:
    """Give back nn.Module's train()/eval(), which prepare_pt2e replaces with ones that raise."""
    # torchao forbids them because they cannot switch dropout or batch norm in a traced graph. Ours
    # is exported from the eval-mode model (no dropout; batch norm on running statistics, or folded),
    # so both modes compute the same; torchao's allow_exported_model_train_eval would re-trace its
    # patterns (seconds) at every switch to change nothing.
    del gm.train, gm.eval


def _observe_current_weights(gm: torch.fx.GraphModule) -> None:
    """Weight ranges from the weights as trained: the last forward saw them before the last optimizer step."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), WeightFakeQuantize):
            weight = constant_value(gm, node.args[0])
            if weight is not None:
                module(weight)
