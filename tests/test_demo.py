"""The demo's table (bench/demo.py) on the digits CNN with a tiny search budget: every program timed,
the auto row's pick, speed-ups, sizes and metric, the search's Pareto plot; and a failing model's row."""
from __future__ import annotations

import dataclasses
import json

import pytest

EVAL_IMAGES = 90  # of the digits test split: the metric runs ~10 times (every program, each search step)


def _quicker_metric(monkeypatch):
    """The zoo's digits CNN, its accuracy on the first EVAL_IMAGES test images (the whole split is 360)."""
    from edgepasses.bench import demo as demo_module
    from edgepasses.zoo import digits, get_model

    def model(name, batch_size=1):
        zoo = get_model(name, batch_size)
        data = digits.load_digits_split(8)
        subset = dataclasses.replace(data, test_x=data.test_x[:EVAL_IMAGES], test_y=data.test_y[:EVAL_IMAGES])
        return dataclasses.replace(zoo, accuracy_fn=lambda fn: digits.accuracy(fn, subset, batch_size=batch_size))

    monkeypatch.setattr(demo_module, "get_model", model)


def _table_rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ")]


# One test, not several on a shared fixture: pytest-xdist would run the demo once per worker.
def test_demo_on_the_digits_cnn_times_every_program_and_plots_the_search(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    pytest.importorskip("optuna")
    pytest.importorskip("sklearn")
    from edgepasses.bench.demo import _HEADER, AUTO_LABEL, PROGRAMS, Budget, run_demo

    _quicker_metric(monkeypatch)

    # One trial (the search's first seed), however slow the machine: the test must not hang on its load.
    table, rows, wall_s = run_demo(("digits_cnn",), tmp_path,
                                   budgets={"digits_cnn": Budget(60, distill_steps=0, trials=1, calibration=4)},
                                   pareto_model="digits_cnn", warmup=1, rounds=2, progress=False)
    (demo,) = rows
    assert demo.error is None and demo.auto_error is None, (demo.error, demo.auto_error)
    assert [r.label for r in demo.result.rows] == list(PROGRAMS.values())
    for row in demo.result.rows:
        assert row.median_ms > 0 and row.size_mb > 0 and len(row.samples_ms) == 2
        assert row.top1 is not None and row.top1 > 50  # the trained CNN's test accuracy, every program
        assert row.cosine is not None and 0.9 < row.cosine <= 1.0 + 1e-6
    auto = demo.result.row(AUTO_LABEL).auto
    assert auto["budget_s"] == 60 and auto["trials"] == 1 and auto["metric"] == "metric"
    assert auto["pipeline"] and "quantize" in auto["pipeline"]  # the seed: int8 everywhere, which holds 1%

    header, _, line = _table_rows(table)
    assert header == _HEADER
    cells = dict(zip(header, line))
    assert cells["model"] == "digits_cnn" and cells["input"] == "1x1x8x8"
    for column in ("eager ms", "OpenVINO fp32 ms", "NNCF int8 ms", "edge int8 ms", "edge auto ms"):
        assert float(cells[column]) > 0, column
    # The auto pick: a pipeline (or the float program, named as such), with its footnote.
    assert cells["auto pick"].endswith("[1]") and cells["auto pick"] != "failed [1]"
    assert auto["pipeline"] is None or auto["pipeline"].split(",")[0].split("(")[0] in cells["auto pick"]
    speedups = [float(s.rstrip("x")) for s in cells["auto speed-up vs eager / OV fp32 / NNCF"].split(" / ")]
    assert len(speedups) == 3 and all(s > 0 for s in speedups)
    sizes = [float(s) for s in cells["size MB OV fp32 / NNCF / int8 / auto"].split(" / ")]
    assert len(sizes) == 4 and all(s > 0 for s in sizes)
    assert sizes[2] < sizes[0]  # int8 weights are smaller than fp32's
    assert cells["metric"] == "top-1 %"
    metrics = [float(s) for s in cells["eager / OV fp32 / NNCF / int8 / auto"].split(" / ")]
    assert len(metrics) == 5 and all(50 < m <= 100 for m in metrics)
    assert "demo budget: auto searched" in table and "1. digits_cnn: `" in table
    assert f"Total wall time: {wall_s:.0f} s" in table

    # The table, the JSON and the search's report with its Pareto plot, in the results directory.
    out = tmp_path
    assert (out / "demo.md").read_text().startswith(table.splitlines()[0])
    payload = json.loads((out / "demo.json").read_text())
    assert payload["rows"][0]["model"] == "digits_cnn" and payload["wall_s"] > 0
    png = out / "demo-search-digits_cnn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Pareto front](demo-search-digits_cnn.png)" in (out / "demo-search-digits_cnn.md").read_text()
    assert str(png) in table


def test_a_failing_model_is_a_row_not_the_end():
    from edgepasses.bench.demo import bench_demo_model, demo_table

    demo = bench_demo_model("no_such_model", progress=False)
    assert demo.result is None and "no_such_model" in demo.error
    table = demo_table([demo], wall_s=1.0)
    assert "| no_such_model | failed: ValueError: unknown zoo model 'no_such_model'" in table


def test_short_pipeline_keeps_pass_names_and_counts_lists():
    from edgepasses.bench.demo import short_pipeline

    assert short_pipeline("fold_bn,quantize,dce") == "fold_bn,quantize,dce"
    assert short_pipeline(None) == "float (none within max_drop)"
    assert len(short_pipeline("fold_bn,prune(ratio=0.25),quantize,dce", width=20)) == 20


def test_demo_covers_the_whole_zoo_trained_models_first():
    from edgepasses.bench.demo import DEMO_ORDER, METRIC_NAMES
    from edgepasses.zoo import ZOO_NAMES

    assert sorted(DEMO_ORDER) == sorted(ZOO_NAMES) and len(set(DEMO_ORDER)) == len(DEMO_ORDER)
    assert set(DEMO_ORDER[:len(METRIC_NAMES)]) == set(METRIC_NAMES)


def test_budget_header_names_each_models_budget():
    from edgepasses.bench.demo import Budget, DemoRow, _budget_text

    rows = [DemoRow("a", budget=Budget(20)), DemoRow("b", budget=Budget(20)), DemoRow("c", budget=Budget(60))]
    assert _budget_text(rows).startswith("demo budget: auto searched 20 s per model (60 s for c);")
