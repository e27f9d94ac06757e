"""Transformers on this CPU: our int8 beside every peer, in one interleaved run
(`edgepasses bench transformers`, written to its section of docs/benchmarks.md).

Models: the pretrained all-MiniLM-L6-v2 of the accuracy bench (quality: cosine of each sentence's
embedding to eager fp32's, nearest-neighbour agreement) and transformers' BertModel at BERT-base size
with random weights (quality: output SQNR against eager fp32), both fed sentences of Python's
documentation; `bert_tiny` is the same BertModel at a toy size, fed random tokens (a smoke test). Each
at batch x tokens shapes (default 8 x 64 and 1 x 128), every program built for that shape.

Rows: eager PyTorch fp32 (the reference of quality and latency), OpenVINO fp32, NNCF int8
(`model_type=TRANSFORMER`) on OpenVINO, ONNX Runtime's dynamic int8 (`quantize_dynamic`), and
`torch.compile(backend="edge")` with each pipeline on target openvino and on target reference, the
latter compiled by Inductor around our kernels (`target_options={"reference": {"compile": True}}`).
A pipeline with `sparsify_24` gets no openvino row: OpenVINO runs 2:4 weights dense. All rows are
timed interleaved in the same rounds (`edgepasses.measure.timing`); a row that fails is recorded
with its one-line reason and the table goes on. Below each table, where the time of the first
pipeline's reference program goes (a torch.profiler CPU profile of a few calls: our kernels,
attention, float matmuls, Inductor's fused code, the rest), and where each reference row's build
time went (Dynamo and the first call, passes, export and rewrite, Inductor).
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .accuracy import (EAGER_LABEL, EMPTY, FAILED, OPENVINO_FP32_LABEL, Builders, Candidate, Metric, Row,
                       Serialized, _cell, _eager, _edge, _escape, _nncf, _openvino_fp32, measure, nncf_label)
from .reference_compile import cache_outcome, fx_graph_cache_counts, warm_kernels

MODELS = ("minilm_l6", "bert_base", "bert_tiny")
DEFAULT_MODELS = ("minilm_l6", "bert_base")
DEFAULT_SHAPES = ((8, 64), (1, 128))
DEFAULT_PIPELINES = ("quantize", "sparsify_24,quantize")
DEFAULT_WARMUP = 3
DEFAULT_ROUNDS = 10
CALIBRATION_SENTENCES = 32  # in batches of the measured shape; the same for our pipelines, NNCF's and profiles
PROFILE_CALLS = 3

NNCF_LABEL = nncf_label("TRANSFORMER")
ORT_LABEL = "ONNX Runtime dynamic int8"

COSINE_METRICS = (Metric("mean_cosine", "mean cosine", ".4f"), Metric("min_cosine", "min cosine", ".4f"),
                  Metric("neighbours", "NN agreement %", ".1f"))
SQNR_METRICS = (Metric("sqnr_db", "SQNR dB", ".1f"),)


# The reference rows run Inductor's compiled code around our kernels, not the graph op by op.
REFERENCE_OPTIONS = {"target_options": {"reference": {"compile": True}}}


def edge_label(pipeline: str, target: str) -> str:
    compiled = " (Inductor)" if target == "reference" else ""
    return f"edge `{pipeline}` on {target}{compiled}"


def edge_targets(pipeline: str) -> tuple[str, ...]:
    """Where a pipeline is measured: OpenVINO's CPU plugin runs 2:4 weights dense, so a 2:4 pipeline
    would time the plain int8 model there again."""
    return ("reference",) if "sparsify_24" in pipeline else ("openvino", "reference")


# Models -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """A model to measure and where its inputs come from: `inputs(count, batch, seq)` gives `count`
    (token ids, attention mask) batches; the first `calibration` sentences calibrate, the next
    `evaluation` score."""
    name: str
    description: str
    module: nn.Module
    inputs: Callable[[int, int, int], list[tuple[Tensor, Tensor]]]
    evaluation: int  # sentences scored
    quality: str     # "cosine" (pretrained) or "sqnr" (random weights)


def sentence_batches(count: int, batch: int, seq: int) -> list[tuple[Tensor, Tensor]]:
    """`count` batches of `batch` documentation sentences (the accuracy bench's tokenizer and sentence
    order), padded or cut to `seq` tokens."""
    from edgepasses.zoo.sentence_embeddings import BATCH_SIZE, sentence_splits

    needed = -(-count * batch // BATCH_SIZE)
    split = sentence_splits(calibration=0, validation=0, test=needed)
    ids, mask = (torch.cat(parts)[:count * batch] for parts in zip(*split.test))
    if seq <= ids.shape[1]:
        ids, mask = ids[:, :seq], mask[:, :seq]
    else:  # padding tokens (id 0) are masked out: the same sentences, a longer program
        pad = seq - ids.shape[1]
        ids, mask = nn.functional.pad(ids, (0, pad)), nn.functional.pad(mask, (0, pad))
    return list(zip(ids.split(batch), mask.split(batch)))


def _minilm() -> Subject:
    from edgepasses.zoo.sentence_embeddings import load_encoder

    return Subject("all-MiniLM-L6-v2", "pretrained sentence encoder (6 layers, hidden 384) with mean pooling, "
                   "on sentences of Python's documentation", load_encoder(), sentence_batches, 64, "cosine")


def _bert_base() -> Subject:
    from edgepasses.zoo.bert_base import bert_base

    return Subject("BERT-base (random weights)", "transformers BertModel, hidden 768, 12 layers, 12 heads, "
                   "intermediate 3072, seeded random weights, last hidden states; fed the same sentences",
                   bert_base(), sentence_batches, 16, "sqnr")


def _bert_tiny() -> Subject:
    from edgepasses.zoo.bert_base import bert_base, random_token_batches

    config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "vocab_size": 200, "max_position_embeddings": 256}
    return Subject("BERT tiny (random weights)", "transformers BertModel, hidden 32, 1 layer, random tokens",
                   bert_base(**config), partial(random_token_batches, vocab_size=200), 8, "sqnr")


_SUBJECTS: dict[str, Callable[[], Subject]] = {"minilm_l6": _minilm, "bert_base": _bert_base, "bert_tiny": _bert_tiny}


# Rows -------------------------------------------------------------------------------------------

def _ort(module: nn.Module, example: tuple) -> Candidate:
    from edgepasses.measure.peers import onnxruntime_dynamic_int8

    return Candidate(ORT_LABEL, onnxruntime_dynamic_int8(module, example), None)


def builders(module: nn.Module, example: tuple, calibration: list[tuple], pipelines: tuple[str, ...],
             on_compile: Callable[[str, Any], None] = lambda label, compilation: None) -> Builders:
    """The rows' builders; `on_compile(label, compilation)` sees each graph an edge row compiles."""
    def edge_row(pipeline: str, target: str) -> Callable[[], Candidate]:
        label = edge_label(pipeline, target)
        return partial(_edge, module, example, calibration, pipeline, label, target,
                       on_compile=partial(on_compile, label), **(REFERENCE_OPTIONS if target == "reference" else {}))

    edge = [(edge_label(p, t), edge_row(p, t)) for p in dict.fromkeys(pipelines) for t in edge_targets(p)]
    return [(EAGER_LABEL, partial(_eager, module)),
            (OPENVINO_FP32_LABEL, partial(_openvino_fp32, module, example)),
            (NNCF_LABEL, partial(_nncf, module, example, calibration, "TRANSFORMER")),
            (ORT_LABEL, partial(_ort, module, example)), *edge]


