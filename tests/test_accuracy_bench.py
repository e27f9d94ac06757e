"""`edgepasses bench accuracy`: rows measured and failures recorded, the Markdown and JSON it
writes, the command line, and one small run on digits_cnn."""
from __future__ import annotations

import json

import pytest
import torch

from edgepasses import cli
from edgepasses.bench import accuracy
from edgepasses.bench.accuracy import (DIGITS_METRICS, EAGER_LABEL, Candidate, Metric, Report, Row, Table,
                                       drops, measure)
from edgepasses.measure.timing import Timing

HEADER = {"date": "2026-01-01T00:00:00+00:00", "commit": "abc1234", "cpu": "Test CPU", "logical_cpus": 2,
          "torch_threads": 2, "load_average": [0.5, 0.4, 0.3], "versions": {"torch": "2.x", "nncf": "3.x"},
          "calibration_batches": 10, "minutes": 1.5}


def _row(label: str, top1: float, median_ms: float, int8_ops: int | None, **extra) -> Row:
    timing = Timing(median_ms, median_ms * 0.9, median_ms * 1.5, (median_ms,))
    return Row(label, {"top1": top1, "drop": 99.0 - top1}, int8_ops, timing, median_ms / 2.0, **extra)


def _table() -> Table:
    rows = (_row(EAGER_LABEL, 99.0, 2.0, None), _row("edge: quantize", 98.5, 0.5, 4, build_s=12.34, note="2 graphs"),
            Row("NNCF int8, default", {}, None, None, None, error="RuntimeError: a | b"))
    return Table("digits", "digits_cnn", "small CNN", "calibration 10 batches", DIGITS_METRICS, rows)


def test_table_markdown_formats_scores_latency_and_failures():
    lines = accuracy.table_markdown(_table())
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == ("|  | top-1 % | drop (points) | int8 ops | build s | median ms | min–max ms | "
                        "× eager latency |")
    assert table[2] == "| eager PyTorch fp32 | 99.00 | 0.00 | - | - | 2 | 1.8–3 | 1 |"
    assert table[3] == "| edge: quantize | 98.50 | 0.50 | 4 | 12.3 | 0.5 | 0.45–0.75 | 0.25 |"
    assert table[4] == "| NNCF int8, default | ✗ | ✗ | - | - | - | - | - |"
    assert "- edge: quantize: 2 graphs" in lines
    assert "- NNCF int8, default failed: `RuntimeError: a | b`" in lines  # below the table, in full


def test_report_markdown_has_header_sections_and_skips():
    report = Report(dict(HEADER), ["quantize"], 3, 4, [_table()], {"charlm": "not in this checkout"})
    text = report.to_markdown()
    assert text.startswith("# What int8 costs on real weights\n")
    assert "by `edgepasses bench accuracy` at commit abc1234 in 1.5 min." in text
    assert "Machine: Test CPU, 2 logical CPUs, torch threads 2, load average 0.50 / 0.40 / 0.30" in text
    assert "busy" not in text
    assert "Versions: torch 2.x, nncf 3.x." in text
    assert "## Digits models (trained here)" in text and "### digits_cnn" in text
    assert "## Pretrained sentence encoder" not in text  # no table for it
    assert "- Char-level LM (trained here) (`charlm`): not in this checkout" in text
    busy = Report({**HEADER, "load_average": [3.0, 2.0, 1.0]}, ["quantize"], 3, 4, [], {})
    assert "The machine was busy" in busy.to_markdown()
    data = json.loads(report.to_json())
    assert data["tables"][0]["rows"][1]["int8_ops"] == 4
    assert data["tables"][0]["rows"][2]["error"].startswith("RuntimeError")


def test_measure_scores_times_and_records_a_failing_row():
    def broken() -> Candidate:
        raise RuntimeError("NNCF said no\nsecond line")

    builders = [(EAGER_LABEL, lambda: Candidate(EAGER_LABEL, lambda x: x * 2, None)),
                ("fast", lambda: Candidate("fast", lambda x: x * 3, 7, note="a note")),
                ("broken", broken)]
    rows = measure(builders, (torch.ones(2),), lambda run: {"top1": float(run(torch.ones(2))[0])},
                   warmup=0, rounds=2, derive=drops(("top1", "drop")))
    assert [r.label for r in rows] == [EAGER_LABEL, "fast", "broken"]
    eager, fast, failed = rows
    assert eager.scores == {"top1": 2.0, "drop": 0.0} and eager.vs_eager == 1.0 and eager.int8_ops is None
    assert eager.build_s is None  # nothing to build
    assert fast.scores == {"top1": 3.0, "drop": -1.0} and fast.int8_ops == 7 and fast.note == "a note"
    assert fast.build_s >= 0
    assert len(fast.timing.samples) == 2 and fast.vs_eager > 0
    assert failed.error == "RuntimeError: NNCF said no" and failed.timing is None and not failed.scores


