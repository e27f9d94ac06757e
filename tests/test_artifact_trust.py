"""Artifacts are data, not code (docs/artifacts.md): crafted graph.pt2 files run nothing, the manifest
names only the files inside its folder, saves are atomic, a poisoned compile cache entry is rebuilt."""
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import artifacts, compile_cache
from edgepasses.artifacts import load, save
from edgepasses.errors import ArtifactError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """A graph-only artifact of a small compressed model."""
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    return save(gm, tmp_path_factory.mktemp("trust") / "graph", (X,), target_artifact=False)


@pytest.fixture
def copy(graph, tmp_path) -> Path:
    return Path(shutil.copytree(graph, tmp_path / "copy"))


class Payload:
    """Unpickling this creates `marker`: stands for any code an attacker would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pickled_weight(entries: dict, marker: Path) -> None:
    config = json.loads(entries["data/weights/model_weights_config.json"])
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    entries["data/weights/" + meta["path_name"]] = _torch_bytes(Payload(marker))
    entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()


def _opaque_constant(entries: dict, marker: Path) -> None:
    config = json.loads(entries["data/constants/model_constants_config.json"])
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
    entries["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    entries["data/constants/model_constants_config.json"] = json.dumps(config).encode()


def _example_inputs(entries: dict, marker: Path) -> None:
    """torch.export.load retries example inputs with weights_only=False when weights_only=True fails."""
    entries["data/sample_inputs/model.pt"] = _torch_bytes((Payload(marker),))


def _symbolic_shape(entries: dict, marker: Path) -> None:
    """torch.export.load parses shape expressions with sympy.sympify, which evaluates Python."""
    model = json.loads(entries["models/model.json"])
    meta = next(iter(model["graph_module"]["graph"]["tensor_values"].values()))
    code = f"open({str(marker)!r}, 'w').close()"
    meta["sizes"][0] = {"as_expr": {"expr_str": f"__import__('builtins').exec({code!r})", "hint": {"as_int": 2}}}
    entries["models/model.json"] = json.dumps(model).encode()


def _shape_guard(entries: dict, marker: Path) -> None:
    """ExportedProgram.module() executes each shape guard's text when the loaded graph runs."""
    model = json.loads(entries["models/model.json"])
    model["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    entries["models/model.json"] = json.dumps(model).encode()


def _function_call(entries: dict, marker: Path) -> None:
    """A node calling os.system (reachable as torch.os.system) would run it when the graph runs."""
    model = json.loads(entries["models/model.json"])
    model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    entries["models/model.json"] = json.dumps(model).encode()


def _function_argument(entries: dict, marker: Path) -> None:
    """An operator argument (what a higher-order op calls) naming a Python function."""
    model = json.loads(entries["models/model.json"])
    model["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {"as_operator": "torch.os.system"}
    entries["models/model.json"] = json.dumps(model).encode()


def _native_library(entries: dict, marker: Path) -> None:
    """torch.export.load loads AOTInductor libraries it finds in the archive."""
    entries["data/aotinductor/model/model.so"] = b"\x7fELF"


# (craft, does plain torch.export.load run the payload?, what the error says)
ATTACKS = {
    "pickled weight": (_pickled_weight, True, "stores weight .* as a pickled object"),
    "pickled opaque constant": (_opaque_constant, True, "holds '.*opaque_obj_0', which a graph saved by edgepasses"),
    "pickled example inputs": (_example_inputs, True, "example inputs are not plain tensors"),
    "symbolic shape evaluated by sympify": (_symbolic_shape, True, "symbolic shape expression"),
    "shape guard executed by module()": (_shape_guard, False, "shape guard .*not size arithmetic"),
    "call of a Python function": (_function_call, False, "calls 'torch.os.system', which is not a torch operator"),
    "Python function as an argument": (_function_argument, False, "calls 'torch.os.system', which is not a torch"),
    "AOTInductor library": (_native_library, False, "holds '.*aotinductor/model/model.so'"),
}


def _craft(folder: Path, craft, marker: Path, compression: int = zipfile.ZIP_STORED) -> bytes:
    """Rewrite folder/graph.pt2 with `craft`, and the manifest's SHA-256 to match, as an attacker can."""
    with zipfile.ZipFile(folder / "graph.pt2") as archive:
        root = archive.namelist()[0].split("/")[0] + "/"
        entries = {name.removeprefix(root): archive.read(name) for name in archive.namelist()}
    craft(entries, marker)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(root + name, data)
    data = buffer.getvalue()
    (folder / "graph.pt2").write_bytes(data)
    _set_manifest(folder, lambda m: m["files"].update({"graph.pt2": hashlib.sha256(data).hexdigest()}))
    return data


def _set_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_crafted_graph_runs_no_code_and_is_a_clear_error(copy, tmp_path, attack):
    craft, live, message = ATTACKS[attack]
    marker = tmp_path / "marker"
    data = _craft(copy, craft, marker)
    if live:  # the payload is real: torch.export.load alone runs it
        with contextlib.suppress(Exception):  # some fail after running the payload; the marker is the point
            torch.export.load(io.BytesIO(data))
        assert marker.exists(), "the crafted payload should run under a plain torch.export.load"
        marker.unlink()
    with pytest.raises(ArtifactError, match=message) as error:
        load(copy)
    assert not marker.exists(), "edgepasses.load ran the payload"
    assert "\n" not in str(error.value) and "not loaded" in str(error.value)


def test_a_deserialized_graph_calling_a_python_function_is_refused(copy, monkeypatch):
    """The second line of defence, after the archive's names: the deserialized graph calls operators only."""
    exported = torch.export.load(copy / "graph.pt2")
    node = next(n for n in exported.graph.nodes if n.op == "call_function")
    node.target = print
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: exported)
    with pytest.raises(ArtifactError, match="calls <built-in function print> .call_function., which is not a torch"):
        load(copy)


def test_a_compressed_archive_is_refused_before_it_is_inflated(copy, tmp_path):
    _craft(copy, lambda entries, marker: None, tmp_path / "marker", zipfile.ZIP_DEFLATED)
    with pytest.raises(ArtifactError, match="compressed, which torch.export.save never writes"):
        load(copy)


def test_save_refuses_weights_torch_export_would_pickle(tmp_path):
    from torch.testing._internal.two_tensor import TwoTensor

    class Subclassed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(TwoTensor(torch.randn(3, 4), torch.randn(3, 4)))

        def forward(self, x):
            return x @ self.weight.t()

    exported = torch.export.export(Subclassed(), (torch.randn(2, 4),))
    from edgepasses.backends import Lowering
    from edgepasses.backends.openvino import OpenVINOProgram

    lowered = object.__new__(OpenVINOProgram)  # as lower() returns it: keeps its exported source
    lowered.__dict__.update(exported=exported, ov_model=object(), edge_lowering=Lowering("openvino", "f32", 1))
    with pytest.raises(ArtifactError, match="weight 'weight' is a TwoTensor, which torch.export stores pickled"):
        save(lowered, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_poisoned_cache_entry_runs_no_code_and_is_rebuilt_with_one_warning(tmp_path, caplog):
    marker = tmp_path / "marker"
    options = {"cache_dir": str(tmp_path / "cache"), "target": "reference", "pipeline": "fold_bn"}
    model = _model()
    first, miss = _compile(model, options)
    entry = Path(miss.cache_entry)
    _craft(entry, _pickled_weight, marker)
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        second, again = _compile(model, options)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("edgepasses")]
    assert not marker.exists(), "the poisoned entry ran its payload"
    assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()
    assert "pickled object" in warnings[0].getMessage()
    assert again.cache == "miss" and again.cache_entry == miss.cache_entry
    assert torch.equal(first, second)
    load(entry)  # rebuilt: a clean entry again
    caplog.clear()
    third, hit = _compile(model, options)
    assert hit.cache == "hit" and torch.equal(first, third)


def test_a_tvm_entry_others_can_write_is_not_loaded_but_rebuilt(tmp_path, caplog, monkeypatch):
    """A TVM library is native code: the cache loads one only from a directory this user alone can write."""
    options = {"cache_dir": str(tmp_path / "cache"), "target": "reference", "pipeline": "fold_bn"}
    _, miss = _compile(_model(), options)
    entry = Path(miss.cache_entry)
    assert compile_cache.written_by_this_user(entry)
    _set_manifest(entry, lambda m: m.update(target="tvm", target_info={}))  # as if it held tvm/model.so
    entry.chmod(0o775)
    assert not compile_cache.written_by_this_user(entry)
    monkeypatch.setattr(artifacts, "load", lambda *a, **k: pytest.fail("an entry others can write was loaded"))
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        _, again = _compile(_model(), options)
    assert "holds native code in a directory that another user owns or can write to" in caplog.text
    assert again.cache == "miss"


def test_a_tvm_artifact_loads_its_library_only_when_trusted(copy, monkeypatch):
    pytest.importorskip("tvm")
    _set_manifest(copy, lambda m: m.update(target="tvm", target_info={"mcpu": "any"}))
    (copy / "tvm").mkdir()
    (copy / "tvm" / "model.so").write_bytes(b"\x7fELF not a library")
    _set_manifest(copy, lambda m: m["files"].update({"tvm/model.so": artifacts._sha256(copy / "tvm/model.so")}))
    import tvm

    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a: pytest.fail("native code loaded without trust"))
    artifact = load(copy)
    assert artifact.program is None and "native code and loading it runs it" in artifact.notes[0]