def _scorer(subject: Subject, evaluation: list[tuple]) -> Callable[[Callable[..., Any]], dict[str, float]]:
    from edgepasses.analysis.sqnr import sqnr_db
    from edgepasses.zoo.sentence_embeddings import embed, embedding_quality

    def outputs(run) -> Tensor:
        with torch.no_grad():
            return torch.cat([run(*batch).float() for batch in evaluation])

    if subject.quality == "cosine":
        reference = embed(subject.module, evaluation)

        def cosine(run) -> dict[str, float]:
            quality = embedding_quality(reference, embed(run, evaluation))
            return {"mean_cosine": quality.mean_cosine, "min_cosine": quality.min_cosine,
                    "neighbours": 100.0 * quality.neighbour_agreement}
        return cosine
    reference = outputs(subject.module)
    return lambda run: {"sqnr_db": float(sqnr_db(reference, outputs(run)))}


# Where the time goes ----------------------------------------------------------------------------

PROFILE_CATEGORIES = ("our kernels (edge::*)", "attention (SDPA, float)", "matmul in float",
                      "Inductor-compiled code (fused glue)", "other ops", "Dynamo, Python")
_FLOAT_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                  "aten::_addmm_activation")


def profile_category(key: str) -> str:
    """The category of a torch.profiler event name."""
    if key.startswith("edge::"):
        return "our kernels (edge::*)"
    if key.startswith("aten::_scaled_dot_product") or key.startswith("aten::scaled_dot_product"):
        return "attention (SDPA, float)"
    if key.startswith(_FLOAT_MATMULS):
        return "matmul in float"
    if "::" in key:  # what Inductor left as calls (quantize, LayerNorm, allocations, views)
        return "other ops"
    # Regions, not ops: their self time is the code they run inline (Inductor's C++ kernels; Python).
    return "Inductor-compiled code (fused glue)" if key.startswith("## Call CompiledFxGraph") else "Dynamo, Python"


