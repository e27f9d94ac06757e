"""What int8 costs on real weights: our pipelines beside NNCF's presets, all on OpenVINO
(`edgepasses bench accuracy`, written to docs/accuracy.md).

Three sections, each a model with real weights and a quality measure on held-out data:

- "sentence": the pretrained all-MiniLM-L6-v2 (`edgepasses.zoo.sentence_embeddings`) on sentences of
  Python's documentation: cosine of each sentence's embedding to eager fp32's, and
  nearest-neighbour agreement among the test sentences.
- "digits": the zoo's digits_cnn and digits_resnet18, trained here on scikit-learn's digits:
  top-1 on the test split and its drop against eager fp32.
- "charlm": the character transformer of `edgepasses.zoo.char_lm`, trained here on the same
  documentation: held-out perplexity and next-character accuracy.

Rows of every table: eager PyTorch fp32 (the reference), OpenVINO fp32 (the exported model
converted and compiled without compression), `torch.compile(backend="edge")` with each pipeline
on target openvino, and NNCF's post-training int8 of the converted model (default preset, and
`model_type=TRANSFORMER` for the transformers) given the very calibration batches the pipelines
get. Each row also reports the conv/matmul ops OpenVINO's compiled model really ran in u8/i8 and
the latency of one batch, all rows timed side by side (`edgepasses.measure.timing`). A row that fails to
build or run is recorded with its error and the table goes on.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from edgepasses.measure.timing import Timing, measure_side_by_side

from .coverage import _version, error_text, machine_header

SECTIONS = ("sentence", "digits", "charlm", "control")
SECTION_TITLES = {"sentence": "Pretrained sentence encoder", "digits": "Digits models (trained here)",
                  "charlm": "Char-level LM (trained here)",
                  "control": "Accuracy control with a metric (validation split), judged on held-out data"}
DEFAULT_PIPELINES = ("quantize", "smooth,quantize")
DEFAULT_ROUNDS = 20
DEFAULT_WARMUP = 10
CALIBRATION_BATCHES = 10  # every section; the same batches for our pipelines and for NNCF
DIGITS_MODELS = ("digits_cnn", "digits_resnet18")
DIGITS_BATCH = 8
CHARLM_BATCH = 8

EAGER_LABEL = "eager PyTorch fp32"
OPENVINO_FP32_LABEL = "OpenVINO fp32"
EMPTY = "-"
FAILED = "✗"


def edge_label(pipeline: str) -> str:
    return f"edge: {pipeline}"


def nncf_label(model_type: str | None) -> str:
    return f"NNCF int8, model_type={model_type}" if model_type else "NNCF int8, default"


# Results ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    spec: str  # format spec of its cells


@dataclass(frozen=True)
class Row:
    label: str
    scores: dict[str, float]   # by Metric.key; empty when the row failed
    int8_ops: int | None       # conv/matmul ops OpenVINO ran in u8/i8; None: eager PyTorch
    timing: Timing | None      # one batch; None when the row failed
    vs_eager: float | None     # this median / eager fp32 median; < 1 is faster
    build_s: float | None = None  # wall time to a ready callable (export, calibration, quantization,
                                  # compilation; edge: its first call); None: eager PyTorch
    note: str | None = None    # e.g. graphs compiled and ops left to PyTorch
    error: str | None = None


@dataclass(frozen=True)
class Table:
    section: str       # one of SECTIONS
    model: str
    description: str
    data: str          # calibration, evaluation and timed batch, in words
    metrics: tuple[Metric, ...]
    rows: tuple[Row, ...]


class Serialized:
    """`to_dict` / `to_json` of a report dataclass (the `--json` output)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class Report(Serialized):
    header: dict[str, Any]
    pipelines: list[str]
    warmup: int
    rounds: int
    tables: list[Table]
    skipped: dict[str, str]  # section -> why it is not in the report

    def to_markdown(self) -> str:
        return report_markdown(self)


# Candidates: ways to run a model, before they are scored and timed ------------------------------

@dataclass(frozen=True)
class Candidate:
    label: str
    run: Callable[..., Any]
    int8_ops: int | None
    note: str | None = None


def _eager(module: torch.nn.Module) -> Candidate:
    return Candidate(EAGER_LABEL, module, None)