def test_measure_refuses_a_failing_reference():
    def broken() -> Candidate:
        raise ValueError("no eager")

    with pytest.raises(RuntimeError, match="no eager"):
        measure([(EAGER_LABEL, broken)], (torch.ones(1),), lambda run: {}, warmup=0, rounds=1)


def test_metric_cells_use_their_format():
    assert accuracy._cell(0.12345, Metric("x", "x", "+.3f").spec) == "+0.123"
    assert accuracy._cell(None, ".2f") == "-" and accuracy._cell(0, "d") == "0"
    assert accuracy._cell(-1e-7, "+.3f") == "+0.000" and accuracy._cell(-1e-7, ".2f") == "0.00"


def test_cli_bench_accuracy_defaults_and_writes(monkeypatch, tmp_path, capsys):
    calls = []
    report = Report(dict(HEADER), ["quantize"], 10, 20, [_table()], {})

    def fake_run_accuracy(pipelines, sections, **settings):
        calls.append((pipelines, sections, {k: v for k, v in settings.items() if k != "progress"}))
        return report

    monkeypatch.setattr("edgepasses.bench.accuracy.run_accuracy", fake_run_accuracy)
    md, js = tmp_path / "accuracy.md", tmp_path / "accuracy.json"
    assert cli.main(["bench", "accuracy", "--md", str(md), "--json", str(js)]) == 0
    assert calls[-1] == (["quantize", "smooth,quantize"], accuracy.SECTIONS, {"warmup": 10, "rounds": 20})
    assert md.read_text() == report.to_markdown() and report.to_markdown() in capsys.readouterr().out
    assert json.loads(js.read_text())["pipelines"] == ["quantize"]
    assert cli.main(["bench", "accuracy", "--pipeline", "fold_bn,quantize", "--section", "digits",
                     "--section", "charlm", "--rounds", "3"]) == 0
    assert calls[-1] == (["fold_bn,quantize"], ["digits", "charlm"], {"warmup": 10, "rounds": 3})


@pytest.mark.parametrize("argv", [["--section", "nope"], ["--pipeline", "no_such_pass"]])
def test_cli_bench_accuracy_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "accuracy", *argv])
    assert exit_info.value.code == 2


def test_other_suites_keep_their_rounds_default():
    args = cli.build_parser().parse_args(["bench", "--model", "digits_cnn"])
    assert args.rounds is None  # resolved per suite: 50 for models and kernels, 20 for accuracy


@pytest.mark.slow
def test_digits_cnn_end_to_end():
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    pytest.importorskip("torchao")
    # Plain quantize: the default pipeline, batch norms folded by quantize itself under torch.compile.
    report = accuracy.run_accuracy(["quantize"], ["digits"], warmup=1, rounds=2, digits_models=("digits_cnn",))
    (table,) = report.tables
    rows = {r.label: r for r in table.rows}
    assert list(rows) == [EAGER_LABEL, "OpenVINO fp32", "edge: quantize", "NNCF int8, default"]
    eager, fp32, nncf = rows[EAGER_LABEL], rows["OpenVINO fp32"], rows["NNCF int8, default"]
    assert eager.scores["top1"] > 90 and eager.scores["drop"] == 0
    assert fp32.scores["top1"] == eager.scores["top1"] and fp32.int8_ops == 0
    assert nncf.error is None and nncf.int8_ops > 0 and abs(nncf.scores["drop"]) < 5
    assert all(len(r.timing.samples) == 2 for r in table.rows if r.error is None)
    edge = rows["edge: quantize"]
    assert edge.error is None and edge.int8_ops > 0 and abs(edge.scores["drop"]) <= 0.5
    assert "### digits_cnn" in report.to_markdown()