def _compile(model, options):
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(model, backend="edge", options={**options, "on_compile": seen.append})
    with torch.no_grad():
        out = compiled(X)
    return out, seen[-1]


# --- atomic save ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """(graph, artifact path, its output) of an OpenVINO artifact about to be saved over."""
    pytest.importorskip("openvino")
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    path = save(gm, tmp_path / "out", (X,))
    with torch.no_grad():
        return gm, path, load(path).program(X)


def _assert_still_loads(path: Path, expected: torch.Tensor) -> None:
    artifact = load(path)
    with torch.no_grad():
        assert torch.equal(artifact.program(X), expected)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "a temporary directory was left"


def test_save_interrupted_mid_write_leaves_the_previous_artifact_loadable(saved, monkeypatch):
    _, path, expected = saved
    import openvino

    def disk_full(model, file, **kwargs):
        Path(file).write_bytes(b"<?xml half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(openvino, "save_model", disk_full)
    with pytest.raises(ArtifactError, match=r"could not write .*No space left on device.*is unchanged"):
        save(edgepasses.compress(_model(), (X,), "fold_bn,dce"), path, (X,))
    _assert_still_loads(path, expected)


def test_save_failing_to_rename_into_place_restores_the_previous_artifact(saved, monkeypatch):
    gm, path, expected = saved
    rename = os.rename

    def failing(src, dst):
        if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp"):  # the new artifact into place
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(ArtifactError, match="could not write .*Input/output error"):
        save(gm, path, (X,))
    monkeypatch.undo()
    _assert_still_loads(path, expected)


def test_save_over_an_artifact_replaces_it_whole(saved):
    gm, path, _ = saved
    save(gm, path, (X,), target_artifact=False)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "graph.pt2", "manifest.json"]
    assert load(path).manifest["target"] is None


