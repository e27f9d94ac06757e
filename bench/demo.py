"""The demo: the whole stack on every zoo model, in one table.

Per model, one interleaved timing run (`runner.bench_model`) of

- eager PyTorch (fp32),
- OpenVINO fp32: the model exported and compiled by OpenVINO directly,
- NNCF int8: NNCF's post-training quantization of that, compiled by OpenVINO,
- edge int8: `torch.compile(model, backend="edge", options={"pipeline": "fold_bn,quantize"})` on OpenVINO,
- edge auto: `torch.compile(..., options={"pipeline": "auto", ...})`: the search picks the fastest
  compression within 1% of the float model's metric (the zoo's accuracy for the trained models, else
  the mean output cosine to the float model on held-out calibration batches);

with latency, speed-ups, weight size and the model's metric for each (top-1 % and the like for the
trained models, the output cosine to eager for the random-weight ones). The search runs on a demo
budget (seconds per model, printed in the header) so that the zoo takes minutes on a small CPU;
`edgepasses search` and a longer `budget_s` find more. One search (digits ResNet-18's) is kept and
reported: its Pareto plot goes to bench/results/ with the table.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgepasses.pipeline import Pipeline
from edgepasses.zoo import ZOO_NAMES, get_model

from .runner import (AUTO_PIPELINE, EAGER_LABEL, NNCF_LABEL, PEER_LABEL, BenchResult, Row,
                     bench_model, edge_label, format_ms, format_shapes, markdown_table)

DEMO_WARMUP = 3
DEMO_ROUNDS = 10
TARGET = "openvino"
INT8_PIPELINE = "fold_bn,quantize"
MAX_DROP = 0.01
COSINE_BATCHES = 4  # inputs past the calibration ones: each program's output cosine to eager
RESULTS_DIR = Path(__file__).parent / "results"
PARETO_MODEL = "digits_resnet18"  # the one search whose run directory (and Pareto plot) the demo keeps


@dataclass(frozen=True)
class Budget:
    """The auto search's settings for one model in the demo."""
    budget_s: float
    distill_steps: int = 50
    trials: int = 200  # at most this many finished trials (the budget usually ends the search first)
    calibration: int = 8  # batches, for every int8 program (auto without a metric scores on a quarter)

    def search(self) -> dict[str, Any]:
        # compare=False: the demo times OpenVINO fp32 and NNCF int8 itself, beside everything else.
        return {"budget_s": self.budget_s, "distill_steps": self.distill_steps, "trials": self.trials,
                "compare": False, "rounds": 3, "warmup": 1, "confirm_rounds": 5}


# Seconds of search per model, so that the whole zoo takes under 15 minutes on 2 cores on a fresh machine
# (training the digits models and char_lm on first use included). On the random-weight 224x224 models one
# trial takes longer than this, so the search there is the first seed (int8 everywhere), on 4 calibration
# batches (3 to calibrate, 1 held out to score); the trained models get more.
DEFAULT_BUDGET = Budget(10, distill_steps=20, calibration=4)
BUDGETS: dict[str, Budget] = {
    "digits_cnn": Budget(15, distill_steps=100),
    "digits_resnet18": Budget(45, distill_steps=50),
    "minilm_l6": Budget(45, distill_steps=30),
    "char_lm": Budget(20, distill_steps=50),
}

# The trained models' metrics (ZooModel.accuracy_fn): what the table calls them.
METRIC_NAMES = {"digits_cnn": "top-1 %", "digits_resnet18": "top-1 %", "char_lm": "next-char %",
                "minilm_l6": "neighbour %"}
COSINE = "cosine"
# The order of the table: the trained models first (their metric is a real accuracy), the largest last.
LARGEST = ("resnet50", "densenet121")
DEMO_ORDER = (*(n for n in ZOO_NAMES if n in METRIC_NAMES), *(n for n in ZOO_NAMES if n not in METRIC_NAMES
                                                             and n not in LARGEST), *LARGEST)

AUTO_LABEL = edge_label(AUTO_PIPELINE)
INT8_LABEL = edge_label(INT8_PIPELINE)
PROGRAMS = {"eager": EAGER_LABEL, "OV fp32": PEER_LABEL, "NNCF int8": NNCF_LABEL, "edge int8": INT8_LABEL,
            "edge auto": AUTO_LABEL}

