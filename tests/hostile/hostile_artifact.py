"""Artifacts: crafted graph.pt2 files (the attacks of tests/test_artifact_trust.py, reused), manifests
naming files outside their folder, missing, extra, corrupt and linked files, saves that fail half-way
or would overwrite what is not an artifact, and round trips that must give the saved model's outputs."""
from __future__ import annotations

import errno
import functools
import importlib.util
import os
import shutil
import zipfile
from pathlib import Path
from unittest import mock

import torch

from hostile_common import artifact_trust, close, convnet, eager_of, randn, scratch, x_conv

import edgepasses
from edgepasses import artifacts
from edgepasses.bench.hostile import Case, SilentlyWrong, clear_error, correct, warning
from edgepasses.errors import ArtifactError



@functools.cache
def _graph() -> Path:
    """A graph-only artifact of the compressed convnet (made once per process)."""
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    return artifacts.save(gm, scratch("graph") / "graph", (x_conv(),), target_artifact=False)


@functools.cache
def _openvino() -> Path:
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    return artifacts.save(gm, scratch("openvino") / "model", (x_conv(),), target_artifact="openvino")


def _copy(source) -> Path:
    return Path(shutil.copytree(source(), scratch("copy") / "artifact"))


def _attack(name: str):
    trust = artifact_trust()
    craft = trust.ATTACKS[name][0]

    def run():
        folder = _copy(_graph)
        marker = folder.parent / "marker"
        trust._craft(folder, craft, marker)
        try:
            return artifacts.load(folder)
        finally:
            if marker.exists():
                raise SilentlyWrong(f"loading the crafted artifact ran its payload ({name})")
    return run


def _manifest(change, source=None):
    """Load a copy of the graph artifact whose manifest `change(manifest_dict)` edited (hash or not)."""
    def run():
        folder = _copy(source or _graph)
        artifact_trust()._set_manifest(folder, change)
        return artifacts.load(folder)
    return run


def _outside(name: str):
    def run():
        folder = _copy(_graph)
        (folder.parent / "secret").write_text("not yours")
        artifact_trust()._set_manifest(folder, lambda m: m["files"].update({name: "0" * 64}))
        hashed = []
        real = artifacts._sha256
        with mock.patch.object(artifacts, "_sha256", lambda file: hashed.append(file) or real(file)):
            try:
                return artifacts.load(folder)
            finally:
                outside = [f for f in hashed if not Path(os.path.abspath(f)).is_relative_to(folder)]
                if outside:
                    raise SilentlyWrong(f"load read {outside[0]}, outside the artifact")
    return run


def _files(change):
    """Load a copy of the graph artifact after `change(folder)` edited its files."""
    def run():
        folder = _copy(_graph)
        change(folder)
        return artifacts.load(folder)
    return run


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / "graph.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "graph.pt2").write_bytes(bytes(data))


def _link(folder: Path) -> None:
    outside = folder.parent / "graph.pt2"
    (folder / "graph.pt2").rename(outside)
    (folder / "graph.pt2").symlink_to(outside)


def _compressed(folder: Path) -> None:
    artifact_trust()._craft(folder, lambda entries, marker: None, folder.parent / "marker", zipfile.ZIP_DEFLATED)


def _write_manifest(text: str):
    return lambda folder: (folder / "manifest.json").write_text(text)


def _interrupted(where: str):
    """A save over an OpenVINO artifact that fails half-way: a clear error, and the old artifact loads."""
    def run():
        folder = _copy(_openvino)
        with torch.no_grad():
            expected = artifacts.load(folder).program(x_conv())
        import openvino

        def disk_full(model, file, **kwargs):
            Path(file).write_bytes(b"<?xml half a model")
            raise OSError(errno.ENOSPC, "No space left on device")

        rename = os.rename

        def failing_rename(src, dst):
            if str(src).endswith(".tmp") and not str(src).endswith(".old.tmp"):
                raise OSError(errno.EIO, "Input/output error")
            rename(src, dst)

        patch = (mock.patch.object(openvino, "save_model", disk_full) if where == "write"
                 else mock.patch.object(os, "rename", failing_rename))
        gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn,dce")
        try:
            with patch:
                return artifacts.save(gm, folder, (x_conv(),))
        finally:
            try:
                with torch.no_grad():
                    again = artifacts.load(folder).program(x_conv())
            except Exception as exc:  # noqa: BLE001
                raise SilentlyWrong(f"the previous artifact no longer loads: {exc}") from None
            if not torch.equal(again, expected):
                raise SilentlyWrong("the previous artifact loads but gives other outputs")
            if sorted(p.name for p in folder.parent.iterdir()) != [folder.name]:
                raise SilentlyWrong(f"a temporary directory was left: {sorted(os.listdir(folder.parent))}")
    return run