# --- the manifest names the folder's files, and only those -------------------------------------------

@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "openvino/../../secret"])
def test_a_manifest_naming_a_file_outside_its_folder_is_an_error_before_any_file_is_read(copy, monkeypatch, name):
    (copy.parent / "secret").write_text("not yours")
    hashed = []
    monkeypatch.setattr(artifacts, "_sha256", lambda file: hashed.append(file) or "0" * 64)
    _set_manifest(copy, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(ArtifactError, match=rf"names '{name}', a path outside the artifact's folder"):
        load(copy)
    assert hashed == []


def test_an_unlisted_file_is_an_error(copy):
    (copy / "notes.txt").write_text("added later")
    with pytest.raises(ArtifactError, match="holds notes.txt, which its manifest.json does not list"):
        load(copy)


def test_a_missing_manifest_entry_is_an_error(copy):
    _set_manifest(copy, lambda m: m["files"].pop("graph.pt2"))
    with pytest.raises(ArtifactError, match=r"lists \[\], but an artifact of target None holds \['graph.pt2'\]"):
        load(copy)


def test_a_target_file_missing_from_the_manifest_is_an_error(saved, tmp_path):
    _, path, _ = saved
    copy = Path(shutil.copytree(path, tmp_path / "dropped"))
    _set_manifest(copy, lambda m: m["files"].pop("openvino/model.bin"))
    with pytest.raises(ArtifactError, match="but an artifact of target 'openvino' holds"):
        load(copy)


def test_a_symbolic_link_in_the_artifact_is_an_error(copy, tmp_path):
    outside = tmp_path / "graph.pt2"
    (copy / "graph.pt2").rename(outside)
    (copy / "graph.pt2").symlink_to(outside)
    with pytest.raises(ArtifactError, match="graph.pt2 is a link or a special file"):
        load(copy)
