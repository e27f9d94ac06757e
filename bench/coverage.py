"""The coverage matrix: every catalogued architecture (`bench.architectures`) through
`torch.compile(backend="edge")` with each compression pipeline (`edgepasses bench coverage`).

Per cell: did it compile and run (else the exception's type and first line), how many layers the
pass reached (its own stats, summed over every graph Dynamo made) out of the model's Linear/conv
layers, the graphs compiled, the ops left to PyTorch, and the output's error against eager (SQNR
for lossy pipelines, max abs for exact ones). Per model: Dynamo's graph breaks
(`torch._dynamo.explain`). A crashing cell is recorded and the matrix goes on; nothing here
works around a failure, the matrix is there to show them.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree

from edgepasses.analysis.sqnr import SqnrAccumulator

from .architectures import ARCHITECTURE_NAMES, ARCHITECTURES, Built, count_weight_layers

CELL_TEXT_LIMIT = 70  # longer error lines are cut in the table; the Failures list has them whole


@dataclass(frozen=True)
class Column:
    name: str
    pipeline: str
    target: str
    pass_name: str       # the step whose stats say what was reached
    reached_key: str     # the stat counting layers (prune: groups) the pass changed
    total_key: str | None = None  # the pass's own denominator (prune: its groups); None: Linear/conv layers
    exact: bool = False  # fp32-exact: error as max abs; else SQNR


COLUMNS: tuple[Column, ...] = (
    Column("int8-openvino", "fold_bn,quantize", "openvino", "quantize", "linear_conv_quantized"),
    Column("int8-reference", "fold_bn,quantize", "reference", "quantize", "linear_conv_quantized"),
    Column("sparse24", "sparsify_24", "reference", "sparsify_24", "layers_sparsified"),
    Column("prune", "prune(ratio=0.3)", "reference", "prune", "groups_pruned", total_key="groups"),
    Column("lowrank", "lowrank(ratio=0.5)", "reference", "lowrank", "layers_split"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)


@dataclass
class Cell:
    column: str
    compiled: bool = False
    error: str | None = None          # "Type: first line" when compiling or running failed
    error_detail: str | None = None   # its first lines (runtimes' first line is often only "Check failed at")
    reached: int | None = None        # summed over the graphs' pipeline reports
    total: int | None = None          # column.total_key summed; None: the model's Linear/conv layers
    skipped: dict[str, int] = field(default_factory=dict)  # layers the pass left alone: reason -> count
    graphs: int = 0                   # compilations (one per graph Dynamo handed the backend)
    fallbacks: list[dict] = field(default_factory=list)  # ops left to PyTorch: op, node, reason, source
    targets: list[str] = field(default_factory=list)    # the lowering's target per graph
    sqnr_db: float | None = None      # vs eager; None: not run, or identical output (max_abs_error 0)
    max_abs_error: float | None = None
    seconds: float = 0.0


@dataclass
class ModelRow:
    name: str
    source: str
    description: str
    layers: int | None = None         # Linear/conv layers (architectures.count_weight_layers)
    dynamo_graphs: int | None = None  # torch._dynamo.explain
    graph_breaks: int | None = None
    first_break: str | None = None
    error: str | None = None          # building, eager or explain failed
    cells: list[Cell] = field(default_factory=list)


# Errors and outputs -----------------------------------------------------------------------------

def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def error_text(exc: BaseException) -> str:
    """'Type: first line', unwrapping Dynamo's BackendCompilerFailed to what the backend raised."""
    inner = getattr(exc, "inner_exception", None)
    if inner is not None:
        exc = inner
    line = first_line(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def error_detail(exc: BaseException, lines: int = 6, limit: int = 600) -> str:
    """The first non-empty lines of the (unwrapped) exception's message, joined by ' / '."""
    exc = getattr(exc, "inner_exception", None) or exc
    text = " / ".join([line.strip() for line in str(exc).splitlines() if line.strip()][:lines])
    return text if len(text) <= limit else text[:limit - 1] + "…"


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tuples, dicts, transformers' ModelOutput), in order."""
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def compare(reference: list[torch.Tensor], output: list[torch.Tensor]) -> tuple[float, float | None]:
    """(max abs error, SQNR dB = 10·log10(Σref²/Σ(ref−out)²); None when identical or eager's is all zeros)."""
    shapes = [tuple(t.shape) for t in reference], [tuple(t.shape) for t in output]
    if shapes[0] != shapes[1]:
        raise ValueError(f"output shapes {shapes[1]} differ from eager's {shapes[0]}")
    energy, max_abs = SqnrAccumulator(), 0.0
    for ref, out in zip(reference, output):
        energy.add(ref, out)
        max_abs = max(max_abs, float((ref.double() - out.double()).abs().max())) if ref.numel() else max_abs
    return max_abs, None if energy.noise == 0 or energy.signal == 0 else energy.db


# Running ----------------------------------------------------------------------------------------

def _stat_sum(compilations: list, pass_name: str, key: str) -> int | None:
    """`key` of the `pass_name` step summed over every compilation's report; None if never reported."""
    values = [record.stats[key] for c in compilations for record in c.report.records
              if record.step.split("(")[0] == pass_name and key in record.stats]
    return sum(values) if values else None


def _fallback_record(fallback: Any) -> dict:
    """A lowering's Fallback (backends.partition) as plain data; unknown kinds keep their text as reason."""
    fields = ("op", "node", "reason", "source")
    if all(hasattr(fallback, f) for f in fields):
        return {f: str(getattr(fallback, f)) for f in fields}
    return {"op": "?", "node": "?", "reason": str(fallback), "source": ""}


def _record_compilations(cell: Cell, column: Column, compilations: list) -> None:
    cell.graphs = len(compilations)
    cell.reached = _stat_sum(compilations, column.pass_name, column.reached_key)
    if column.total_key:
        cell.total = _stat_sum(compilations, column.pass_name, column.total_key)
    cell.skipped = dict(Counter(reason for c in compilations for record in c.report.records
                                if record.step.split("(")[0] == column.pass_name
                                for reason in (record.stats.get("skipped") or {}).values()))
    cell.fallbacks = [_fallback_record(f) for c in compilations for f in c.lowering.fallbacks]
    cell.targets = [c.lowering.target for c in compilations]


def run_cell(built: Built, column: Column, reference: list[torch.Tensor]) -> Cell:
    """One model × pipeline: compile, run on the example inputs, compare with eager. Never raises."""
    cell, compilations = Cell(column.name), []
    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        model = copy.deepcopy(built.model)  # a pass must not leak into the next cell through shared weights
        options = {"pipeline": column.pipeline, "target": column.target, "calibration": built.calibration,
                   "on_compile": compilations.append}
        with torch.no_grad():
            output = torch.compile(model, backend="edge", options=options)(*built.example_inputs)
        cell.compiled = True
        cell.max_abs_error, cell.sqnr_db = compare(reference, output_tensors(output))
    except Exception as exc:  # the matrix records every failure and goes on
        cell.error, cell.error_detail = error_text(exc), error_detail(exc)
    finally:
        _record_compilations(cell, column, compilations)
        cell.seconds = time.perf_counter() - start
        torch._dynamo.reset()
    return cell


def explain_breaks(row: ModelRow, built: Built) -> None:
    """Dynamo's graphs and graph breaks for the model on its example inputs."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(built.model)(*built.example_inputs)
        row.dynamo_graphs, row.graph_breaks = explained.graph_count, explained.graph_break_count
        if explained.break_reasons:
            row.first_break = first_line(explained.break_reasons[0].reason)
    except Exception as exc:
        row.error = f"explain: {error_text(exc)}"
    finally:
        torch._dynamo.reset()


def run_model(name: str, columns: Iterable[Column], progress: Callable[[str], None] | None = None) -> ModelRow:
    """One row: build the model, run it eagerly, explain its graph breaks, then every column."""
    arch = ARCHITECTURES[name]
    row = ModelRow(name, arch.source, arch.description)
    try:
        built = arch.build()
        row.layers = count_weight_layers(built.model)
        with torch.no_grad():
            reference = output_tensors(built.model(*built.example_inputs))
    except Exception as exc:
        row.error = f"eager: {error_text(exc)}"
        return row
    explain_breaks(row, built)
    for column in columns:
        row.cells.append(run_cell(built, column, reference))
        if progress:
            cell = row.cells[-1]
            progress(f"{name} × {column.name}: {cell_text(cell, row, column)} ({cell.seconds:.1f} s)")
    return row


def columns_named(names: Iterable[str] | None) -> list[Column]:
    by_name = {c.name: c for c in COLUMNS}
    names = list(names or COLUMN_NAMES)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; valid columns: {', '.join(COLUMN_NAMES)}")
    return [by_name[n] for n in names]


@dataclass
class Matrix:
    header: dict[str, Any]
    columns: list[Column]
    rows: list[ModelRow]

    def to_dict(self) -> dict[str, Any]:
        return {"header": self.header, "columns": [dataclasses.asdict(c) for c in self.columns],
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        return matrix_markdown(self)


def run_matrix(models: Iterable[str] | None = None, columns: Iterable[str] | None = None,
               progress: Callable[[str], None] | None = None) -> Matrix:
    names = list(models or ARCHITECTURE_NAMES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(ARCHITECTURE_NAMES)}")
    chosen = columns_named(columns)
    header = machine_header()
    start = time.perf_counter()
    rows = []
    for i, name in enumerate(names, 1):
        if progress:
            progress(f"[{i}/{len(names)}] {name}")
        rows.append(run_model(name, chosen, progress))
    header["minutes"] = round((time.perf_counter() - start) / 60, 1)
    return Matrix(header, chosen, rows)


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# The header -------------------------------------------------------------------------------------

def _version(module_name: str) -> str:
    try:
        return __import__(module_name).__version__
    except Exception:  # a missing or broken package is a fact for the header, not a failure
        return "not installed"


def machine_header() -> dict[str, Any]:
    from .report import git_commit
    from .report import cpu_text

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
            "cpu": cpu_text(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "versions": {name: _version(name) for name in
                         ("torch", "openvino", "transformers", "timm", "torchvision", "torchao")}}


# Markdown ---------------------------------------------------------------------------------------

def _clip(text: str, limit: int = CELL_TEXT_LIMIT) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _error_measure(cell: Cell, column: Column) -> str:
    if cell.max_abs_error == 0:
        return "identical"
    if column.exact or cell.sqnr_db is None:
        return f"max abs {cell.max_abs_error:.1e}"
    return f"{cell.sqnr_db:.1f} dB"


def cell_text(cell: Cell, row: ModelRow, column: Column) -> str:
    """'✓ 12/13, 31.2 dB' (+ graphs, fallbacks) or '✗ Type: first line'."""
    if not cell.compiled:
        return "✗ " + _clip(cell.error or "not run")
    total = cell.total if column.total_key else row.layers
    unit = f" {column.total_key}" if column.total_key else ""
    parts = [f"✓ {cell.reached if cell.reached is not None else '?'}/{total}{unit}"
             + (f" +{sum(cell.skipped.values())} skipped" if cell.skipped and not column.total_key else ""),
             _error_measure(cell, column)]
    if cell.graphs > 1:
        parts.append(f"{cell.graphs} graphs")
    if cell.fallbacks:
        parts.append(f"{len(cell.fallbacks)} fallbacks")
    return ", ".join(parts)


def _table_row(row: ModelRow, columns: list[Column]) -> list[str]:
    breaks = "-" if row.graph_breaks is None else str(row.graph_breaks)
    first = [row.name, row.source, "-" if row.layers is None else str(row.layers), breaks]
    if row.error and not row.cells:
        return first + ["✗ " + _clip(row.error)] * len(columns)
    cells = {c.column: c for c in row.cells}
    return first + [cell_text(cells[c.name], row, c) if c.name in cells else "-" for c in columns]


def _header_lines(header: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    load = " / ".join(f"{x:.2f}" for x in header["load_average"])
    commit = f" at commit {header['commit']}" if header.get("commit") else ""
    lines = [f"Generated {header['date']} by `edgepasses bench coverage`{commit}"
             + (f" in {header['minutes']} min" if "minutes" in header else "") + ".", "",
             f"Machine: {header['cpu']}, {header['logical_cpus']} logical CPUs, torch threads "
             f"{header['torch_threads']}, load average {load} (1/5/15 min) at start.", "",
             f"Versions: {versions}."]
    return lines


_LEGEND = """Each cell is `torch.compile(model, backend="edge", options={"pipeline": ..., "target": ...,
"calibration": ...})` called once on the example inputs under `torch.no_grad()`, after
`torch._dynamo.reset()`. `✓ r/n`: the pass reached r of the model's n Linear/conv layers
(`layers`: nn.Linear, Conv1d/2d/3d, ConvTranspose, transformers' Conv1D, and the packed in_proj of
each nn.MultiheadAttention), summed over every graph Dynamo compiled (quantize: its Linear/conv
layers, not the activation matmuls and embedding tables it also quantizes); `+k skipped`: layers the
pass left alone with a reason in its stats (listed under "Skipped layers"); prune counts channel
groups pruned of the groups it found. Then the output's SQNR against eager in dB (10·log10(Σref²/Σ(ref−out)²),
over every output tensor; `identical` when it is; max abs for exact pipelines), the graphs compiled when more
than one, and the ops the target left to PyTorch. `✗`: the exception's type and first line
(the backend's own error when Dynamo wraps it). `breaks`: graph breaks `torch._dynamo.explain`
finds in eager tracing. Weights are random (seeded), so the lossy columns' SQNR is a worst case:
random weights have none of the redundancy that pruning, 2:4 and low rank exploit in trained ones
(and timm's ConvNeXt starts its residual branches at layer scale 1e-6, so its blocks are near identity)."""


def type_of(error: str) -> str:
    return error.split(":", 1)[0]


def _failure_lines(matrix: Matrix) -> list[str]:
    lines = []
    for row in matrix.rows:
        if row.error:
            lines.append(f"- {row.name}: {row.error}")
        lines += [f"- {row.name} × {c.column}: {type_of(c.error)}: {c.error_detail}" for c in row.cells if c.error]
    return lines


def _break_lines(matrix: Matrix) -> list[str]:
    return [f"- {r.name}: {r.graph_breaks} break(s), {r.dynamo_graphs} graphs; first: {r.first_break}"
            for r in matrix.rows if r.graph_breaks]


def _fallback_lines(matrix: Matrix) -> list[str]:
    """Per cell, the ops left to PyTorch grouped by op and reason: '18× aten.matmul.default (reason)'."""
    lines = []
    for row in matrix.rows:
        for cell in row.cells:
            groups = Counter((f["op"], f["reason"]) for f in cell.fallbacks)
            if groups:
                text = "; ".join(f"{n}× {op} ({reason})" for (op, reason), n in groups.items())
                lines.append(f"- {row.name} × {cell.column}: {text}")
    return lines


def _skipped_lines(matrix: Matrix) -> list[str]:
    """Per cell, the reasons the pass gave for the layers it left alone: '16× depthwise convolution ...'."""
    return [f"- {row.name} × {cell.column}: " + "; ".join(f"{n}× {reason}" for reason, n in cell.skipped.items())
            for row in matrix.rows for cell in row.cells if cell.skipped]


def accounted_lines(matrix: Matrix) -> list[str]:
    """Per layer-counting column: on how many models every Linear/conv layer was reached or skipped with a
    stated reason, and the share reached without those."""
    lines = []
    for column in (c for c in matrix.columns if not c.total_key):
        cells = [(row, cell) for row in matrix.rows for cell in row.cells if cell.column == column.name]
        whole = [row.name for row, cell in cells if cell.compiled and row.layers
                 and (cell.reached or 0) + sum(cell.skipped.values()) >= row.layers]
        shares = [(cell.reached or 0) / row.layers for row, cell in cells if cell.compiled and row.layers]
        missing = [row.name for row, _ in cells if row.name not in whole]
        lines.append(f"- `{column.name}`: every layer reached or skipped with a reason on {len(whole)} of "
                     f"{len(cells)} models; reached alone: {100 * min(shares, default=0):.0f} % at least, "
                     f"{100 * sum(shares) / max(len(shares), 1):.0f} % on average"
                     + (f"; not accounted for: {', '.join(missing)}" if missing else ""))
    return lines


def _pipeline_lines(columns: list[Column]) -> list[str]:
    return [f"- `{c.name}`: `{c.pipeline}` on target `{c.target}`" for c in columns]


def matrix_markdown(matrix: Matrix) -> str:
    from .runner import markdown_table

    header = ["model", "source", "layers", "breaks", *(c.name for c in matrix.columns)]
    lines = ["# Coverage matrix", "", *_header_lines(matrix.header), "", "Columns:",
             *_pipeline_lines(matrix.columns), "", _LEGEND, ""]
    lines += markdown_table(header, [_table_row(r, matrix.columns) for r in matrix.rows])
    lines += ["", "## Layers accounted for", "", *accounted_lines(matrix)]
    for title, section in (("Failures", _failure_lines(matrix)), ("Graph breaks", _break_lines(matrix)),
                           ("Skipped layers", _skipped_lines(matrix)), ("Fallbacks", _fallback_lines(matrix))):
        if section:
            lines += ["", f"## {title}", "", *section]
    return "\n".join(lines) + "\n"