_HEADER = ["model", "input", "eager ms", "OpenVINO fp32 ms", "NNCF int8 ms", "edge int8 ms", "edge auto ms",
           "auto pick", "auto speed-up vs eager / OV fp32 / NNCF", "size MB OV fp32 / NNCF / int8 / auto",
           "metric", "eager / OV fp32 / NNCF / int8 / auto"]


@dataclass
class DemoRow:
    """One model's line: its BenchResult, or why it failed (all of it, or only its auto row)."""
    model: str
    result: BenchResult | None = None
    error: str | None = None
    auto_error: str | None = None
    budget: Budget = DEFAULT_BUDGET
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "result": self.result.to_dict() if self.result else None,
                "error": self.error, "auto_error": self.auto_error, "budget_s": self.budget.budget_s,
                "distill_steps": self.budget.distill_steps, "trials": self.budget.trials,
                "calibration_batches": self.budget.calibration, "seconds": self.seconds}


def short_pipeline(text: str | None, width: int = 60) -> str:
    """A pipeline in few characters: pass names, scalar options kept, list options as their length."""
    if text is None:
        return "float (none within max_drop)"
    try:
        steps = Pipeline.parse(text).steps
    except Exception:  # shown, not parsed: whatever the search wrote
        return text if len(text) <= width else text[:width - 1] + "…"
    parts = []
    for step in steps:
        options = step.non_default_options()
        shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}[{len(v)}]" if isinstance(v, (tuple, list, dict))
                 else f"{k}={v}" for k, v in options.items()]
        parts.append(step.name + (f"({','.join(shown)})" if shown else ""))
    short = ",".join(parts)
    return short if len(short) <= width else short[:width - 1] + "…"


def _metric(row: Row, name: str) -> str:
    value = row.cosine if name == COSINE else row.top1
    if value is None:
        return "-"
    return f"{value:.4f}" if name == COSINE else f"{value:.1f}"


def _row_or_none(result: BenchResult, label: str) -> Row | None:
    return next((r for r in result.rows if r.label == label), None)


def _ms(row: Row | None) -> str:
    return "-" if row is None else format_ms(row.median_ms)


def _cells(demo: DemoRow, footnote: int | None) -> list[str]:
    result = demo.result
    assert result is not None
    rows = {short: _row_or_none(result, label) for short, label in PROGRAMS.items()}
    auto = rows["edge auto"]
    metric = METRIC_NAMES.get(demo.model, COSINE) if result.row(EAGER_LABEL).top1 is not None else COSINE
    if auto is not None:
        pick = short_pipeline((auto.auto or {}).get("pipeline")) + (f" [{footnote}]" if footnote else "")
        speedups = " / ".join(f"{r.median_ms / auto.median_ms:.2f}x" if r else "-"
                              for r in (rows["eager"], rows["OV fp32"], rows["NNCF int8"]))
    else:
        pick = f"failed [{footnote}]" if footnote else "failed"
        speedups = "-"
    sizes = " / ".join("-" if rows[k] is None else f"{rows[k].size_mb:.2f}"
                       for k in ("OV fp32", "NNCF int8", "edge int8", "edge auto"))
    metrics = " / ".join("-" if r is None else _metric(r, metric) for r in rows.values())
    return [demo.model, format_shapes(result.input_shapes), *(_ms(rows[k]) for k in PROGRAMS), pick, speedups,
            sizes, metric, metrics]