def _openvino_fp32(module: torch.nn.Module, example: tuple) -> Candidate:
    from edgepasses.measure.peers import openvino_direct

    program = openvino_direct(module, example)
    return Candidate(OPENVINO_FP32_LABEL, program, program.integer_compute_ops())


def _nncf(module: torch.nn.Module, example: tuple, calibration: list[tuple], model_type: str | None) -> Candidate:
    """NNCF's post-training int8 of the converted exported model, as the models bench's NNCF peer."""
    from edgepasses.measure.peers import nncf_int8

    program = nncf_int8(module, example, calibration, model_type=model_type)
    return Candidate(nncf_label(model_type), program, program.integer_compute_ops())


def _edge(module: torch.nn.Module, example: tuple, calibration: list[tuple], pipeline: str,
          label: str | None = None, target: str = "openvino", **extra) -> Candidate:
    """`torch.compile(backend="edge")` on `target`, with the options the models bench uses
    (and `extra` options: a metric, target_options, an `on_compile` that sees each compilation too)."""
    compilations: list = []  # edgepasses.backend.EdgeCompilation, one per graph Dynamo hands over
    caller_on_compile = extra.pop("on_compile", None)

    def on_compile(compilation) -> None:
        compilations.append(compilation)
        if caller_on_compile is not None:
            caller_on_compile(compilation)

    options = {"pipeline": pipeline, "target": target, "calibration": calibration, **extra,
               "on_compile": on_compile,
               # The weights are frozen into the lowered program: guards on the module tree protect
               # nothing it uses and cost time on every call.
               "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    compiled = torch.compile(module, backend="edge", dynamic=False, options=options)
    compiled(*example)
    if not compilations:
        raise RuntimeError("torch.compile(backend='edge') compiled no graph; the row would time eager PyTorch")
    fallbacks = sum(len(c.lowering.fallbacks) for c in compilations)
    notes = ([f"{len(compilations)} graphs"] if len(compilations) > 1 else []) + \
            ([f"{fallbacks} ops left to PyTorch"] if fallbacks else []) + \
            [_float_layers_note(c.report.records[-1].stats) for c in compilations if "metric" in extra]
    return Candidate(label or edge_label(pipeline), compiled, sum(c.lowering.int8_ops for c in compilations),
                     ", ".join(notes) or None)


def _float_layers_note(stats: dict) -> str:
    layers = stats.get("float_layers", [])
    return (f"metric on the validation split: {stats['metric_float']:.4g} float, {stats['metric_all_int8']:.4g} "
            f"all int8, {stats['metric']:.4g} with {len(layers)} layer(s) float: {', '.join(layers) or 'none'}")


Builders = list[tuple[str, Callable[[], Candidate]]]


def candidate_builders(module: torch.nn.Module, example: tuple, calibration: list[tuple], pipelines: list[str],
                       nncf_model_types: tuple[str | None, ...]) -> Builders:
    return [(EAGER_LABEL, partial(_eager, module)),
            (OPENVINO_FP32_LABEL, partial(_openvino_fp32, module, example)),
            *[(edge_label(p), partial(_edge, module, example, calibration, p)) for p in dict.fromkeys(pipelines)],
            *[(nncf_label(t), partial(_nncf, module, example, calibration, t)) for t in nncf_model_types]]


# Scoring and timing ----------------------------------------------------------------------------

Score = Callable[[Callable[..., Any]], dict[str, float]]
Derive = Callable[[dict[str, float], dict[str, float]], dict[str, float]]  # (scores, eager's) -> scores


def _keep(scores: dict[str, float], eager: dict[str, float]) -> dict[str, float]:
    return scores


def drops(*pairs: tuple[str, str]) -> Derive:
    """Adds, per (key, drop key), eager's score minus this row's: points lost (< 0: gained)."""
    def derive(scores: dict[str, float], eager: dict[str, float]) -> dict[str, float]:
        return {**scores, **{drop: eager[key] - scores[key] for key, drop in pairs}}

    return derive


def measure(builders: Builders, example: tuple, score: Score, *, warmup: int, rounds: int,
            derive: Derive = _keep, progress: Callable[[str], None] = lambda line: None) -> tuple[Row, ...]:
    """Build, score and time (side by side, one batch `example`) every candidate; the first builder
    must be eager PyTorch, the reference of scores and latency. A candidate that fails to build or
    score becomes a row with its error."""
    torch._dynamo.reset()  # no compiled code or recompile counts carried over from another model
    candidates: dict[str, Candidate] = {}
    build_s: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for label, build in builders:
        progress(f"  {label}: building and scoring")
        start = time.perf_counter()
        try:
            # No grad for the build too: the edge backend leaves graphs that need gradients to PyTorch.
            with torch.no_grad():
                candidates[label] = build()
                build_s[label] = time.perf_counter() - start
                scores[label] = score(candidates[label].run)
        except Exception as exc:  # a failing row is a result; the table goes on
            errors[label] = error_text(exc)
        progress(f"  {label}: {'failed' if label in errors else 'done'} in {time.perf_counter() - start:.0f} s")
    eager_label = builders[0][0]
    if eager_label in errors:
        raise RuntimeError(f"{eager_label} failed, so nothing can be compared to it: {errors[eager_label]}")
    timed = {label: partial(c.run, *example) for label, c in candidates.items() if label not in errors}
    progress(f"  timing {len(timed)} rows, {rounds} interleaved rounds")
    timings = measure_side_by_side(timed, warmup, rounds, settle=1)
    eager_ms = timings[eager_label].median_ms
    rows = []
    for label, _ in builders:
        if label in errors:
            rows.append(Row(label, {}, None, None, None, error=errors[label]))
            continue
        candidate, timing = candidates[label], timings[label]
        rows.append(Row(label, derive(scores[label], scores[eager_label]), candidate.int8_ops, timing,
                        timing.median_ms / eager_ms, None if label == eager_label else build_s[label],
                        candidate.note))
    return tuple(rows)


# Sections: each returns its tables --------------------------------------------------------------

SENTENCE_METRICS = (Metric("mean_cosine", "mean cosine", ".4f"), Metric("min_cosine", "min cosine", ".4f"),
                    Metric("neighbours", "NN agreement %", ".1f"))
DIGITS_METRICS = (Metric("top1", "top-1 %", ".2f"), Metric("drop", "drop (points)", ".2f"))
CHARLM_METRICS = (Metric("perplexity", "perplexity", ".3f"), Metric("perplexity_rise", "Δ perplexity", "+.3f"),
                  Metric("next_char", "next-char acc %", ".2f"), Metric("drop", "acc drop (points)", ".2f"))


def sentence_section(pipelines: list[str], warmup: int, rounds: int,
                     progress: Callable[[str], None]) -> list[Table]:
    from edgepasses.zoo.sentence_embeddings import BATCH_SIZE, SEQ_LEN, embed, embedding_quality, load_encoder, sentence_splits

    model = load_encoder()
    splits = sentence_splits(calibration=CALIBRATION_BATCHES)
    with torch.no_grad():
        reference = embed(model, splits.test)

    def score(run: Callable[..., Any]) -> dict[str, float]:
        quality = embedding_quality(reference, embed(run, splits.test))
        return {"mean_cosine": quality.mean_cosine, "min_cosine": quality.min_cosine,
                "neighbours": 100.0 * quality.neighbour_agreement}

    builders = candidate_builders(model, splits.test[0], splits.calibration, pipelines, (None, "TRANSFORMER"))
    rows = measure(builders, splits.test[0], score, warmup=warmup, rounds=rounds, progress=progress)
    shape = f"{BATCH_SIZE}x{SEQ_LEN} tokens"
    data = (f"calibration {len(splits.calibration)} batches of {shape}; evaluation: the test split, "
            f"{len(splits.test)} batches ({len(splits.test) * BATCH_SIZE} sentences), against eager fp32's "
            f"embeddings; latency: one batch of {shape}")
    return [Table("sentence", "all-MiniLM-L6-v2", "pretrained sentence-transformers encoder (6 layers, hidden "
                  "384) with mean pooling, on sentences of Python's documentation", data, SENTENCE_METRICS, rows)]


def digits_section(pipelines: list[str], warmup: int, rounds: int, progress: Callable[[str], None],
                   models: tuple[str, ...] = DIGITS_MODELS) -> list[Table]:
    from edgepasses.zoo.digits import load_digits_split
    from edgepasses.zoo import get_model

    tables = []
    for name in models:
        progress(f" {name}")
        zoo = get_model(name, DIGITS_BATCH)
        calibration = zoo.calibration(CALIBRATION_BATCHES)
        builders = candidate_builders(zoo.module, zoo.example_inputs, calibration, pipelines, (None,))
        rows = measure(builders, zoo.example_inputs, lambda run, zoo=zoo: {"top1": zoo.accuracy_fn(run)},
                       warmup=warmup, rounds=rounds, derive=drops(("top1", "drop")), progress=progress)
        shape = "x".join(map(str, zoo.example_inputs[0].shape))
        test_images = len(load_digits_split(zoo.example_inputs[0].shape[-1]).test_y)
        data = (f"calibration {len(calibration)} batches of {DIGITS_BATCH} train images; evaluation: the "
                f"test split ({test_images} images, batches of {DIGITS_BATCH}); latency: one batch of {shape}")
        tables.append(Table("digits", name, zoo.description, data, DIGITS_METRICS, rows))
    return tables


def charlm_section(pipelines: list[str], warmup: int, rounds: int,
                   progress: Callable[[str], None]) -> list[Table]:
    from edgepasses.zoo import char_lm

    model = char_lm.load_or_train_char_lm()
    calibration = char_lm.calibration_batches(CALIBRATION_BATCHES, CHARLM_BATCH)
    evaluation = char_lm.eval_batches(CHARLM_BATCH)
    example = evaluation[0][:1]

    def score(run: Callable[..., Any]) -> dict[str, float]:
        return {"perplexity": char_lm.perplexity(run, CHARLM_BATCH),
                "next_char": char_lm.next_char_accuracy(run, CHARLM_BATCH)}

    def derive(scores: dict[str, float], eager: dict[str, float]) -> dict[str, float]:
        return {**drops(("next_char", "drop"))(scores, eager),
                "perplexity_rise": scores["perplexity"] - eager["perplexity"]}

    builders = candidate_builders(model, example, calibration, pipelines, ("TRANSFORMER",))
    rows = measure(builders, example, score, warmup=warmup, rounds=rounds, derive=derive, progress=progress)
    shape = f"{CHARLM_BATCH}x{char_lm.SEQ_LEN} characters"
    data = (f"calibration {len(calibration)} batches of {shape} from the training text; evaluation: every "
            f"held-out window, {len(evaluation)} batches of {shape}; latency: one batch of {shape}")
    description = (f"causal character transformer ({type(model).__name__}, "
                   f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) trained on "
                   "Python's documentation")
    return [Table("charlm", "char_lm", description, data, CHARLM_METRICS, rows)]