@dataclass(frozen=True)
class Profile:
    label: str
    calls: int
    ms_per_call: dict[str, float]  # by category, self CPU time of the calling thread's events
    largest_other: tuple[tuple[str, float], ...] = ()  # the "other ops" that cost most, ms a call

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_call.values())


def profile(label: str, run: Callable[..., Any], example: tuple, calls: int = PROFILE_CALLS) -> Profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad():
        run(*example)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run(*example)
    totals: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for event in prof.key_averages():
        ms, category = event.self_cpu_time_total / 1e3 / calls, profile_category(event.key)
        totals[category] += ms
        if category == "other ops":  # glue Inductor did not fuse lands here
            others[event.key] += ms
    return Profile(label, calls, {c: totals[c] for c in PROFILE_CATEGORIES}, tuple(others.most_common(5)))


# Where the build time goes ----------------------------------------------------------------------

@dataclass(frozen=True)
class CompileTime:
    """Where an edge row's build time went, in seconds."""
    label: str
    build_s: float                # the row's: from the model to the end of its first call
    passes_s: dict[str, float]    # per pass; quantize's includes running the calibration batches
    export_and_rewrite_s: float   # Dynamo's graph to the canonical form, the target's kernel rewrite
    inductor_s: float             # code generation and C++ compile (InductorProgram.compile_s)
    inductor_cache: str = ""      # what Inductor's FX graph cache did ("1 miss"): a hit skips the C++ build
    kernels: str = ""             # how many layers run on each of our kernels, in which integer form

    @property
    def dynamo_and_calls_s(self) -> float:
        """The rest: Dynamo's capture, recording each graph's calibration inputs, the first call."""
        return self.build_s - sum(self.passes_s.values()) - self.export_and_rewrite_s - self.inductor_s

    def dominated_by(self) -> str:
        parts = {"Dynamo, calibration inputs, first call": self.dynamo_and_calls_s, **self.passes_s,
                 "export + rewrite": self.export_and_rewrite_s, "Inductor": self.inductor_s}
        return max(parts, key=parts.__getitem__)


def compile_time(label: str, build_s: float, compilations: list[Any], inductor_cache: str = "") -> CompileTime:
    """Where a row's build time went, from the EdgeCompilation of each graph it compiled."""
    passes: Counter[str] = Counter()
    for compilation in compilations:
        for record in compilation.report.records:
            passes[record.step] += record.seconds
    inductor = sum(c.lowering.compile_s for c in compilations)  # 0: a graph left interpreted
    compiled = sum(c.seconds for c in compilations)
    kernels = "; ".join(summary for c in compilations if (summary := c.lowering.kernel_summary()))
    return CompileTime(label, build_s, dict(passes), compiled - sum(passes.values()) - inductor, inductor,
                       inductor_cache, kernels)


# One table per model and shape ------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    model: str
    description: str
    shape: tuple[int, int]  # batch, tokens
    data: str
    metrics: tuple[Metric, ...]
    rows: tuple[Row, ...]
    profile: Profile | None
    profile_error: str | None = None
    compile_times: tuple[CompileTime, ...] = ()  # the reference rows'