def _auto_note(demo: DemoRow) -> str:
    if demo.auto_error:
        return f"{demo.model}: auto failed ({demo.auto_error}); the other programs were timed without it"
    auto = demo.result.row(AUTO_LABEL).auto or {}
    yours = auto.get("metric") == "metric"
    metric = METRIC_NAMES.get(demo.model, COSINE) if yours else "output cosine"
    nan, spec = float("nan"), ".4g" if yours else ".4f"
    return (f"{demo.model}: `{auto.get('pipeline') or 'float: no candidate held the budget'}`; "
            f"{_count(auto.get('trials', 0), 'trial')} in {auto.get('search_s', 0):.0f} s "
            f"(budget {auto.get('budget_s', 0):.0f} s, distill steps {demo.budget.distill_steps}, "
            f"{demo.budget.calibration} calibration batches); {metric} {auto.get('score', nan):{spec}} vs float "
            f"{auto.get('baseline', nan):{spec}} (max_drop {auto.get('max_drop', MAX_DROP):g})")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _budget_text(rows: list[DemoRow]) -> str:
    by_budget: dict[float, list[str]] = {}
    for demo in rows:
        by_budget.setdefault(demo.budget.budget_s, []).append(demo.model)
    ranked = sorted(by_budget.items(), key=lambda item: -len(item[1]))  # the most common budget first
    if not ranked:
        return "demo budget: no model searched"
    text = f"demo budget: auto searched {ranked[0][0]:g} s per model"
    if len(ranked) > 1:
        text += " (" + "; ".join(f"{s:g} s for {', '.join(names)}" for s, names in ranked[1:]) + ")"
    return text + "; no trial starts after it, so a slow trial runs past it"


def demo_table(rows: list[DemoRow], wall_s: float | None = None, warmup: int = DEMO_WARMUP,
               rounds: int = DEMO_ROUNDS) -> str:
    lines = [f"The whole stack on every zoo model, batch 1, on {TARGET}: eager PyTorch, OpenVINO fp32 (direct), "
             f"NNCF int8 + OpenVINO, edge int8 (`{INT8_PIPELINE}`) and edge auto (`pipeline='auto'`, "
             f"max_drop {MAX_DROP:g}), timed side by side: warmup {warmup}, {rounds} interleaved rounds.",
             "", f"**{_budget_text(rows)}**; `edgepasses search` or a longer `search={{'budget_s': ...}}` finds more.", ""]
    body, notes = [], []
    for demo in rows:
        if demo.result is None:
            body.append([demo.model, f"failed: {demo.error}"] + [""] * (len(_HEADER) - 2))
            continue
        notes.append(_auto_note(demo))
        body.append(_cells(demo, len(notes)))
    lines += markdown_table(_HEADER, body)
    lines += ["", "Metric: the trained models' own (digits: top-1 % on the test split; char_lm: next-character "
                  "accuracy %; minilm_l6: nearest-neighbour agreement % with the float embeddings); the random-weight "
                  f"models' output cosine to eager on {COSINE_BATCHES} inputs no program calibrated on. "
                  "Size: the weights as each runtime holds them. Speed-ups: the other program's median / auto's, "
                  "from the same interleaved rounds.", "", "Auto picks:", ""]
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    results = [d.result for d in rows if d.result is not None]
    if results:
        lines += ["", str(results[0].machine)]
    if wall_s is not None:
        lines += ["", f"Total wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min)"]
    return "\n".join(lines)