CONTROL_MAX_DROP = {"minilm": 0.002, "digits": 0.0}


def _controlled_builders(module, example, calibration, metric, max_drop: float) -> Builders:
    label = f"edge: quantize, metric, max_drop={max_drop}"
    return [(EAGER_LABEL, partial(_eager, module)),
            (OPENVINO_FP32_LABEL, partial(_openvino_fp32, module, example)),
            (edge_label("quantize"), partial(_edge, module, example, calibration, "quantize")),
            (label, partial(_edge, module, example, calibration, "quantize", label, metric=metric,
                            max_drop=max_drop))]


def control_section(pipelines: list[str], warmup: int, rounds: int, progress: Callable[[str], None]) -> list[Table]:
    """Accuracy control with a user metric on a validation split, judged on a held-out test split:
    the pretrained sentence encoder (metric: mean cosine to the float embeddings) and the digits
    ResNet-18 (metric: top-1 on half the test split; the other half is held out)."""
    from edgepasses.zoo.digits import load_digits_split
    from edgepasses.zoo.sentence_embeddings import embed, embedding_quality, load_encoder, sentence_splits
    from edgepasses.zoo import get_model

    model = load_encoder()
    splits = sentence_splits(calibration=CALIBRATION_BATCHES)
    with torch.no_grad():
        validation, test = embed(model, splits.validation), embed(model, splits.test)

    def cosine_on_validation(run) -> float:
        return embedding_quality(validation, embed(run, splits.validation)).mean_cosine

    def sentence_score(run) -> dict[str, float]:
        quality = embedding_quality(test, embed(run, splits.test))
        return {"mean_cosine": quality.mean_cosine, "min_cosine": quality.min_cosine,
                "neighbours": 100.0 * quality.neighbour_agreement}

    progress(" all-MiniLM-L6-v2")
    rows = measure(_controlled_builders(model, splits.test[0], splits.calibration, cosine_on_validation,
                                        CONTROL_MAX_DROP["minilm"]), splits.test[0], sentence_score,
                   warmup=warmup, rounds=rounds, progress=progress)
    tables = [Table("control", "all-MiniLM-L6-v2", "metric: mean cosine to the float embeddings on the validation "
                    f"split ({len(splits.validation)} batches), max_drop {CONTROL_MAX_DROP['minilm']}",
                    "scored on the held-out test split", SENTENCE_METRICS, rows)]

    zoo = get_model("digits_resnet18", DIGITS_BATCH)
    data = load_digits_split(zoo.example_inputs[0].shape[-1])
    half = len(data.test_y) // 2 // DIGITS_BATCH * DIGITS_BATCH
    val = [(data.test_x[i:i + DIGITS_BATCH], data.test_y[i:i + DIGITS_BATCH]) for i in range(0, half, DIGITS_BATCH)]
    held = [(data.test_x[i:i + DIGITS_BATCH], data.test_y[i:i + DIGITS_BATCH])
            for i in range(half, len(data.test_y) - DIGITS_BATCH + 1, DIGITS_BATCH)]

    def top1(run, batches) -> float:
        with torch.no_grad():
            return 100.0 * sum((run(x).argmax(-1) == y).sum().item() for x, y in batches) / sum(len(y) for _, y in batches)

    progress(" digits_resnet18")
    rows = measure(_controlled_builders(zoo.module, zoo.example_inputs, zoo.calibration(CALIBRATION_BATCHES),
                                        partial(top1, batches=val), CONTROL_MAX_DROP["digits"]),
                   zoo.example_inputs, lambda run: {"top1": top1(run, held)}, warmup=warmup, rounds=rounds,
                   derive=drops(("top1", "drop")), progress=progress)
    tables.append(Table("control", "digits_resnet18", f"metric: top-1 % on the first {half} test images, "
                        f"max_drop {CONTROL_MAX_DROP['digits']}", f"scored on the other {len(held) * DIGITS_BATCH} "
                        "test images (held out)", DIGITS_METRICS, rows))
    return tables


