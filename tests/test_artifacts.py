"""save/load: a compressed graph and its OpenVINO model (or TVM library) in one checked directory."""
import json
import logging
import shutil

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.artifacts import FORMAT_VERSION, load, save
from edgepasses.errors import ArtifactError, EdgeError

openvino = pytest.importorskip("openvino")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["fold_bn", "fold_bn,quantize"])
def saved(request, tmp_path_factory):
    """(pipeline, compressed graph, artifact directory), saved once per module."""
    calibration = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    gm = edgepasses.compress(_model(), (X,), request.param, calibration=calibration)
    path = save(gm, tmp_path_factory.mktemp("artifact") / "model")  # example inputs from meta["val"]
    return request.param, gm, path


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved[2], tmp_path / "copy")


def test_round_trip_gives_the_same_graph_and_a_close_openvino_program(saved):
    pipeline, gm, path = saved
    artifact = load(path)
    with torch.no_grad():
        expected = gm(X)
        assert torch.equal(artifact.graph(X), expected)
        got = artifact.program(X)
    # int8: OpenVINO's integer kernels may land one quantisation step away from the Q/DQ graph.
    atol = 1e-4 if "quantize" not in pipeline else 0.05 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-3)
    manifest = artifact.manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["target"] == "openvino"
    assert manifest["pipeline"] == pipeline
    assert manifest["pipeline_uuid"] == edgepasses.Pipeline.parse(pipeline).uuid()
    assert manifest["torch_version"] == torch.__version__ and manifest["target_info"]["openvino_version"]
    assert manifest["target_info"]["weights"] == "f32"
    assert manifest["inputs"] == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert sorted(manifest["files"]) == ["graph.pt2", "openvino/model.bin", "openvino/model.xml"]


def test_a_flipped_byte_is_a_corrupt_file_error(copy):
    weights = copy / "openvino" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"openvino/model\.bin is corrupt or modified"):
        load(copy)


def test_an_unknown_format_version_names_both_versions(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"format version {FORMAT_VERSION + 1}.*format version {FORMAT_VERSION}"):
        load(copy)


def test_missing_manifest_or_file_is_a_clear_error(copy):
    (copy / "openvino" / "model.xml").unlink()
    with pytest.raises(ArtifactError, match=r"missing openvino/model\.xml"):
        load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(EdgeError, match="manifest.json does not exist"):
        load(copy)


def test_another_torch_version_is_a_warning_not_an_error(copy, caplog):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["torch_version"] = "1.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="edgepasses.artifacts"):
        artifact = load(copy, program=False)
    assert f"torch 1.0.0 and is loaded with torch {torch.__version__}" in caplog.text
    assert artifact.program is None and artifact.graph is not None


def test_graph_only_artifact_and_bad_arguments(tmp_path):
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    path = save(gm, tmp_path / "graph_only", (X,), target_artifact=False)
    artifact = load(path)
    assert artifact.program is None and artifact.manifest["target"] is None
    assert sorted(artifact.manifest["files"]) == ["graph.pt2"]
    with pytest.raises(ArtifactError, match="not a graph from edgepasses.compress"):
        save(_model(), tmp_path / "eager")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an edgepasses artifact directory"):
        save(gm, tmp_path / "other")


def test_extra_is_kept_and_a_tvm_artifact_needs_its_program(tmp_path):
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    path = save(gm, tmp_path / "extra", (X,), target_artifact=False, extra={"cache_key": "abc", "n": [1, 2]})
    assert load(path, program=False).manifest["extra"] == {"cache_key": "abc", "n": [1, 2]}
    with pytest.raises(ArtifactError, match="target_artifact='tvm' needs program="):
        save(gm, tmp_path / "tvm", (X,), target_artifact="tvm")
    with pytest.raises(ArtifactError, match="True, False or a target that stores its program .openvino, tvm"):
        save(gm, tmp_path / "bad", (X,), target_artifact="onnx")