def _summary(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _auto_options(name: str, budget: Budget, accuracy_fn: Callable | None, cache_dir: Path | None) -> dict:
    options: dict[str, Any] = {"max_drop": MAX_DROP, "search": budget.search()}
    if accuracy_fn is not None:
        options["metric"] = accuracy_fn
    if cache_dir is not None:
        options["cache_dir"] = str(cache_dir)
    return options


def bench_demo_model(name: str, budget: Budget | None = None, cache_dir: Path | None = None,
                     warmup: int = DEMO_WARMUP, rounds: int = DEMO_ROUNDS, progress: bool = True) -> DemoRow:
    """One model's demo row: all five programs in one interleaved run; when auto fails, the other four
    without it (and auto's error in the row); when all fails, the error."""
    budget = budget or BUDGETS.get(name, DEFAULT_BUDGET)
    demo = DemoRow(name, budget=budget)
    start = time.perf_counter()
    settings = dict(target=TARGET, warmup=warmup, rounds=rounds, progress=progress, peers=("nncf",),
                    cosine_batches=COSINE_BATCHES, fake_quant_reference=False, calibration_batches=budget.calibration)
    try:
        zoo = get_model(name, 1)
        options = _auto_options(name, budget, zoo.accuracy_fn, cache_dir)
        try:
            demo.result = bench_model(zoo, [INT8_PIPELINE, AUTO_PIPELINE], edge_options={AUTO_PIPELINE: options},
                                      **settings)
        except Exception as exc:  # the search is the newest part: keep the others' numbers
            demo.auto_error = _summary(exc)
            print(f"{name}: auto failed ({demo.auto_error}); timing the others without it", file=sys.stderr)
            demo.result = bench_model(zoo, [INT8_PIPELINE], **settings)
    except Exception as exc:  # one broken model must not hide the others' results; it is reported
        demo.error = _summary(exc)
        print(f"{name} failed: {demo.error}", file=sys.stderr)
    demo.seconds = time.perf_counter() - start
    return demo


def write_pareto(demo: DemoRow, out_dir: Path) -> list[Path]:
    """The search report (report.md and pareto.png) of the model's auto run, copied to `out_dir`."""
    from edgepasses.search.report import write_report

    auto = _row_or_none(demo.result, AUTO_LABEL) if demo.result else None
    run_dir = (auto.auto or {}).get("run_dir") if auto else None
    if not run_dir:
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "Using an existing study ..."
    written = write_report(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / f"demo-search-{demo.model}.png", out_dir / f"demo-search-{demo.model}.md"
    shutil.copyfile(written["png"], png)
    # The report names its plot pareto.png, beside it in the run directory; the copy, the copy's name.
    md.write_text(written["md"].read_text().replace(f"]({written['png'].name})", f"]({png.name})"))
    return [png, md]


def run_demo(names: tuple[str, ...] = DEMO_ORDER, results_dir: Path = RESULTS_DIR,
             budgets: dict[str, Budget] | None = None, pareto_model: str = PARETO_MODEL, warmup: int = DEMO_WARMUP,
             rounds: int = DEMO_ROUNDS, progress: bool = True) -> tuple[str, list[DemoRow], float]:
    """(table, rows, wall seconds); writes demo.md, demo.json and `pareto_model`'s search report and
    Pareto plot into `results_dir` (the table after each model, so that an interrupted demo leaves what
    it measured)."""
    start = time.perf_counter()
    results_dir.mkdir(parents=True, exist_ok=True)
    # The kept search's compile cache and run directory: fresh each run, so the demo searches again.
    cache_dir = results_dir / "demo-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    rows: list[DemoRow] = []
    pareto: list[Path] = []
    table, wall_s = demo_table(rows, 0.0, warmup, rounds), 0.0
    for done, name in enumerate(names, 1):
        budget = (budgets or {}).get(name) or BUDGETS.get(name, DEFAULT_BUDGET)
        demo = bench_demo_model(name, budget, cache_dir if name == pareto_model else None, warmup=warmup,
                                rounds=rounds, progress=progress)
        rows.append(demo)
        print(f"{name}: {demo.seconds:.0f} s", file=sys.stderr)
        if name == pareto_model:
            try:
                pareto = write_pareto(demo, results_dir)
            except Exception as exc:  # the table stands without the plot
                print(f"the Pareto plot of {name}'s search failed: {_summary(exc)}", file=sys.stderr)
        wall_s = time.perf_counter() - start
        table = demo_table(rows, wall_s, warmup, rounds)
        if pareto:
            table += f"\n\nPareto front of {pareto_model}'s auto search: {pareto[0]} (report: {pareto[1]})"
        if done < len(names):
            table += f"\n\n(in progress: {done} of {len(names)} models)"
        (results_dir / "demo.md").write_text(table + "\n")
        payload = {"wall_s": wall_s, "rows": [d.to_dict() for d in rows]}
        (results_dir / "demo.json").write_text(json.dumps(payload, indent=2, default=repr))
    return table, rows, wall_s


def main() -> int:
    # Optuna's note that its TPE sampler's constraints_func is deprecated, once per search: not the demo's news.
    warnings.filterwarnings("ignore", message=".*constraints_func", category=FutureWarning)
    table, rows, _ = run_demo()
    print(table)
    print(f"written: {RESULTS_DIR / 'demo.md'}, {RESULTS_DIR / 'demo.json'}", file=sys.stderr)
    return 1 if any(d.error or d.auto_error for d in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