_SECTION_FUNCTIONS = {"sentence": sentence_section, "digits": digits_section, "charlm": charlm_section,
                      "control": control_section}


def _unavailable(section: str) -> str | None:
    """Why a section cannot run here (a module it needs is missing), or None."""
    if section == "charlm":
        import importlib.util

        if importlib.util.find_spec("edgepasses.zoo.char_lm") is None:
            return "edgepasses.zoo.char_lm is not in this checkout"
    return None


def run_accuracy(pipelines: list[str] | tuple[str, ...] = DEFAULT_PIPELINES,
                 sections: list[str] | tuple[str, ...] = SECTIONS, *, warmup: int = DEFAULT_WARMUP,
                 rounds: int = DEFAULT_ROUNDS, progress: Callable[[str], None] = lambda line: None,
                 digits_models: tuple[str, ...] = DIGITS_MODELS) -> Report:
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    header = machine_header()  # before our own work raises the load average
    header["versions"]["nncf"] = _version("nncf")
    header["calibration_batches"] = CALIBRATION_BATCHES
    start = time.perf_counter()
    tables: list[Table] = []
    skipped: dict[str, str] = {}
    for section in dict.fromkeys(sections):
        reason = _unavailable(section)
        if reason:
            skipped[section] = reason
            continue
        progress(f"[{section}]")
        function = _SECTION_FUNCTIONS[section]
        if section == "digits":
            function = partial(function, models=digits_models)
        tables += function(list(pipelines), warmup, rounds, progress)
    header["minutes"] = round((time.perf_counter() - start) / 60, 1)
    return Report(header, list(pipelines), warmup, rounds, tables, skipped)


