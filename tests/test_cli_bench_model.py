"""`edgepasses bench --model MODEL` on the user's own model, in the forms `edgepasses compress` takes:
`package.module:factory` with --input-shape, or a .pt2 file; a bad one is one line, exit 1."""
import re

import pytest
import torch

from edgepasses.cli import main

pytest.importorskip("openvino")

FAST = ["--warmup", "1", "--rounds", "3"]


def _rows(markdown: str) -> dict[str, list[str]]:
    """Table rows by label: their cells after the label."""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
             if line.startswith("| ") and not line.startswith("| ---")]
    return {row[0]: row[1:] for row in cells[1:]}


def test_a_factory_is_timed_beside_eager_and_openvino_direct(workdir, capsys):
    assert main(["bench", "--model", "usermodels:build", "--input-shape", "2,3,16,16", *FAST]) == 0
    out = capsys.readouterr().out
    assert "### usermodels:build: your model" in out and "input 2x3x16x16" in out and "3 interleaved rounds" in out
    rows = _rows(out)
    assert list(rows) == ["eager fp32", "openvino direct", "edge: edge-fp32"]
    median, min_max = rows["edge: edge-fp32"][:2]
    low, high = map(float, min_max.split("–"))
    assert low <= float(median) <= high
    assert not (workdir / "docs").exists()  # a user's model is not written into docs/benchmarks.md


def test_a_pt2_brings_its_inputs_and_an_int8_pipeline_brings_the_nncf_peer(workdir, capsys):
    pytest.importorskip("nncf")
    import usermodels

    model, x = usermodels.build().eval(), torch.randn(1, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), workdir / "model.pt2")
    torch.save([(torch.randn(1, 3, 16, 16),) for _ in range(4)], workdir / "calib.pt")
    assert main(["bench", "--model", "model.pt2", "--pipeline", "fold_bn,quantize", "--calibration", "calib.pt",
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert "calibrated on calib.pt" in out and "input 1x3x16x16" in out
    assert list(_rows(out)) == ["eager fp32", "openvino direct", "nncf int8 + openvino", "edge: fold_bn,quantize"]


@pytest.mark.parametrize("args, message", [
    (["--model", "nothere:build", "--input-shape", "1,3,16,16"], "No module named 'nothere'"),
    (["--model", "usermodels:missing", "--input-shape", "1,3,16,16"], "has no attribute 'missing'"),
    (["--model", "missing.pt2"], "missing.pt2: No such file or directory"),
    (["--model", "usermodels:build", "--input-shape", "1,x"], "input shape '1,x'"),
    (["--model", "usermodels:build"], "give its input shapes"),
    (["--model", "usermodels:build", "--input-shape", "1,3,16,16", "--calibration", "nope.pt"],
     "calibration nope.pt: No such file"),
])
def test_a_bad_model_shape_or_file_is_one_line_without_traceback(workdir, capsys, args, message):
    assert main(["bench", *args, *FAST]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("edgepasses bench: error:") and re.search(message, err), err


@pytest.mark.parametrize("args, message", [
    (["--model", "usermodels"], r"unknown model\(s\) usermodels; valid models: .*package.module:factory or a .pt2"),
    (["--model", "resnet18", "--input-shape", "1,3,16,16"], "--input-shape and --calibration are for"),
])
def test_a_model_that_is_neither_form_is_a_usage_error(workdir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