def _save_over_user_files():
    folder = scratch("user") / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    try:
        return artifacts.save(gm, folder, (x_conv(),), target_artifact=False)
    finally:
        photo = folder / "holiday.jpg"
        if not photo.exists() or photo.read_bytes() != b"precious":
            raise SilentlyWrong("save destroyed a file that was not part of an artifact")


def _save_to_link():
    target = scratch("real") / "real"
    target.mkdir()
    link = target.parent / "link"
    link.symlink_to(target)
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    return artifacts.save(gm, link, (x_conv(),), target_artifact=False)


def _round_trip_graph():
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    with torch.no_grad():
        return gm(x_conv()), artifacts.load(_graph())(x_conv())


def _round_trip_openvino():
    with torch.no_grad():
        return eager_of(convnet(), x_conv()), artifacts.load(_openvino()).program(x_conv())


def _saved_over():
    folder = _copy(_openvino)
    gm = edgepasses.compress(convnet(), (x_conv(),), "fold_bn")
    artifacts.save(gm, folder, (x_conv(),), target_artifact=False)
    loaded = artifacts.load(folder)
    with torch.no_grad():
        return gm(x_conv()), loaded(x_conv()), sorted(p.name for p in folder.rglob("*"))


def _replaced_whole(result):
    expected, got, files = result
    close(expected, got, atol=0)
    assert files == ["graph.pt2", "manifest.json"], f"files left from the old artifact: {files}"


def _other_shape():
    with torch.no_grad():
        return artifacts.load(_openvino()).program(randn(3, 3, 8, 8))


def _tvm_claimed():
    """A graph artifact that claims a TVM library: loading it must not load the library (native code)."""
    folder = _copy(_graph)
    (folder / "tvm").mkdir()
    (folder / "tvm" / "model.so").write_bytes(b"\x7fELF not a library")
    trust = artifact_trust()
    trust._set_manifest(folder, lambda m: m.update(target="tvm", target_info={"mcpu": "any"}))
    trust._set_manifest(folder, lambda m: m["files"].update({"tvm/model.so": artifacts._sha256(folder / "tvm/model.so")}))
    loaded = artifacts.load(folder)
    return loaded