# Markdown ---------------------------------------------------------------------------------------

def _cell(value: float | None, spec: str) -> str:
    if value is None:
        return EMPTY
    text = format(value, spec)
    return format(abs(value), spec) if float(text) == 0 else text  # no "-0.000"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_rows(table: Table) -> list[list[str]]:
    rows = []
    for row in table.rows:
        label = _escape(row.label)
        if row.error:
            rows.append([label, *[FAILED] * len(table.metrics), *[EMPTY] * 5])
            continue
        t = row.timing
        rows.append([label, *[_cell(row.scores.get(m.key), m.spec) for m in table.metrics],
                     _cell(row.int8_ops, "d"), _cell(row.build_s, ".1f"), f"{t.median_ms:.3g}",
                     f"{t.min_ms:.3g}–{t.max_ms:.3g}", f"{row.vs_eager:.3g}"])
    return rows


def table_markdown(table: Table) -> list[str]:
    from .runner import markdown_table

    header = ["", *(m.header for m in table.metrics), "int8 ops", "build s", "median ms", "min–max ms",
              "× eager latency"]
    lines = [f"### {table.model}", "", f"{table.description}. {table.data[0].upper()}{table.data[1:]}.", ""]
    lines += markdown_table(header, table_rows(table))
    notes = [f"- {_escape(r.label)}: {r.note}" for r in table.rows if r.note] + \
            [f"- {_escape(r.label)} failed: `{r.error}`" for r in table.rows if r.error]
    return lines + ([""] + notes if notes else [])