def measure_table(subject: Subject, batch: int, seq: int, pipelines: tuple[str, ...], *, warmup: int,
                  rounds: int, progress: Callable[[str], None]) -> Table:
    calibration_batches = max(1, CALIBRATION_SENTENCES // batch)
    evaluation_batches = max(1, subject.evaluation // batch)
    inputs = subject.inputs(calibration_batches + evaluation_batches, batch, seq)
    calibration, evaluation = inputs[:calibration_batches], inputs[calibration_batches:]
    example = evaluation[0]
    built: dict[str, Candidate] = {}  # kept for the profile
    seen: dict[str, list[Any]] = defaultdict(list)  # the EdgeCompilations of each row's build
    inductor_cache: dict[str, str] = {}

    def keeping(label: str, build: Callable[[], Candidate]) -> Callable[[], Candidate]:
        def build_and_keep() -> Candidate:
            before = fx_graph_cache_counts()
            built[label] = build()
            inductor_cache[label] = cache_outcome(before, fx_graph_cache_counts())
            return built[label]
        return build_and_keep

    row_builders = builders(subject.module, example, calibration, pipelines,
                            on_compile=lambda label, compilation: seen[label].append(compilation))
    rows = measure([(label, keeping(label, build)) for label, build in row_builders],
                   example, _scorer(subject, evaluation), warmup=warmup, rounds=rounds, progress=progress)
    references = {edge_label(p, "reference") for p in pipelines}
    compile_times = tuple(compile_time(r.label, r.build_s, seen[r.label], inductor_cache[r.label]) for r in rows
                          if r.label in references and not r.error)
    profiled, profile_error = None, None
    label = edge_label(pipelines[0], "reference")
    if label in built and not next(r for r in rows if r.label == label).error:
        progress(f"  profiling {label}")
        profiled = profile(label, built[label].run, example)
    else:
        profile_error = f"{label} failed; nothing to profile"
    data = (f"calibration {len(calibration)} batches, evaluation {len(evaluation)} batches "
            f"({len(evaluation) * batch} sequences) against eager fp32; latency: one batch")
    metrics = COSINE_METRICS if subject.quality == "cosine" else SQNR_METRICS
    return Table(subject.name, subject.description, (batch, seq), data, metrics, rows, profiled, profile_error,
                 compile_times)


@dataclass
class Report(Serialized):
    pipelines: list[str]
    warmup: int
    rounds: int
    tables: list[Table]
    minutes: float
    versions: dict[str, str]

    def to_markdown(self) -> str:
        return report_markdown(self)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:  # from the metadata: importing nncf for its version takes seconds
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {name: installed(name) for name in ("torch", "openvino", "nncf", "onnxruntime", "transformers")}


def check_choices(models: list[str] | tuple[str, ...], shapes: list[tuple[int, int]] | tuple) -> None:
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(MODELS)}")
    bad = [f"{b}x{s}" for b, s in shapes if b < 1 or s < 1]
    if bad:
        raise ValueError(f"shapes are BATCHxTOKENS, both positive; got {', '.join(bad)}")


def run_transformers(models: list[str] | tuple[str, ...] = DEFAULT_MODELS,
                     shapes: list[tuple[int, int]] | tuple = DEFAULT_SHAPES,
                     pipelines: list[str] | tuple[str, ...] = DEFAULT_PIPELINES, *, warmup: int = DEFAULT_WARMUP,
                     rounds: int = DEFAULT_ROUNDS, progress: Callable[[str], None] = lambda line: None) -> Report:
    check_choices(models, shapes)
    warm_kernels()
    start = time.perf_counter()
    tables = []
    for name in dict.fromkeys(models):
        subject = _SUBJECTS[name]()
        for batch, seq in shapes:
            progress(f"[{name} {batch}x{seq}]")
            tables.append(measure_table(subject, batch, seq, tuple(pipelines), warmup=warmup, rounds=rounds,
                                        progress=progress))
    return Report(list(pipelines), warmup, rounds, tables, round((time.perf_counter() - start) / 60, 1), _versions())


# Markdown ---------------------------------------------------------------------------------------

def _speedup(reference: Row | None, row: Row) -> str:
    if reference is None or reference.timing is None or row.timing is None:
        return EMPTY
    return f"{reference.timing.median_ms / row.timing.median_ms:.2f}×"


def table_rows(table: Table) -> list[list[str]]:
    by_label = {r.label: r for r in table.rows}
    eager, openvino = by_label.get(EAGER_LABEL), by_label.get(OPENVINO_FP32_LABEL)
    rows = []
    for row in table.rows:
        if row.error:
            rows.append([_escape(row.label), *[FAILED] * len(table.metrics), *[EMPTY] * 5])
            continue
        t = row.timing
        rows.append([_escape(row.label), *[_cell(row.scores.get(m.key), m.spec) for m in table.metrics],
                     _cell(row.build_s, ".1f"), f"{t.median_ms:.1f}", f"{t.min_ms:.1f}–{t.max_ms:.1f}",
                     _speedup(eager, row), _speedup(openvino, row)])
    return rows


def profile_lines(table: Table) -> list[str]:
    from .runner import markdown_table

    if table.profile is None:
        return [f"Where the time goes: not measured ({table.profile_error})."]
    p = table.profile
    lines = [f"Where the time goes in {p.label} (torch.profiler, CPU, {p.calls} calls; self time of the "
             f"calling thread, {p.total_ms:.1f} ms a call in all):", ""]
    rows = [[c, f"{ms:.1f}", f"{100 * ms / p.total_ms:.0f}%" if p.total_ms else EMPTY]
            for c, ms in p.ms_per_call.items()]
    largest = ", ".join(f"`{key}` {ms:.1f}" for key, ms in p.largest_other)
    return lines + markdown_table(["", "ms a call", "share"], rows) + \
        (["", f"Largest other ops, ms a call: {largest}."] if largest else [])


def _inductor_cell(spent: CompileTime) -> str:
    return f"{spent.inductor_s:.1f}" + (f" ({spent.inductor_cache})" if spent.inductor_cache else "")


def compile_time_lines(table: Table) -> list[str]:
    from .runner import markdown_table

    if not table.compile_times:
        return []
    header = ["", "build s", "Dynamo, calibration inputs, first call", "passes", "export + rewrite", "Inductor",
              "dominated by", "layers on our kernels"]
    rows = [[_escape(c.label), f"{c.build_s:.1f}", f"{c.dynamo_and_calls_s:.1f}",
             ", ".join(f"`{step}` {s:.1f}" for step, s in c.passes_s.items()) or EMPTY,
             f"{c.export_and_rewrite_s:.1f}", _inductor_cell(c), _escape(c.dominated_by()), _escape(c.kernels) or EMPTY]
            for c in table.compile_times]
    return ["Compile time of the reference programs, s (the passes include quantize's calibration runs), and "
            "the kernel and integer form each layer runs on (`edge_lowering.kernels`):", "",
            *markdown_table(header, rows)]


def table_markdown(table: Table) -> list[str]:
    from .runner import markdown_table

    batch, seq = table.shape
    header = ["", *(m.header for m in table.metrics), "build s", "median ms", "min–max ms", "× eager",
              "× OpenVINO fp32"]
    lines = [f"### {table.model}, batch {batch} × {seq} tokens", "",
             f"{table.description}. {table.data[0].upper()}{table.data[1:]}.", ""]
    lines += markdown_table(header, table_rows(table))
    notes = [f"- {_escape(r.label)}: {r.note}" for r in table.rows if r.note and not r.error] + \
            [f"- {_escape(r.label)} ✗ `{r.error}`" for r in table.rows if r.error]
    compile_times = compile_time_lines(table)
    return lines + ([""] + notes if notes else []) + [""] + profile_lines(table) + \
        ([""] + compile_times if compile_times else [])


_LEGEND = """Rows: eager PyTorch fp32 (the reference of quality and latency); OpenVINO fp32 (`torch.export`
converted and compiled by OpenVINO); NNCF int8 (`nncf.quantize`, `model_type=TRANSFORMER`, the same
calibration batches) on OpenVINO; ONNX Runtime dynamic int8 (`torch.onnx.export`, then
`quantize_dynamic` with QInt8 weights per output channel, CPU provider, torch's thread count); edge
rows are `torch.compile(backend="edge", dynamic=False)` with the pipeline on the target named; on
reference "(Inductor)": `target_options={"reference": {"compile": True}}`, the graph around our kernels
compiled by Inductor. A `sparsify_24` pipeline runs on reference only (OpenVINO runs 2:4 weights dense).
`build s`: from the model to a ready callable (export, calibration, quantization, compilation; edge:
its first call). Latency: one batch a call, every row timed interleaved in the same rounds after
untimed warm-up (and one untimed call right before each timed one); median, min–max; `× eager` and
`× OpenVINO fp32` are speed-ups (their median over the row's; > 1 is faster). A row that failed is ✗,
its reason below the table."""


def report_markdown(report: Report) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    pipelines = ", ".join(f"`{p}`" for p in report.pipelines)
    lines = [f"Pipelines: {pipelines}. Calibration: {CALIBRATION_SENTENCES} sentences per shape. Latency: "
             f"warm-up {report.warmup}, {report.rounds} interleaved rounds. Run time {report.minutes} min. "
             f"Versions: {versions}.", "", _LEGEND]
    for table in report.tables:
        lines += ["", *table_markdown(table)]
    return "\n".join(lines) + "\n"
