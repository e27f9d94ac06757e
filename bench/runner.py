"""`bench_model`: one zoo model run eagerly, by OpenVINO directly, by NNCF int8, and through `edge`.

Rows, all timed side by side in one run (`edgepasses.measure.timing`):

- "eager fp32": the torch module as it is.
- "openvino direct", the peer: `torch.export.export(model, args)` converted and compiled by
  OpenVINO with exactly the configuration our openvino target uses (`OpenVINOProgram`), without
  our passes and without torch.compile. It is called through the same `OpenVINOProgram` wrapper
  our target returns, so both pay the same calling overhead and the ratio between an edge row and
  the peer shows what our passes and the torch.compile path (Dynamo guards) add or save.
- "nncf int8 + openvino", the int8 peer (when a pipeline quantizes, or on request): NNCF's
  post-training quantization of the converted model with its defaults and the very calibration
  batches the edge rows get, compiled with the same configuration and called through the same
  wrapper. The ratio between an edge int8 row and it shows how our int8 compares with the best
  int8 flow OpenVINO has.
- "edge: <pipeline>": `torch.compile(model, backend="edge", dynamic=False, options=...)`; "edge: auto"
  (pipeline="auto", the search) with the options `edge_options["auto"]` adds (metric, search, cache_dir),
  its `AutoResult` kept in the row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

import edgepasses
from edgepasses.backends import tensors_mb
from edgepasses.measure.peers import nncf_int8, openvino_direct
from edgepasses.measure.timing import Timing, measure_side_by_side
from edgepasses.zoo import ZooModel, get_model

from .report import cpu_text

EAGER_LABEL = "eager fp32"
PEER_LABEL = "openvino direct"
NNCF_LABEL = "nncf int8 + openvino"
OPTIONAL_PEERS = ("nncf",)
CALIBRATION_BATCHES = 8  # only data-aware passes (quantization) and the NNCF peer read them
AUTO_PIPELINE = "auto"


def edge_label(pipeline: str) -> str:
    return f"edge: {pipeline}"


def direct_label(pipeline: str) -> str:
    return f"edge lower(), no Dynamo: {pipeline}"


@dataclass(frozen=True)
class Machine:
    cpu: str
    logical_cpus: int
    torch_threads: int
    torch_version: str
    openvino_version: str
    load_average: float  # 1-minute, when the run started: other jobs on a shared machine

    @classmethod
    def here(cls) -> "Machine":
        import openvino

        return cls(cpu_text(), os.cpu_count() or 0, torch.get_num_threads(), torch.__version__,
                   openvino.__version__, os.getloadavg()[0])

    @property
    def busy(self) -> bool:
        return self.load_average > self.logical_cpus

    def __str__(self) -> str:
        text = (f"Machine: {self.cpu}, {self.logical_cpus} logical CPUs, torch threads {self.torch_threads}, "
                f"torch {self.torch_version}, OpenVINO {self.openvino_version}, "
                f"load average {self.load_average:.1f} at start")
        if self.busy:
            # With other jobs on every core, eager PyTorch's OpenMP threads spin-wait on each other
            # and eager latency grows many times over; OpenVINO's thread pool suffers far less.
            text += (". The machine was busy: eager timings and speedups vs eager are inflated; "
                     "ratios vs OpenVINO direct hold up better")
        return text


@dataclass(frozen=True)
class Row:
    label: str
    median_ms: float
    min_ms: float
    max_ms: float
    speedup_vs_eager: float        # eager median / this median
    ratio_vs_peer: float           # this median / peer median; < 1 is faster than OpenVINO direct
    ratio_vs_nncf: float | None    # this median / NNCF median; None without the NNCF row
    size_mb: float                 # weights as the runtime holds them: eager, the module's parameters
                                   # and buffers; OpenVINO rows, the constants of the OpenVINO model
                                   # (i8 where quantised); edge, those of what the target lowered
    max_abs_error: float           # vs eager on the example inputs
    error_vs_fake_quant: float | None  # edge int8 rows: vs the pipeline's own quantize/dequantize
                                       # graph run in PyTorch, i.e. what lowering to int8 adds
    top1: float | None             # % on the digits test split; None for random-weight models
    compile_s: float | None        # wall time to a ready callable; edge: the first call (Dynamo
                                   # tracing, export, pipeline, OpenVINO conversion, one inference)
    precision: str                 # as the runtime reports it
    fallbacks: int                 # ops left to PyTorch
    int8_ops: int | None           # compute ops the runtime ran in integer precision; None: eager
    samples_ms: tuple[float, ...]
    cosine: float | None = None    # mean cosine of the outputs to eager's on inputs no row calibrated on
                                   # (bench_model's cosine_batches); None when not asked for
    auto: dict | None = None       # "edge: auto": the search's AutoResult (as a dict)


@dataclass(frozen=True)
class BenchResult:
    model: str
    description: str
    input_shapes: tuple[tuple[int, ...], ...]
    target: str
    precision: str
    warmup: int
    rounds: int
    machine: Machine
    rows: tuple[Row, ...]

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def to_markdown(self) -> str:
        shown = [c for c in _COLUMNS if not c.optional or any(c.cell(row) != EMPTY_CELL for row in self.rows)]
        lines = [f"### {self.model}: {self.description}", "",
                 f"input {format_shapes(self.input_shapes)}, target {self.target}, precision {self.precision}, "
                 f"warmup {self.warmup}, {self.rounds} interleaved rounds", ""]
        lines += markdown_table([c.header for c in shown], [[c.cell(row) for c in shown] for row in self.rows])
        return "\n".join(lines + ["", str(self.machine)])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def format_shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("x".join(map(str, shape)) for shape in shapes)


def format_ms(ms: float) -> str:
    return f"{ms:.3g}"


EMPTY_CELL = "-"


def _optional(value: float | None, spec: str) -> str:
    return EMPTY_CELL if value is None else format(value, spec)


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[Row], str]
    optional: bool = False  # left out of the table when every row's cell is empty


_COLUMNS = (
    _Column("", lambda row: row.label),
    _Column("median ms", lambda row: format_ms(row.median_ms)),
    _Column("min–max ms", lambda row: f"{format_ms(row.min_ms)}–{format_ms(row.max_ms)}"),
    _Column("speedup vs eager", lambda row: f"{row.speedup_vs_eager:.2f}x"),
    _Column("vs OpenVINO direct", lambda row: f"{row.ratio_vs_peer:.2f}"),
    _Column("vs NNCF", lambda row: _optional(row.ratio_vs_nncf, ".2f"), optional=True),
    _Column("size MB", lambda row: f"{row.size_mb:.1f}"),
    _Column("max abs err", lambda row: f"{row.max_abs_error:.1e}"),
    _Column("err vs own fake-quant", lambda row: _optional(row.error_vs_fake_quant, ".1e"), optional=True),
    _Column("top-1 %", lambda row: _optional(row.top1, ".1f")),
    _Column("cosine to eager", lambda row: _optional(row.cosine, ".4f"), optional=True),
    _Column("compile s", lambda row: _optional(row.compile_s, ".1f")),
    _Column("precision", lambda row: row.precision),
    _Column("int8 ops", lambda row: _optional(row.int8_ops, "d")),
    _Column("fallbacks", lambda row: str(row.fallbacks)),
)


@dataclass(frozen=True)
class _Candidate:
    """A way to run the model, before it is measured."""
    label: str
    run: Callable[..., Any]
    size_mb: float
    compile_s: float | None
    precision: str
    fallbacks: int
    int8_ops: int | None
    # Edge int8 rows: the pipeline's quantize/dequantize graph, run eagerly as the reference for
    # what lowering adds on top of the quantization error itself.
    own_fake_quant: Callable[..., Any] | None = None
    auto: dict | None = None  # pipeline="auto": the AutoResult of the model's first graph, as a dict


def _quantizes(pipeline: str) -> bool:
    if pipeline == AUTO_PIPELINE:  # the search decides; its pick has no Q/DQ reference graph to compare with
        return False
    return any(step.name == "quantize" for step in edgepasses.Pipeline.parse(pipeline).steps)


def _wants_nncf(pipelines: list[str], peers: tuple[str, ...]) -> bool:
    unknown = set(peers) - set(OPTIONAL_PEERS)
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(sorted(unknown))}; valid: {', '.join(OPTIONAL_PEERS)}")
    return "nncf" in peers or any(map(_quantizes, pipelines))


def _eager(zoo: ZooModel) -> _Candidate:
    return _Candidate(EAGER_LABEL, zoo.module, tensors_mb(zoo.module), None, "f32", 0, None)


def _peer(zoo: ZooModel, precision: str) -> _Candidate:
    start = time.perf_counter()
    program = openvino_direct(zoo.module, zoo.example_inputs, precision)
    return _Candidate(PEER_LABEL, program, program.weights_mb, time.perf_counter() - start,
                      program.precision, 0, program.integer_compute_ops())


def _nncf(zoo: ZooModel, calibration: list[tuple] | None, precision: str) -> _Candidate:
    if not calibration:
        raise ValueError(f"the NNCF peer needs calibration batches and model {zoo.name} has none")
    start = time.perf_counter()  # compile_s: export, conversion, quantization and compilation
    program = nncf_int8(zoo.module, zoo.example_inputs, calibration, precision, zoo.nncf_model_type)
    return _Candidate(NNCF_LABEL, program, program.weights_mb, time.perf_counter() - start,
                      program.precision, 0, program.integer_compute_ops())


def _edge(zoo: ZooModel, calibration: list[tuple] | None, pipeline: str, target: str,
          precision: str, extra: dict | None = None, fake_quant_reference: bool = True) -> _Candidate:
    compilations: list = []  # edgepasses.backend.EdgeCompilation, one per graph Dynamo hands over
    options = {**(extra or {}), "pipeline": pipeline, "target": target, "precision": precision,
               "calibration": calibration, "on_compile": compilations.append,
               # The backend freezes the weights into the OpenVINO program, so Dynamo's per-call guards
               # on the module tree protect nothing it uses; they cost time on every call (torch.compile
               # takes this option itself, the backend never sees it).
               "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    # dynamic=False: one static program for the benchmark's one shape (no shape inference per call).
    compiled = torch.compile(zoo.module, backend="edge", dynamic=False, options=options)
    start = time.perf_counter()
    compiled(*zoo.example_inputs)
    compile_s = time.perf_counter() - start
    if not compilations:
        raise RuntimeError(f"torch.compile(backend='edge') compiled no graph of {zoo.name}; the edge row "
                           "would time eager PyTorch")
    # Quantizing pipelines only: their Q/DQ graph run in PyTorch is the reference for what lowering adds.
    own_fake_quant = edgepasses.compress(zoo.module, zoo.example_inputs, pipeline, calibration=calibration,
                                         target=target) if fake_quant_reference and _quantizes(pipeline) else None
    precisions = ",".join(sorted({c.lowering.precision for c in compilations}))
    fallbacks = sum(len(c.lowering.fallbacks) for c in compilations)
    int8_ops = sum(c.lowering.int8_ops for c in compilations)
    weights_mb = sum(c.lowering.weights_mb for c in compilations)
    auto = next((c.auto.to_dict() for c in compilations if getattr(c, "auto", None) is not None), None)
    return _Candidate(edge_label(pipeline), compiled, weights_mb, compile_s, precisions, fallbacks,
                      int8_ops, own_fake_quant=own_fake_quant, auto=auto)


def _edge_direct(zoo: ZooModel, calibration: list[tuple] | None, pipeline: str, target: str,
                 precision: str) -> _Candidate:
    """`compress` + `lower`: the same program without torch.compile's per-call work (Dynamo's call
    path, slowest with cold caches, as between two timed OpenVINO calls)."""
    start = time.perf_counter()
    compressed = edgepasses.compress(zoo.module, zoo.example_inputs, pipeline, calibration=calibration,
                                     target=target)
    program = edgepasses.lower(compressed, zoo.example_inputs, target=target, precision=precision)
    lowering = program.edge_lowering
    return _Candidate(direct_label(pipeline), program, lowering.weights_mb, time.perf_counter() - start,
                      lowering.precision, len(lowering.fallbacks), lowering.int8_ops,
                      own_fake_quant=compressed if _quantizes(pipeline) else None)


def _max_abs_error(expected: Any, actual: Any) -> float:
    pairs = zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual), strict=True)
    return max((float((e.double() - a.double()).abs().max()) for e, a in pairs), default=0.0)


@contextlib.contextmanager
def _progress(enabled: bool, model: str, total: int) -> Iterator[Callable[..., None]]:
    """Yields `update(description=None, advance=0)`: a rich progress bar on stderr, or nothing."""
    if not enabled:
        yield lambda description=None, advance=0: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    # stderr, so that stdout carries only the results.
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(model, total=total)

        def update(description: str | None = None, advance: int = 0) -> None:
            bar.update(task, description=f"{model}: {description}" if description else None, advance=advance)

        yield update


def _fake_quant_errors(candidates: list[_Candidate], inputs: tuple) -> dict[str, float]:
    return {c.label: _max_abs_error(c.own_fake_quant(*inputs), c.run(*inputs))
            for c in candidates if c.own_fake_quant is not None}


def _cosines(zoo: ZooModel, candidates: list[_Candidate], batches: int, calibrated: int) -> dict[str, float]:
    """Each candidate's mean output cosine to eager on `batches` inputs past the calibration ones (the
    zoo's calibration inputs are a seeded sequence, so these are inputs no row calibrated on)."""
    if not batches or not zoo.calibration:
        return {}
    from edgepasses.search.auto import mean_cosine

    unseen = zoo.calibration(calibrated + batches)[calibrated:]
    if not unseen:
        return {}
    reference = [zoo.module(*inputs) for inputs in unseen]
    return {c.label: mean_cosine(reference, [c.run(*inputs) for inputs in unseen]) for c in candidates}


