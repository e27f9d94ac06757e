"""The coverage matrix (`edgepasses bench coverage`): the catalogue builds and runs eagerly, the
runner gives well-formed rows, and a crashing cell is recorded instead of raised."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

from edgepasses.bench import architectures, coverage  # noqa: E402  (after the importorskips)
from edgepasses.bench.architectures import ARCHITECTURE_NAMES, ARCHITECTURES, count_weight_layers  # noqa: E402

SUBSET = ["transformer_encoder", "regnetx_002"]  # torch's own encoder and one timm CNN


def test_catalogue_spans_the_sources():
    sources = [a.source for a in ARCHITECTURES.values()]
    assert len(ARCHITECTURES) >= 20
    assert sources.count("transformers") >= 10 and sources.count("timm") >= 6
    assert sources.count("torchvision") >= 4 and "torch" in sources


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_architecture_builds_and_runs_eagerly(name):
    model, example, calibration = architectures.build(name)
    assert not model.training
    assert calibration and all(
        [tuple(x.shape) for x in batch] == [tuple(x.shape) for x in example] for batch in calibration)
    assert count_weight_layers(model) > 0
    with torch.no_grad():
        outputs = coverage.output_tensors(model(*example))
    floats = [t for t in outputs if t.is_floating_point()]
    assert floats and all(torch.isfinite(t).all() for t in floats)
    # an output that does not depend on the input (a zeroed head) would make every error measure vacuous
    assert any(t.std() > 0 for t in floats)


def test_unknown_architecture_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: bert"):
        architectures.build("nope")


def test_multihead_attention_counts_in_proj_and_out_proj():
    assert count_weight_layers(nn.MultiheadAttention(16, 2)) == 2
    assert count_weight_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2), nn.ConvTranspose2d(2, 2, 2))) == 3


def test_compare_gives_max_abs_and_sqnr():
    reference = [torch.tensor([3.0, 4.0])]
    max_abs, sqnr = coverage.compare(reference, [torch.tensor([3.0, 3.0])])
    assert max_abs == 1.0 and sqnr == pytest.approx(10 * math.log10(25.0))
    assert coverage.compare(reference, [reference[0].clone()]) == (0.0, None)
    with pytest.raises(ValueError, match="shapes"):
        coverage.compare(reference, [torch.zeros(3)])


def test_error_text_unwraps_dynamo_and_keeps_the_first_line():
    from torch._dynamo.exc import BackendCompilerFailed

    wrapped = BackendCompilerFailed(lambda *a: None, ValueError("\n  missing node\nmore detail"), None)
    assert coverage.error_text(wrapped) == "ValueError: missing node"
    assert coverage.error_text(ValueError("first\nsecond")) == "ValueError: first"
    assert coverage.error_text(RuntimeError()) == "RuntimeError"
    assert coverage.error_detail(wrapped) == "missing node / more detail"


@pytest.fixture(scope="module")
def subset_matrix():
    return coverage.run_matrix(SUBSET, ["lowrank"])


def test_subset_rows_are_well_formed(subset_matrix):
    assert [row.name for row in subset_matrix.rows] == SUBSET
    for row in subset_matrix.rows:
        assert row.error is None and row.layers > 0 and row.graph_breaks is not None
        (cell,) = row.cells
        assert cell.column == "lowrank" and cell.seconds > 0
        assert cell.compiled == (cell.error is None)
        if cell.compiled:
            assert cell.graphs >= 1 and cell.targets == ["reference"] * cell.graphs
            assert cell.reached is not None and cell.max_abs_error is not None


def test_subset_markdown_and_json(subset_matrix):
    text = subset_matrix.to_markdown()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(SUBSET)
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)
    assert "Machine:" in text and "torch " in text and "timm " in text
    data = json.loads(subset_matrix.to_json())
    header = data["header"]
    assert "commit" in header and header["logical_cpus"] >= 1 and {"torch", "openvino"} <= set(header["versions"])
    assert [row["name"] for row in data["rows"]] == SUBSET


def test_a_crashing_cell_is_recorded_not_raised():
    bad = coverage.Column("bad", "no_such_pass", "reference", "quantize", "layers_quantized")
    built = architectures.build("transformer_encoder")
    cell = coverage.run_cell(built, bad, coverage.output_tensors(built.model(*built.example_inputs)))
    assert not cell.compiled and cell.graphs == 0
    assert cell.error.startswith(("ValueError", "OptionError")) and "no_such_pass" in cell.error
    assert cell.error_detail.startswith(cell.error.split(": ", 1)[1])
    row = coverage.ModelRow("transformer_encoder", "torch", "", layers=8, cells=[cell])
    assert coverage.cell_text(cell, row, bad).startswith("✗ ")


def test_a_model_that_fails_eagerly_is_a_row_error(monkeypatch):
    def broken():
        raise RuntimeError("no such config\nstack")

    monkeypatch.setitem(ARCHITECTURES, "broken", architectures.Architecture("broken", "torch", "", broken))
    matrix = coverage.run_matrix(["broken"], ["lowrank"])
    (row,) = matrix.rows
    assert row.error == "eager: RuntimeError: no such config" and row.cells == []
    assert "✗ eager: RuntimeError" in matrix.to_markdown()


def test_unknown_column_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid columns: int8-openvino"):
        coverage.columns_named(["int4"])


def test_cli_refuses_unknown_models_and_columns(capsys):
    from edgepasses.cli import main

    for argv in (["--model", "nope"], ["--column", "int4"]):
        with pytest.raises(SystemExit):
            main(["bench", "coverage", *argv])
        assert "valid:" in capsys.readouterr().err


def test_markdown_cells_failures_and_grouped_fallbacks():
    header = {"date": "today", "commit": None, "cpu": "a CPU", "logical_cpus": 2, "torch_threads": 2,
              "load_average": [0.5, 0.5, 0.5], "versions": {"torch": "2"}}
    fallback = {"op": "aten.matmul.default", "node": "matmul", "reason": "no int8 kernel", "source": ""}
    ok = coverage.Cell("int8-reference", compiled=True, reached=3, graphs=2, sqnr_db=30.04, max_abs_error=0.1,
                       fallbacks=[fallback, {**fallback, "node": "matmul_1"}])
    same = coverage.Cell("prune", compiled=True, reached=0, total=0, graphs=1, max_abs_error=0.0)
    failed = coverage.Cell("lowrank", error="KeyError: 'x'", error_detail="'x' / more")
    row = coverage.ModelRow("m", "torch", "", layers=4, cells=[ok, same, failed])
    columns = coverage.columns_named(["int8-reference", "prune", "lowrank"])
    text = coverage.Matrix(header, columns, [row]).to_markdown()
    assert "| m | torch | 4 | - | ✓ 3/4, 30.0 dB, 2 graphs, 2 fallbacks | ✓ 0/0 groups, identical | ✗ KeyError: 'x' |" in text
    assert "- m × lowrank: KeyError: 'x' / more" in text
    assert "- m × int8-reference: 2× aten.matmul.default (no int8 kernel)" in text
