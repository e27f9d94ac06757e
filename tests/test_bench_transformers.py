"""`edgepasses bench transformers`: the ONNX Runtime peer, the table and its failures, the profile
categories, the command line, and one end-to-end run on a tiny BertModel."""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from edgepasses import cli  # noqa: E402  (after the importorskips)
from edgepasses.analysis.sqnr import sqnr_db  # noqa: E402
from edgepasses.bench import transformers as bench  # noqa: E402
from edgepasses.bench.accuracy import EAGER_LABEL, OPENVINO_FP32_LABEL, Row  # noqa: E402
from edgepasses.measure.timing import Timing  # noqa: E402
from edgepasses.quant import cpu_int8_saturates  # noqa: E402
from edgepasses.zoo.bert_base import bert_base, random_token_batches  # noqa: E402

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 200}


def test_onnxruntime_peer_is_close_to_eager_on_a_tiny_bert():
    from edgepasses.measure.peers import onnxruntime_dynamic_int8

    model = bert_base(**TINY)
    ids, mask = random_token_batches(1, 2, 16, vocab_size=200)[0]
    mask[1, 10:] = 0  # padding: the mask must reach the session
    program = onnxruntime_dynamic_int8(model, (ids, mask))
    with torch.no_grad():
        expected = model(ids, mask)
    actual = program(ids, mask)
    assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape
    assert sqnr_db(expected, actual) > 25


def _row(label: str, ms: float, **extra) -> Row:
    return Row(label, {"sqnr_db": 40.0}, None, Timing(ms, ms * 0.9, ms * 1.2, (ms,)), None, **extra)


REFERENCE = bench.edge_label("quantize", "reference")


def test_table_has_speedups_failed_rows_with_their_reason_a_profile_and_compile_times():
    rows = (_row(EAGER_LABEL, 100.0), _row(OPENVINO_FP32_LABEL, 50.0), _row(REFERENCE, 25.0),
            Row(bench.ORT_LABEL, {}, None, None, None, error="RuntimeError: no | session"))
    profile = bench.Profile(REFERENCE, 3, {c: 1.0 for c in bench.PROFILE_CATEGORIES}, (("aten::round", 0.5),))
    compile_time = bench.CompileTime(REFERENCE, 10.0, {"quantize": 2.0}, 1.0, 4.0, kernels="6 x int8_linear_packed")
    table = bench.Table("tiny", "a tiny model", (8, 64), "calibration 1 batch", bench.SQNR_METRICS, rows, profile,
                        compile_times=(compile_time,))
    lines = bench.table_markdown(table)
    assert lines[0] == "### tiny, batch 8 × 64 tokens"
    assert "| edge `quantize` on reference (Inductor) | 40.0 | - | 25.0 | 22.5–30.0 | 4.00× | 2.00× |" in lines
    assert "| ONNX Runtime dynamic int8 | ✗ | - | - | - | - | - |" in lines
    assert "- ONNX Runtime dynamic int8 ✗ `RuntimeError: no | session`" in lines
    assert any(line.startswith(f"Where the time goes in {REFERENCE}") for line in lines)
    assert "| our kernels (edge::*) | 1.0 | 17% |" in lines
    assert "Largest other ops, ms a call: `aten::round` 0.5." in lines
    assert lines[-1] == (f"| {REFERENCE} | 10.0 | 3.0 | `quantize` 2.0 | 1.0 | 4.0 | Inductor | "
                         "6 x int8_linear_packed |")  # 3.0: the rest