def _rows(candidates: list[_Candidate], timings: dict[str, Timing], errors: dict[str, float],
          fake_quant_errors: dict[str, float], top1: dict[str, float],
          cosines: dict[str, float] | None = None) -> tuple[Row, ...]:
    eager, peer = timings[EAGER_LABEL].median_ms, timings[PEER_LABEL].median_ms
    nncf = timings[NNCF_LABEL].median_ms if NNCF_LABEL in timings else None
    rows = []
    for c in candidates:
        t = timings[c.label]
        rows.append(Row(c.label, t.median_ms, t.min_ms, t.max_ms, eager / t.median_ms, t.median_ms / peer,
                        t.median_ms / nncf if nncf is not None else None, c.size_mb, errors[c.label],
                        fake_quant_errors.get(c.label), top1.get(c.label), c.compile_s, c.precision,
                        c.fallbacks, c.int8_ops, t.samples, (cosines or {}).get(c.label), c.auto))
    return tuple(rows)


def bench_model(model: str | ZooModel, pipelines: list[str], batch_size: int = 1, target: str = "openvino",
                precision: str = "f32", warmup: int = 10, rounds: int = 50,
                progress: bool | None = None, peers: tuple[str, ...] = (), direct: bool = False,
                edge_options: dict[str, dict] | None = None, cosine_batches: int = 0,
                fake_quant_reference: bool = True, calibration_batches: int = CALIBRATION_BATCHES) -> BenchResult:
    """Measure `model` (a zoo name, built at `batch_size`, or a `ZooModel` such as `user_model`'s) eagerly,
    as OpenVINO direct, and through `edge` with each pipeline.

    The NNCF int8 peer joins when a pipeline quantizes or `peers` names "nncf". `direct` adds, per
    pipeline, the `compress` + `lower` program called without torch.compile. `edge_options`: per pipeline,
    more torch.compile options for its edge row (pipeline "auto": {"metric": ..., "search": {...}}).
    `cosine_batches`: each row's mean output cosine to eager on that many inputs no row calibrated on.
    `fake_quant_reference=False` spares quantizing edge rows the second compression that their "err vs own
    fake-quant" column needs. `calibration_batches`: how many the quantizing rows and NNCF calibrate on.
    """
    with_nncf = _wants_nncf(pipelines, peers)  # fail on a bad peer before the slow part
    torch._dynamo.reset()  # the previous model's compiled code and recompile counts must not carry over
    machine = Machine.here()  # before our own work raises the load average
    zoo = get_model(model, batch_size) if isinstance(model, str) else model
    name = zoo.name
    calibration = zoo.calibration(calibration_batches) if zoo.calibration else None  # one set for all rows
    builders = [(EAGER_LABEL, partial(_eager, zoo)), (PEER_LABEL, partial(_peer, zoo, precision))]
    if with_nncf:
        builders.append((NNCF_LABEL, partial(_nncf, zoo, calibration, precision)))
    extra = edge_options or {}
    builders += [(edge_label(p), partial(_edge, zoo, calibration, p, target, precision, extra.get(p),
                                         fake_quant_reference))
                 for p in dict.fromkeys(pipelines)]
    if direct:
        builders += [(direct_label(p), partial(_edge_direct, zoo, calibration, p, target, precision))
                     for p in dict.fromkeys(pipelines) if p != AUTO_PIPELINE]
    total = len(builders) * (2 if zoo.accuracy_fn else 1) + rounds
    with torch.no_grad(), _progress(bool(progress), name, total) as update:
        candidates = [_build(label, build, update) for label, build in builders]
        expected = zoo.module(*zoo.example_inputs)
        errors = {c.label: _max_abs_error(expected, c.run(*zoo.example_inputs)) for c in candidates}
        fake_quant_errors = _fake_quant_errors(candidates, zoo.example_inputs)
        top1 = _top1(zoo, candidates, update) if zoo.accuracy_fn else {}
        cosines = _cosines(zoo, candidates, cosine_batches, calibration_batches)
        update(f"timing {rounds} rounds")
        timings = measure_side_by_side({c.label: partial(c.run, *zoo.example_inputs) for c in candidates},
                                       warmup, rounds, on_round=partial(update, advance=1))
    shapes = tuple(tuple(x.shape) for x in zoo.example_inputs if isinstance(x, torch.Tensor))
    return BenchResult(name, zoo.description, shapes, target, precision, warmup, rounds, machine,
                       _rows(candidates, timings, errors, fake_quant_errors, top1, cosines))