def cases() -> list[Case]:
    trust = artifact_trust()
    cases = []
    for name, (_, _, message) in trust.ATTACKS.items():
        cases.append(Case(f"artifact crafted graph.pt2: {name}", "artifact", _attack(name),
                          clear_error(ArtifactError, message)))
    for name in ("../secret", "/etc/passwd", "openvino/../../secret", "C:\\\\secret", ""):
        cases.append(Case(f"artifact manifest names {name!r}", "artifact", _outside(name),
                          clear_error(ArtifactError, r"a path outside the artifact's folder")))
    cases += [
        Case("artifact unlisted extra file", "artifact",
             _files(lambda f: (f / "notes.txt").write_text("added later")),
             clear_error(ArtifactError, r"notes.txt, which its manifest.json does not list")),
        Case("artifact manifest entry dropped", "artifact", _manifest(lambda m: m["files"].pop("graph.pt2")),
             clear_error(ArtifactError, r"lists \[\], but an artifact of target None holds")),
        Case("artifact graph.pt2 is a symbolic link", "artifact", _files(_link),
             clear_error(ArtifactError, r"link or a special file")),
        Case("artifact manifest.json missing", "artifact", _files(lambda f: (f / "manifest.json").unlink()),
             clear_error(ArtifactError, r"manifest.json does not exist")),
        Case("artifact manifest.json not JSON", "artifact", _files(_write_manifest("{not json")),
             clear_error(ArtifactError, r"not valid JSON")),
        Case("artifact manifest.json a JSON list", "artifact", _files(_write_manifest("[1, 2]")),
             clear_error(ArtifactError, r"not an edgepasses artifact manifest")),
        Case("artifact manifest.json deeply nested", "artifact", _files(_write_manifest("[" * 100000 + "]" * 100000)),
             clear_error(ArtifactError, r"manifest")),
        Case("artifact format version from the future", "artifact", _manifest(lambda m: m.update(format_version=99)),
             clear_error(ArtifactError, r"format version 99")),
        Case("artifact unknown target in the manifest", "artifact", _manifest(lambda m: m.update(target="nope")),
             clear_error(ArtifactError, r"names target 'nope'")),
        Case("artifact digest that is not SHA-256", "artifact",
             _manifest(lambda m: m["files"].update({"graph.pt2": "abc"})),
             clear_error(ArtifactError, r"no SHA-256 per file")),
        Case("artifact graph.pt2 with a flipped byte", "artifact", _files(_flip_a_byte),
             clear_error(ArtifactError, r"graph.pt2 is corrupt or modified")),
        Case("artifact graph.pt2 deleted", "artifact", _files(lambda f: (f / "graph.pt2").unlink()),
             clear_error(ArtifactError, r"missing graph.pt2")),
        Case("artifact graph.pt2 compressed", "artifact", _files(_compressed),
             clear_error(ArtifactError, r"compressed, which torch.export.save never writes")),
        Case("artifact load of a path that does not exist", "artifact",
             lambda: artifacts.load(scratch("none") / "nope"), clear_error(ArtifactError, r"does not exist")),
        Case("artifact load of a file", "artifact",
             lambda: artifacts.load(_graph() / "graph.pt2"), clear_error(ArtifactError, r"not an edgepasses artifact")),
        Case("artifact save over a folder of user files", "artifact", _save_over_user_files,
             clear_error(ArtifactError, r"not an edgepasses artifact directory")),
        Case("artifact save to a symbolic link", "artifact", _save_to_link,
             clear_error(ArtifactError, r"symbolic link")),
        Case("artifact save with an unknown target_artifact", "artifact",
             lambda: artifacts.save(edgepasses.compress(convnet(), (x_conv(),), "fold_bn"), scratch("s") / "a",
                                    target_artifact="bogus"),
             clear_error(ArtifactError, r"target_artifact must be")),
        Case("artifact graph round trip", "artifact", _round_trip_graph, correct(lambda r: close(r[0], r[1], atol=0))),
    ]
    if importlib.util.find_spec("openvino") is not None:
        cases += [
            Case("artifact save interrupted mid-write keeps the old artifact", "artifact", _interrupted("write"),
                 clear_error(ArtifactError, r"No space left on device.*is unchanged")),
            Case("artifact save failing to rename keeps the old artifact", "artifact", _interrupted("rename"),
                 clear_error(ArtifactError, r"Input/output error")),
            Case("artifact openvino round trip", "artifact", _round_trip_openvino,
                 correct(lambda r: close(r[0], r[1], atol=1e-4))),
            Case("artifact save over an openvino artifact replaces it whole", "artifact", _saved_over,
                 correct(_replaced_whole)),
            Case("artifact openvino program called with another shape", "artifact", _other_shape,
                 clear_error((ArtifactError, ValueError, RuntimeError), r"(?s)(?=.*\b2, 3, 8, 8)(?=.*\b3, 3, 8, 8)")),
            Case("artifact load with an unknown precision", "artifact",
                 lambda: artifacts.load(_openvino(), precision="f64").program(x_conv()),
                 clear_error((ArtifactError, ValueError), r"precision")),
        ]
    if importlib.util.find_spec("tvm") is not None:
        cases.append(Case("artifact TVM library not loaded without trust", "artifact", _tvm_claimed,
                          warning(r"native code", lambda a: a.program is None)))
    return cases

