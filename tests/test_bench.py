"""Fast tests of the benchmark harness: interleaved timing, bench_model on the digits CNN (fp32, and
int8 beside the NNCF peer), the CLI."""
from __future__ import annotations

import json
import time
from functools import partial

import pytest
import torch

from edgepasses import cli
from edgepasses.measure.timing import measure_side_by_side

PIPELINE = "edge-fp32"
INT8_PIPELINE = "fold_bn,quantize"


def test_side_by_side_gives_sane_timings():
    timings = measure_side_by_side({"noop": lambda: None, "sleep": partial(time.sleep, 0.002)},
                                   warmup=1, rounds=5)
    noop, sleep = timings["noop"], timings["sleep"]
    assert len(noop.samples) == len(sleep.samples) == 5
    assert 0 <= noop.min_ms <= noop.median_ms <= noop.max_ms
    assert sleep.min_ms >= 2.0
    assert noop.median_ms < sleep.median_ms


def test_side_by_side_warms_up_then_interleaves_in_rotated_order():
    calls: list[str] = []
    measure_side_by_side({name: partial(calls.append, name) for name in "abc"}, warmup=1, rounds=3)
    warmup, rounds = calls[:3], calls[3:]
    assert warmup == ["a", "b", "c"]
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_side_by_side_runs_without_grad():
    grad_enabled: list[bool] = []
    measure_side_by_side({"probe": lambda: grad_enabled.append(torch.is_grad_enabled())}, warmup=1, rounds=2)
    assert grad_enabled == [False] * 3


@pytest.fixture(scope="module")
def digits_result():
    pytest.importorskip("openvino")
    pytest.importorskip("sklearn")
    from edgepasses.bench.runner import bench_model

    return bench_model("digits_cnn", [PIPELINE], warmup=1, rounds=3)


def test_bench_model_measures_every_row(digits_result):
    from edgepasses.bench.runner import EAGER_LABEL, PEER_LABEL, edge_label

    assert [row.label for row in digits_result.rows] == [EAGER_LABEL, PEER_LABEL, edge_label(PIPELINE)]
    for row in digits_result.rows:
        assert row.speedup_vs_eager > 0 and row.ratio_vs_peer > 0
        assert len(row.samples_ms) == 3
        assert row.top1 is not None
    assert digits_result.row(PEER_LABEL).ratio_vs_peer == 1.0


def test_bench_model_edge_row_is_exact_and_smaller(digits_result):
    from edgepasses.bench.runner import EAGER_LABEL, edge_label

    eager, edge = digits_result.row(EAGER_LABEL), digits_result.row(edge_label(PIPELINE))
    assert edge.max_abs_error < 1e-4
    assert edge.top1 == pytest.approx(eager.top1, abs=0.6)  # at most two of 360 test images flip
    assert edge.size_mb < eager.size_mb  # fold_bn drops the batch norms' parameters
    assert (edge.precision, edge.fallbacks) == ("f32", 0)
    assert edge.compile_s > 0


def test_fp32_rows_have_no_nncf_peer_and_no_int8(digits_result):
    from edgepasses.bench.runner import EAGER_LABEL, NNCF_LABEL

    assert NNCF_LABEL not in [row.label for row in digits_result.rows]
    markdown = digits_result.to_markdown()
    assert "vs NNCF" not in markdown and "err vs own fake-quant" not in markdown
    assert digits_result.row(EAGER_LABEL).int8_ops is None
    assert all(row.int8_ops == 0 for row in digits_result.rows[1:])


@pytest.fixture(scope="module")
def int8_result():
    pytest.importorskip("openvino")
    pytest.importorskip("sklearn")
    pytest.importorskip("nncf")
    from edgepasses.bench.runner import bench_model

    return bench_model("digits_cnn", [INT8_PIPELINE], warmup=1, rounds=3, direct=True)