def header_lines(header: dict[str, Any]) -> list[str]:
    """The lines of `bench.coverage.machine_header()`'s facts, for this bench."""
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    load = " / ".join(f"{x:.2f}" for x in header["load_average"])
    commit = f" at commit {header['commit']}" if header.get("commit") else ""
    minutes = f" in {header['minutes']} min" if "minutes" in header else ""
    busy = (". The machine was busy (load above its logical CPUs): latencies are inflated, "
            "eager PyTorch's the most" if header["load_average"][0] > (header["logical_cpus"] or 0) else "")
    return [f"Generated {header['date']} by `edgepasses bench accuracy`{commit}{minutes}.", "",
            (f"Machine: {header['cpu']}, {header['logical_cpus']} logical CPUs, torch threads "
             f"{header['torch_threads']}, load average {load} (1/5/15 min) at start{busy}."), "",
            f"Versions: {versions}."]


_LEGEND = """Rows: eager PyTorch fp32 (the reference of every quality column and of latency); OpenVINO
fp32 (`torch.export` of the model converted and compiled by OpenVINO, no compression);
`edge: <pipeline>` is `torch.compile(model, backend="edge", dynamic=False, options={"pipeline": ...,
"target": "openvino", "calibration": ...})`; NNCF int8 is `nncf.quantize` of the same converted
model with the same calibration batches (`subset_size` = their number), default preset or
`model_type=TRANSFORMER`, compiled by OpenVINO the same way. `int8 ops`: convolutions and matmuls
OpenVINO's compiled model runs in u8/i8, i.e. int8 that really ran (summed over the graphs Dynamo
compiled). `build s`: wall time from the model to a ready callable (export, calibration,
quantization, OpenVINO compilation; for edge rows the first call, Dynamo tracing included).
Latency: one batch per call, every row timed interleaved in the same rounds (after warm-up, one
untimed call right before each timed one); `× eager latency` is the row's median over eager
fp32's (< 1 is faster). `drop`: eager fp32's score minus the row's, in points (< 0: better)."""


def report_markdown(report: Report) -> str:
    pipelines = ", ".join(f"`{p}`" for p in report.pipelines)
    lines = ["# What int8 costs on real weights", "", *header_lines(report.header), "",
             (f"Pipelines: {pipelines}. Calibration: {report.header['calibration_batches']} batches per model. "
              f"Latency: warm-up {report.warmup}, {report.rounds} interleaved rounds."), "", _LEGEND]
    for section in SECTIONS:
        tables = [t for t in report.tables if t.section == section]
        if tables:
            lines += ["", f"## {SECTION_TITLES[section]}"]
            for table in tables:
                lines += ["", *table_markdown(table)]
    if report.skipped:
        lines += ["", "## Not measured", ""]
        lines += [f"- {SECTION_TITLES[s]} (`{s}`): {why}" for s, why in report.skipped.items()]
    return "\n".join(lines) + "\n"
