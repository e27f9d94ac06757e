"""The demo: every zoo model through `torch.compile(model, backend="edge")` with the default options.

One table: eager PyTorch against the edge backend (default pipeline on the default target), with
the direct-OpenVINO peer's ratio alongside. Few rounds, so the whole zoo takes minutes on a
small CPU; use `edgepasses bench` for careful numbers. Results also go to bench/results/.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgepasses.backend import EdgeOptions
from edgepasses.backends import get_target
from edgepasses.zoo import ZOO_NAMES

from .runner import EAGER_LABEL, BenchResult, bench_model, edge_label, format_ms, format_shapes, markdown_table

DEMO_WARMUP = 3
DEMO_ROUNDS = 15
RESULTS_DIR = Path(__file__).parent / "results"

_HEADER = ["model", "input", "eager fp32 ms", "edge ms (min–max)", "speedup", "vs OpenVINO direct", "max abs err",
           "top-1 % eager / edge", "precision", "fallbacks", "compile s"]


def _top1(result: BenchResult, edge_row: str) -> str:
    eager, compiled = result.row(EAGER_LABEL).top1, result.row(edge_row).top1
    return "-" if eager is None else f"{eager:.1f} / {compiled:.1f}"


def _cells(result: BenchResult, pipeline: str) -> list[str]:
    eager, edge = result.row(EAGER_LABEL), result.row(edge_label(pipeline))
    return [result.model, format_shapes(result.input_shapes), format_ms(eager.median_ms),
            f"{format_ms(edge.median_ms)} ({format_ms(edge.min_ms)}–{format_ms(edge.max_ms)})",
            f"{edge.speedup_vs_eager:.2f}x", f"{edge.ratio_vs_peer:.2f}", f"{edge.max_abs_error:.1e}",
            _top1(result, edge.label), edge.precision, str(edge.fallbacks), f"{edge.compile_s:.1f}"]


def demo_table(results: list[BenchResult], options: EdgeOptions, failures: dict[str, str]) -> str:
    target = get_target(options.target).name
    lines = [f"torch.compile(model, backend='edge'), default options: pipeline {options.pipeline}, "
             f"target {options.target} ({target}), precision {options.precision}; "
             f"warmup {DEMO_WARMUP}, {DEMO_ROUNDS} interleaved rounds, batch 1", ""]
    rows = [_cells(result, options.pipeline) for result in results]
    rows += [[name, f"failed: {error}"] for name, error in failures.items()]
    lines += markdown_table(_HEADER, rows)
    if results:
        lines += ["", str(results[0].machine)]
    return "\n".join(lines)


def _summary(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _bench_zoo(options: EdgeOptions) -> tuple[list[BenchResult], dict[str, str]]:
    results, failures = [], {}
    for name in ZOO_NAMES:
        try:
            results.append(bench_model(name, [options.pipeline], target=options.target,
                                       precision=options.precision, warmup=DEMO_WARMUP, rounds=DEMO_ROUNDS,
                                       progress=True))
        except Exception as exc:  # one broken model must not hide the others' results; it is reported
            failures[name] = _summary(exc)
            print(f"{name} failed: {failures[name]}", file=sys.stderr)
    return results, failures


def main() -> int:
    options = EdgeOptions()
    start = time.perf_counter()
    results, failures = _bench_zoo(options)
    wall_s = time.perf_counter() - start
    table = f"{demo_table(results, options, failures)}\n\nTotal wall time: {wall_s:.0f} s"
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "demo.md").write_text(table + "\n")
    payload = {"wall_s": wall_s, "results": [r.to_dict() for r in results], "failures": failures}
    (RESULTS_DIR / "demo.json").write_text(json.dumps(payload, indent=2))
    print(f"written: {RESULTS_DIR / 'demo.md'}, {RESULTS_DIR / 'demo.json'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
