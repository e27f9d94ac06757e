"""`edgepasses compress`: the user's own model (module:factory or .pt2) to a loadable artifact."""
import re

import pytest
import torch

import edgepasses
from edgepasses.cli import main



def _eager():
    import usermodels

    torch.manual_seed(0)
    return usermodels.build().eval()


def test_a_factory_is_compressed_to_an_artifact_that_loads_and_runs(workdir, capsys):
    torch.manual_seed(0)  # the factory's weights: the same ones _eager() builds
    code = main(["compress", "usermodels:build", "--input-shape", "2,3,16,16", "--pipeline", "fold_bn,quantize",
                 "--calibration", "calib.pt", "--target", "reference", "--out", "out"])
    printed = capsys.readouterr().out
    assert code == 0 and "| quantize | yes |" in printed and "target reference" in printed
    x = torch.randn(2, 3, 16, 16)
    got, expected = edgepasses.load(workdir / "out")(x), _eager()(x)
    assert got.shape == (2, 10)
    assert (expected - got).pow(2).mean() < 1e-2 * expected.pow(2).mean()  # int8: within 20 dB


def test_a_pt2_file_brings_its_own_input_shapes(workdir, capsys):
    model, x = _eager(), torch.randn(2, 3, 16, 16)
    torch.export.save(torch.export.export(model, (x,)), workdir / "model.pt2")
    assert main(["compress", "model.pt2", "--target", "reference", "--out", "out"]) == 0
    torch.testing.assert_close(edgepasses.load(workdir / "out")(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["nothere:build"], "No module named 'nothere'"),
    (["usermodels:missing"], "has no attribute 'missing'"),
    (["usermodels"], "expected package.module:factory"),
    (["usermodels:not_a_model"], "returned int, not a torch.nn.Module"),
    (["missing.pt2"], "missing.pt2: No such file or directory"),
    (["usermodels:build", "--input-shape", "2,x"], "input shape '2,x'"),
    (["usermodels:build", "--calibration", "nope.pt"], "calibration nope.pt: No such file"),
    (["usermodels:build", "--calibration", "usermodels.py"], r"torch.load\(weights_only=True\) refused it"),
])
def test_a_bad_model_shape_or_file_is_one_line_without_traceback(workdir, capsys, args, message):
    if "--input-shape" not in args:
        args = [*args, "--input-shape", "2,3,16,16"]
    assert main(["compress", *args, "--pipeline", "quantize", "--out", "out"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("edgepasses compress: error:")
    assert re.search(message, err), err