def test_quantize_pipeline_brings_the_nncf_peer_and_runs_int8(int8_result):
    from edgepasses.bench.runner import EAGER_LABEL, NNCF_LABEL, PEER_LABEL, direct_label, edge_label

    assert [row.label for row in int8_result.rows] == [EAGER_LABEL, PEER_LABEL, NNCF_LABEL,
                                                       edge_label(INT8_PIPELINE), direct_label(INT8_PIPELINE)]
    nncf, edge = int8_result.row(NNCF_LABEL), int8_result.row(edge_label(INT8_PIPELINE))
    direct = int8_result.row(direct_label(INT8_PIPELINE))
    assert nncf.int8_ops > 0 and edge.int8_ops == direct.int8_ops > 0
    # Sizes are what OpenVINO holds: i8 weights for NNCF and for us alike.
    assert edge.size_mb == direct.size_mb < 0.5 * int8_result.row(EAGER_LABEL).size_mb
    assert edge.size_mb == pytest.approx(nncf.size_mb, rel=0.2)
    assert nncf.ratio_vs_nncf == 1.0 and edge.ratio_vs_nncf > 0
    assert nncf.top1 == pytest.approx(int8_result.row(EAGER_LABEL).top1, abs=3)
    # The int8 kernels should reproduce our own quantize/dequantize graph far closer than that graph
    # reproduces float: lowering adds little on top of the quantization error.
    assert edge.error_vs_fake_quant is not None and edge.error_vs_fake_quant < 0.1 * edge.max_abs_error
    assert nncf.error_vs_fake_quant is None
    markdown = int8_result.to_markdown()
    assert "vs NNCF" in markdown and "err vs own fake-quant" in markdown and "int8 ops" in markdown


def test_bench_model_rejects_unknown_peer():
    from edgepasses.bench.runner import bench_model

    with pytest.raises(ValueError, match="no_such_peer"):
        bench_model("digits_cnn", [PIPELINE], peers=("no_such_peer",))


def test_markdown_and_json_name_every_row(digits_result):
    markdown = digits_result.to_markdown()
    for row in digits_result.rows:
        assert f"| {row.label} |" in markdown
    assert "Machine:" in markdown
    assert [row["label"] for row in json.loads(digits_result.to_json())["rows"]] == \
        [row.label for row in digits_result.rows]


def test_cli_passes_lists_passes_and_presets(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_bn" in out and "dce" in out and PIPELINE in out


def test_cli_bench_rejects_unknown_model_naming_valid_ones(capsys):
    from edgepasses.zoo import ZOO_NAMES

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "no_such_model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err
    assert all(name in err for name in ZOO_NAMES)


def test_cli_bench_prints_and_writes_results(digits_result, monkeypatch, tmp_path, capsys):
    calls = []

    def fake_bench_model(name, pipelines, **settings):  # the measured fixture stands in for a rerun
        calls.append((name, pipelines, settings))
        return digits_result

    monkeypatch.setattr("edgepasses.bench.runner.bench_model", fake_bench_model)
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    assert cli.main(["bench", "--model", "digits_cnn", "--rounds", "3", "--peer", "nncf",
                     "--json", str(json_path), "--md", str(md_path)]) == 0
    assert calls == [("digits_cnn", [PIPELINE], {"batch_size": 1, "target": "openvino", "precision": "f32",
                                                "warmup": 10, "rounds": 3, "progress": True,
                                                "peers": ("nncf",), "direct": False})]
    assert digits_result.to_markdown() in capsys.readouterr().out
    assert md_path.read_text().strip() == digits_result.to_markdown()
    assert json.loads(json_path.read_text())[0]["model"] == "digits_cnn"


def test_cli_compare_prints_each_pipelines_sqnr(capsys):
    pytest.importorskip("torchao")
    assert cli.main(["compare", "--model", "digits_cnn", "--pipeline", "fold_bn", "--pipeline",
                     "fold_bn,quantize", "--batches", "2"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in capsys.readouterr().out.splitlines() if line.startswith("| `")}
    assert float(rows["`fold_bn`"]) > 80.0  # exact up to float rounding
    assert 20.0 < float(rows["`fold_bn,quantize`"]) < 80.0


def test_cli_onnx_exports_qdq_that_onnxruntime_runs_like_ours(capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    path = tmp_path / "digits.onnx"
    assert cli.main(["onnx", "--model", "digits_cnn", "--batches", "2", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert path.exists() and "QuantizeLinear" in out and "DequantizeLinear" in out
    as_written = float(out.split("Q/DQ as written vs ours: max abs diff ")[1].split(",")[0])
    assert as_written < 1e-3