def user_model(spec: str, input_shapes: list[str], calibration_file: str | None = None) -> ZooModel:
    """The user's model as `edgepasses compress` takes it (`package.module:factory` or a .pt2 file), to bench:
    random inputs of `input_shapes` (a .pt2's own without them), calibrated on the file's batches, else on
    those inputs. A bad spec, shape or file raises an OptionError naming it."""
    from edgepasses.user_model import example_inputs, load_calibration, load_model

    module, carried = load_model(spec)
    inputs = example_inputs(input_shapes, carried, spec)
    batches = load_calibration(calibration_file, inputs) or [inputs]
    return ZooModel(spec, module, inputs, f"your model, calibrated on {calibration_file or 'its example inputs'}",
                    calibration=lambda n: batches[:n])


def _build(label: str, build: Callable[[], _Candidate], update: Callable[..., None]) -> _Candidate:
    update(f"preparing {label}")
    candidate = build()
    update(advance=1)
    return candidate


def _top1(zoo: ZooModel, candidates: list[_Candidate], update: Callable[..., None]) -> dict[str, float]:
    # Evaluated at the benchmark's batch size (the zoo pads the last batch): every candidate runs the
    # very callable that was timed, and nothing recompiles for another shape.
    top1 = {}
    for c in candidates:
        update(f"top-1 of {c.label}")
        top1[c.label] = zoo.accuracy_fn(c.run)
        update(advance=1)
    return top1