@pytest.mark.parametrize("key, category", [
    ("edge::int8_linear", "our kernels (edge::*)"), ("edge::quantize_per_token", "our kernels (edge::*)"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention (SDPA, float)"),
    ("aten::addmm", "matmul in float"), ("quantized_decomposed::quantize_per_tensor", "other ops"),
    ("aten::native_layer_norm", "other ops"), ("## Call CompiledFxGraph f3x ##", "Inductor-compiled code (fused glue)"),
    ("Torch-Compiled Region: 0/0", "Dynamo, Python")])
def test_profile_categories(key, category):
    assert bench.profile_category(key) == category


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet18"], "unknown model(s) resnet18; valid models: minilm_l6, bert_base, bert_tiny"),
    (["--tokens", "8"], "argument --tokens: BATCH,TOKENS (e.g. 8,64); got '8'"),
    (["--tokens", "0,64"], "batch and tokens must be positive"),
    (["--model", "bert_tiny", "--pipeline", "nope"], "unknown pass 'nope'")])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "transformers", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def fast_rows(monkeypatch):
    """NNCF and the edge rows stand in by eager PyTorch (their builds take most of a minute; the
    accuracy and models benches run them for real); the openvino edge row fails, as a row may."""
    def edge(module, example, calibration, pipeline, label, target, **extra):
        if target == "openvino":
            raise RuntimeError("stand-in failure\nsecond line")
        on_compile = extra.pop("on_compile")  # the bench's, recording each row's compilations
        assert callable(on_compile) and extra == bench.REFERENCE_OPTIONS  # the reference rows are Inductor-compiled
        return bench.Candidate(label, module, None)

    monkeypatch.setattr(bench, "_edge", edge)
    monkeypatch.setattr(bench, "_nncf", lambda module, *args: bench.Candidate(bench.NNCF_LABEL, module, None))


def test_bench_transformers_runs_end_to_end_on_a_tiny_bert(fast_rows, tmp_path, capsys):
    md = tmp_path / "transformers.md"
    assert cli.main(["bench", "transformers", "--model", "bert_tiny", "--tokens", "1,8", "--rounds", "1",
                     "--warmup", "0", "--md", str(md)]) == 0
    text = md.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    labels = [EAGER_LABEL, OPENVINO_FP32_LABEL, bench.NNCF_LABEL, bench.ORT_LABEL,
              bench.edge_label("quantize", "openvino"), bench.edge_label("quantize", "reference"),
              bench.edge_label("sparsify_24,quantize", "reference")]
    for label in labels:
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        measured = row.endswith("× |")
        assert measured or f"- {label} ✗ `" in text, row  # a number, or ✗ with its reason below
    assert bench.edge_label("sparsify_24,quantize", "openvino") not in text  # OpenVINO would run it dense
    assert "### BERT tiny (random weights), batch 1 × 8 tokens" in text
    assert "- edge `quantize` on openvino ✗ `RuntimeError: stand-in failure`" in text
    assert "Where the time goes in edge `quantize` on reference (Inductor)" in text
    assert "Compile time of the reference programs" in text


def test_reference_row_is_inductor_compiled_and_its_compile_time_adds_up():
    """One real reference row on a tiny BertModel: Inductor compiles it, the profile sees our kernels inside
    Inductor's code, and the compile-time parts add up to the build time."""
    model = bert_base(**TINY)
    calibration = random_token_batches(2, 1, 8, vocab_size=200)
    example = calibration[-1]
    label = bench.edge_label("quantize", "reference")
    start, before = time.perf_counter(), bench.fx_graph_cache_counts()
    seen = []
    with torch.no_grad():
        candidate = bench._edge(model, example, calibration, "quantize", label, "reference", on_compile=seen.append,
                                **bench.REFERENCE_OPTIONS)
    spent = bench.compile_time(label, time.perf_counter() - start, seen,
                               bench.cache_outcome(before, bench.fx_graph_cache_counts()))
    assert spent.inductor_s > 0 and "quantize" in spent.passes_s
    assert spent.inductor_cache in ("1 hit", "1 miss")  # one graph, looked up in Inductor's FX graph cache
    assert spent.export_and_rewrite_s > 0 and spent.dynamo_and_calls_s > 0
    bits = "7-bit" if cpu_int8_saturates() else "8-bit"  # 16-bit pair sums (no VNNI): 7-bit weights
    assert "int8_linear" in spent.kernels and f"{bits} weights" in spent.kernels  # what each layer ran on, summed
    profiled = bench.profile(label, candidate.run, example, calls=1).ms_per_call
    assert profiled["our kernels (edge::*)"] > 0 and profiled["Inductor-compiled code (fused glue)"] > 0
