"""The public surface: compress() a model to an inspectable GraphModule, lower() it to a target."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx

from .canonical import export_canonical
from .pass_base import PassContext
from .pipeline import DEFAULT_PIPELINE, Pipeline


def compress(model: torch.nn.Module, example_inputs: tuple, pipeline: "str | Pipeline" = DEFAULT_PIPELINE, *,
             calibration: Iterable[tuple] | None = None, target: str = "auto", verify: bool = False,
             metric: Callable[[Callable], float] | None = None, max_drop: float = 0.01,
             search: dict | None = None) -> torch.fx.GraphModule:
    """Export `model` to the canonical form and run `pipeline` over it.

    Returns the transformed GraphModule; `gm.edge_report` says what each pass did and how long it took.
    `calibration` (an iterable of input tuples) is the only data data-aware passes see. With
    `metric(model) -> float` (higher is better; called with a callable like `model`), quantize keeps
    the fewest most-sensitive layers float for it to lose at most `max_drop` of the float score.
    `pipeline="auto"` searches for the fastest compression on `target` within `max_drop` (`search`: its
    settings, docs/search.md); `gm.edge_auto` says what it chose and measured.
    """
    from .backends import get_target

    if pipeline == "auto":
        return _compress_auto(model, example_inputs, calibration, target, metric, max_drop, search)
    if search is not None:
        from .errors import OptionError

        raise OptionError(f"search settings apply to pipeline='auto'; the pipeline is {pipeline!r}")
    parsed = Pipeline.parse(pipeline)  # fail on a bad pipeline before the (slow) export
    accuracy = accuracy_control(metric, max_drop)
    _check_model_and_inputs(model, example_inputs)
    example_inputs = tuple(example_inputs)
    gm = export_canonical(model, example_inputs)
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration, target=get_target(target),
                      accuracy=accuracy)
    with torch.no_grad():
        return parsed.run(gm, ctx, verify=verify)


def _compress_auto(model, example_inputs, calibration, target: str, metric, max_drop: float, search):
    from .quant.accuracy_control import check_max_drop, check_metric, score
    from .search.auto import auto_compress, check_auto_inputs, parse_search

    check_max_drop(max_drop)
    if metric is not None:
        check_metric(metric)
    settings, batches = parse_search(search), check_auto_inputs(calibration)
    _check_model_and_inputs(model, example_inputs)
    gm = export_canonical(model, tuple(example_inputs))
    evaluate = (lambda program: score(metric, program, "compressed model")) if metric is not None else None
    with torch.no_grad():
        compressed, _, _ = auto_compress(gm, tuple(example_inputs), batches, target=target, evaluate=evaluate,
                                         max_drop=max_drop, search=settings)
    return compressed


def _check_model_and_inputs(model, example_inputs) -> None:
    from .errors import OptionError

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"compress needs a torch.nn.Module; got {type(model).__name__} (wrap a function in a "
                          "Module whose forward calls it)")
    if not isinstance(example_inputs, (tuple, list)):
        raise OptionError(f"example_inputs must be a tuple of the model's inputs, e.g. (x,); got "
                          f"{type(example_inputs).__name__}")


def accuracy_control(metric, max_drop: float):
    """The AccuracyControl of a user's metric, scored on a candidate graph itself; None without a metric."""
    from .quant.accuracy_control import AccuracyControl, check_max_drop, check_metric, score

    check_max_drop(max_drop)
    if metric is None:
        return None
    check_metric(metric)
    return AccuracyControl(lambda candidate: score(metric, candidate, "model being quantised"), max_drop)


def lower(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "auto", *,
          strict: bool = False, precision: str = "f32", cache_dir: str | None = None) -> Callable:
    """Lower a canonical GraphModule to `target`; returns a callable taking the same inputs."""
    from .backends import get_target

    return get_target(target).lower(gm, tuple(example_inputs), strict=strict, precision=precision,
                                      cache_dir=cache_dir)


def quant_report(model: torch.nn.Module, gm: torch.fx.GraphModule, eval_batches: Iterable[tuple], *,
                 calibration: Iterable[tuple] | None = None, target: str = "auto"):
    """Per-layer SQNR and one-at-a-time sensitivity of `gm`, a `compress()` result with a quantize step.

    Re-quantises `model` as `gm`'s pipeline did (with `calibration`, default the evaluation
    batches), then puts all layers but one back in float, one layer at a time, and measures on
    `eval_batches`.
    """
    from .backends import get_target
    from .errors import OptionError
    from .passes.quantize import resolve_setup
    from .quant.calibration import as_batch, checked_batches
    from .quant.sensitivity import QuantReport, RevertibleQuantization, output_sqnr, rank_layers

    steps = list(Pipeline.parse(gm.edge_report.pipeline))
    position = next((i for i, s in enumerate(steps) if s.name == "quantize"), None)
    if position is None:
        raise OptionError(f"quant_report needs a graph made by a pipeline with quantize; got "
                          f"{gm.edge_report.pipeline!r}")
    batches = [as_batch(b) for b in eval_batches]
    example_inputs = batches[0] if batches else ()
    batches = checked_batches(batches, example_inputs, needed_by="quant_report")
    calibration = batches if calibration is None else checked_batches(calibration, example_inputs,
                                                                      needed_by="quant_report")
    resolved = get_target(target)
    before = [str(s) for s in steps[:position]]
    if not any(s.name == "fold_bn" for s in steps[:position]):
        # prepare_pt2e folds eval-mode batch norm into the conv before it, so the conv outputs
        # the report compares are post-BN in the quantised graph: the float reference folds too.
        before.insert(0, "fold_bn")
    before = ",".join(before)
    float_gm = compress(model, example_inputs, before, target=target)
    setup = resolve_setup(steps[position].options, resolved.quant_caps, resolved.name, float_gm)
    with torch.no_grad():
        layers = rank_layers(RevertibleQuantization(float_gm, setup, calibration, example_inputs), float_gm, batches)
    return QuantReport(output_sqnr(model, gm, batches), layers)


def export(gm: torch.fx.GraphModule, example_inputs: tuple, path: str) -> str:
    """Write `gm` as ONNX; quantize/dequantize pairs become QuantizeLinear/DequantizeLinear,
    the explicit-Q/DQ form TensorRT's and onnxruntime's tools consume. Needs the `onnx` extra."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as exc:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'edgepasses[onnx]'") from exc
    for module in gm.modules():  # the graph is fixed already; torchao's convert_pt2e forbids .eval()
        module.training = False
    torch.onnx.export(gm, tuple(example_inputs), path, dynamo=True, verbose=False)
    return path
