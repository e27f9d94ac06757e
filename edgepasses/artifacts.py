"""`save` / `load`: a compressed graph and its target's artifact in one checked directory.

    path/graph.pt2             torch.export.save of torch.export.export(gm, example_inputs)
    path/openvino/model.xml    openvino.save_model of the converted graph (weights full precision
    path/openvino/model.bin      unless compress_to_fp16=True)
    path/tvm/model.so          or: the Relax VM executable of a TVM program (`export_library`),
                                 machine code for the CPU it was built on (`tvm_mcpu`)
    path/manifest.json         format version, the edgepasses/torch/openvino/tvm versions that wrote it,
                               the pipeline (text and uuid), the target, the inputs, a SHA-256 per file,
                               and `extra` (what the caller keeps there: the compile cache's key)

At most one target artifact is there (none for a graph-only artifact).

Artifacts are data, not code (docs/artifacts.md). The SHA-256s catch corruption, not tampering:
whoever can write the files can write the manifest. So `load` trusts no byte of them:
- the manifest is checked completely before anything is read: it names exactly the files of its
  target, only inside its folder; the folder holds exactly those files (no extra file, no
  symbolic link); each file has its SHA-256;
- `graph.pt2` is deserialized only after its archive is checked to hold nothing that loads by
  unpickling (torch.export.load unpickles with weights_only=False) or by evaluating text
  (symbolic shapes go through sympy.sympify): raw tensor bytes, JSON, example inputs that load
  with torch.load(weights_only=True), and calls of torch operators only;
- OpenVINO's model.xml/.bin are data for OpenVINO's reader;
- a TVM library is native code: loading it runs it, so `load` loads one only with
  `trust_native_code=True`.
Every failure is an `ArtifactError` naming the file and what to do. `save` writes a sibling
temporary directory, fsyncs it and renames it into place: an artifact already at `path` stays
loadable whatever fails.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import ArtifactError, first_line
from .pt2_check import load_checked

log = logging.getLogger(__name__)

FORMAT = "edgepasses-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.pt2"
OPENVINO_XML = "openvino/model.xml"
OPENVINO_BIN = "openvino/model.bin"
TVM_LIB = "tvm/model.so"
TARGET_FILES = (OPENVINO_XML, OPENVINO_BIN, TVM_LIB)
FILES_OF_TARGET = {None: {GRAPH}, "openvino": {GRAPH, OPENVINO_XML, OPENVINO_BIN}, "tvm": {GRAPH, TVM_LIB}}


@dataclass
class Artifact:
    """What `load` returns. `program` runs the target artifact (an OpenVINOProgram or a TVMProgram;
    None when there is none, or its runtime is not installed); `graph` is the saved graph as a
    module (`exported.module()`)."""
    path: Path
    manifest: dict[str, Any]
    graph: torch.nn.Module
    exported: torch.export.ExportedProgram
    program: Callable | None = None
    notes: list[str] = field(default_factory=list)

    def __call__(self, *args, **kwargs):
        """The target program when there is one, else the graph."""
        return (self.program or self.graph)(*args, **kwargs)


# --- save ------------------------------------------------------------------------------------

def save(gm_or_lowered: Any, path: str | os.PathLike, example_inputs: tuple | None = None, *,
         target_artifact: bool | str = True, compress_to_fp16: bool = False, program: Any = None,
         extra: dict | None = None) -> Path:
    """Save `gm_or_lowered` under the directory `path` (created; an existing artifact there is replaced
    atomically: it stays as it was if anything fails).

    `gm_or_lowered`: what `compress` returned, or what `lower(gm, args, target="openvino")` returned
    when that program keeps its source (`exported` and `ov_model` attributes). `example_inputs`
    default to zeros shaped like the graph's placeholders (`meta["val"]`). `target_artifact`: True
    saves the OpenVINO model too when openvino is installed and converts the whole graph (else the
    graph alone, with a WARNING), or the TVM library when `program` is a TVMProgram; "openvino" or
    "tvm" requires that one; False saves the graph alone. `program`: what `lower` returned for this
    graph, so a TVM build is written rather than rebuilt (an OpenVINO model is converted again
    unless it keeps `ov_model`). `extra`: JSON-able data kept in the manifest.
    """
    if target_artifact not in (True, False, "openvino", "tvm"):
        raise ArtifactError(f"save: target_artifact must be True, False, 'openvino' or 'tvm'; got {target_artifact!r}")
    if target_artifact == "tvm" and getattr(program, "executable", None) is None:
        raise ArtifactError("save: target_artifact='tvm' needs program=<the TVMProgram lower() returned for the "
                            "graph>: the library is written from its executable")
    path = Path(path)
    _check_replaceable(path)
    exported, ov_model, gm = _sources(gm_or_lowered, example_inputs)
    _check_data_only(exported)
    ov_model = ov_model if ov_model is not None else getattr(program, "ov_model", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)  # the umask's mode, as a directory the user made
    try:
        _write(tmp, exported, ov_model, gm, program, target_artifact, compress_to_fp16, extra)
        _fsync_tree(tmp)
        _move_into_place(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, ArtifactError):  # disk full, permissions, ...
            raise ArtifactError(f"save: could not write {path} ({first_line(exc)}); an artifact that was there "
                                f"is unchanged") from exc
        raise
    return path


def _check_replaceable(path: Path) -> None:
    if path.is_symlink():
        raise ArtifactError(f"save: {path} is a symbolic link; save to the directory it points to")
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).exists())):
        raise ArtifactError(f"save: {path} exists and is not an edgepasses artifact directory; refusing to "
                            f"write into it")


def _check_data_only(exported: torch.export.ExportedProgram) -> None:
    """What torch.export.save would pickle (tensor subclasses, script or opaque objects), load refuses;
    refuse it here, where the graph was made, and static shapes alike (load refuses symbolic ones)."""
    for kind, values in (("weight", exported.state_dict), ("constant", exported.constants)):
        for name, value in values.items():
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise ArtifactError(f"save: {kind} {name!r} is a {type(value).__name__}, which torch.export "
                                    f"stores pickled; artifacts hold plain tensors only, so that loading runs "
                                    f"no code")
    if exported.range_constraints:
        raise ArtifactError("save: the graph has symbolic shapes; artifacts hold static shapes only (export it "
                            "with example inputs and no dynamic_shapes)")


def _write(folder: Path, exported, ov_model, gm, program, target_artifact, compress_to_fp16: bool,
           extra: dict | None) -> None:
    """The graph, the target artifact and the manifest, into `folder`."""
    files = [GRAPH]
    torch.export.save(exported, folder / GRAPH)
    target, openvino_version, tvm_info = None, _openvino_version(), {}
    if target_artifact in (True, "tvm") and getattr(program, "executable", None) is not None:
        tvm_info = _save_tvm(program, folder / TVM_LIB)
        files.append(TVM_LIB)
        target = "tvm"
    elif target_artifact in (True, "openvino"):
        if ov_model is None:
            ov_model = _convert(exported, required=target_artifact == "openvino", openvino_version=openvino_version)
        if ov_model is not None:
            import openvino as ov

            (folder / OPENVINO_XML).parent.mkdir(exist_ok=True)
            ov.save_model(ov_model, str(folder / OPENVINO_XML), compress_to_fp16=compress_to_fp16)
            files += [OPENVINO_XML, OPENVINO_BIN]
            target = "openvino"

    report = getattr(gm, "edge_report", None) if gm is not None else None
    pipeline = getattr(report, "pipeline", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgepasses_version": _edgepasses_version(),
        "torch_version": torch.__version__,
        "openvino_version": openvino_version if target == "openvino" else None,
        "pipeline": pipeline,
        "pipeline_uuid": _pipeline_uuid(pipeline),
        "report": _jsonable(report.to_dict()) if hasattr(report, "to_dict") else None,
        "target": target,
        "openvino_weights": ("f16" if compress_to_fp16 else "f32") if target == "openvino" else None,
        "tvm_version": tvm_info.get("version"),
        "tvm_mcpu": tvm_info.get("mcpu"),
        "inputs": [{"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                   for v in _user_input_vals(exported)],
        "files": {name: _sha256(folder / name) for name in files},
        "extra": _jsonable(extra),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _sibling(path: Path, suffix: str) -> Path:
    """A fresh hidden name next to `path` (the compile cache sweeps stale `.*.tmp` ones)."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.{suffix}"


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`. An artifact at `path` is renamed aside first and removed only once `tmp`
    took its place (renamed back if that fails): POSIX cannot swap directories in one rename."""
    if not path.exists():
        os.rename(tmp, path)
    else:
        old = _sibling(path, "old.tmp")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root` on disk before the rename makes it the artifact."""
    for folder, _, names in os.walk(root):
        for name in names:
            _fsync(Path(folder, name))
        _fsync_dir(Path(folder))


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":  # a directory cannot be opened for fsync elsewhere
        _fsync(folder)


# --- load ------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, precision: str = "f32", program: bool = True,
         cache_dir: str | None = None, trust_native_code: bool = False) -> Artifact:
    """Check and load the artifact at `path` (see the module docstring); `precision` is the OpenVINO
    inference precision of `.program` (TVM runs f32); `program=False` skips compiling or loading it;
    `cache_dir` is OpenVINO's compiled-model cache (CACHE_DIR). `trust_native_code=True` loads a TVM
    library, which runs its code: only for artifacts whose writer you trust (else `.program` is None)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    _warn_on_another_torch(path, manifest)
    exported = load_graph(path / GRAPH, manifest["files"][GRAPH])
    artifact = Artifact(path, manifest, exported.module(), exported)
    if program and manifest["target"] == "openvino":
        artifact.program = _load_openvino(path, exported, precision, cache_dir, artifact.notes)
    elif program and manifest["target"] == "tvm":
        artifact.program = _load_tvm(path, manifest, exported, artifact.notes, trust_native_code)
    return artifact


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, checked in itself: format, version, a target we know, a SHA-256 per file name."""
    manifest_path = Path(path) / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise ArtifactError(f"load: {manifest_path} does not exist (or is not a regular file): {path} is not an "
                            f"edgepasses artifact (or its save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"load: {manifest_path} is not valid JSON (corrupt or modified): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"load: {manifest_path} is not an edgepasses artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"load: {path} has artifact format version {version!r}; this edgepasses "
                            f"({_edgepasses_version()}) reads format version {FORMAT_VERSION} only")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d)
                                              for d in files.values()):
        raise ArtifactError(f"load: {manifest_path} has no SHA-256 per file (corrupt or modified)")
    if manifest.get("target") not in FILES_OF_TARGET:
        raise ArtifactError(f"load: {manifest_path} names target {manifest.get('target')!r}; this edgepasses "
                            f"knows {', '.join(str(t) for t in FILES_OF_TARGET)}")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest names exactly its target's files, inside `path`; `path` holds exactly those (regular
    files, no links); each has its SHA-256. Names are checked before any file is touched."""
    listed = set(manifest["files"])
    for name in sorted(listed):
        _check_name(path, name)
    expected = FILES_OF_TARGET[manifest["target"]]
    if listed != expected:
        raise ArtifactError(f"load: {path / MANIFEST} lists {sorted(listed)}, but an artifact of target "
                            f"{manifest['target']!r} holds {sorted(expected)} (corrupt or modified)")
    present = _files_in(path)
    missing = sorted(listed - present)
    if missing:
        raise ArtifactError(f"load: {path} is missing {', '.join(missing)} (listed in its {MANIFEST})")
    unlisted = sorted(present - listed - {MANIFEST})
    if unlisted:
        raise ArtifactError(f"load: {path} holds {', '.join(unlisted)}, which its {MANIFEST} does not list "
                            f"(modified: remove it, or save the artifact again)")
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise ArtifactError(f"load: {path / name} is corrupt or modified: its SHA-256 differs from the one "
                                f"in {MANIFEST}")


def _check_name(path: Path, name: str) -> None:
    """A manifest names files inside its folder only: never read or hash anything else."""
    parts = PurePosixPath(name).parts
    if (not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or ".." in parts or "\\" in name):
        raise ArtifactError(f"load: {path / MANIFEST} names {name!r}, a path outside the artifact's folder; "
                            f"do not load this artifact (crafted or corrupt)")


def _files_in(root: Path) -> set[str]:
    """Every file under `root`, as a relative POSIX name; a link or special file is an error (lstat only)."""
    found = set()
    for folder, dirs, files in os.walk(root):  # links to directories are listed in `dirs`, never followed
        for name in dirs + files:
            entry = Path(folder, name)
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ArtifactError(f"load: {entry} is a link or a special file; an artifact holds regular files "
                                    f"only (do not load it, or save it again)")
            if stat.S_ISREG(mode):
                found.add(entry.relative_to(root).as_posix())
    return found


def _warn_on_another_torch(path: Path, manifest: dict[str, Any]) -> None:
    saved, ours = manifest.get("torch_version", "?"), torch.__version__
    if _major_minor(saved) != _major_minor(ours):
        log.warning("load: %s was saved with torch %s and is loaded with torch %s; torch.export's format "
                    "may differ between versions", path, saved, ours)


# --- graph.pt2: checked to be data, then deserialized ---------------------------------------------

def load_graph(file: Path, digest: str) -> torch.export.ExportedProgram:
    """Deserialize `file` from the bytes whose SHA-256 is checked here (never re-read from disk), after
    `check_pt2` found only data in them, and check every call is a torch operator."""
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ArtifactError(f"load: {file} is corrupt or modified: its SHA-256 differs from the one in {MANIFEST}")
    return load_checked(data, file)


# --- target programs -------------------------------------------------------------------------

def _load_openvino(path: Path, exported, precision: str, cache_dir: str | None, notes: list[str]):
    try:
        import openvino as ov
    except ImportError:
        notes.append("openvino is not installed: .program is None (pip install 'edgepasses[openvino]')")
        return None
    from .backends.openvino import OpenVINOProgram

    try:
        ov_model = ov.Core().read_model(str(path / OPENVINO_XML))
        return OpenVINOProgram(ov_model, exported, precision, cache_dir)
    except Exception as exc:  # OpenVINO raises its own error types for a bad model
        raise ArtifactError(f"load: OpenVINO could not read or compile {path / OPENVINO_XML}: "
                            f"{first_line(exc)}") from exc


def _save_tvm(program: Any, file: Path) -> dict[str, str]:
    """Write a TVMProgram's executable as a shared library (needs a C compiler, as TVM's builds do)."""
    import tvm

    file.parent.mkdir(exist_ok=True)
    program.executable.export_library(str(file))
    return {"version": tvm.__version__, "mcpu": _tvm_mcpu(getattr(program, "info", {}).get("target"))}


def _tvm_mcpu(target: str | None) -> str:
    """The CPU a TVM build was compiled for: from its target (a JSON dict in TVM 0.27), else this host's."""
    try:
        return json.loads(target)["mcpu"]
    except (TypeError, ValueError, KeyError):
        from .backends.tvm.build import host_cpu

        return host_cpu()


def _load_tvm(path: Path, manifest: dict[str, Any], exported, notes: list[str], trust_native_code: bool):
    """A TVMProgram running the saved library, or None (with a note) where it cannot or may not run here."""
    if not trust_native_code:  # loading a shared library runs its initialisers: it is code, not data
        notes.append(f"{TVM_LIB} is native code and loading it runs it: .program is None (load(..., "
                     "trust_native_code=True) if you trust who wrote this artifact, or lower() the graph again)")
        log.warning("load: %s", notes[-1])
        return None
    try:
        import tvm
    except ImportError:
        notes.append("tvm is not installed: .program is None (pip install apache-tvm)")
        return None
    from .backends.tvm import TVMProgram
    from .backends.tvm.build import host_cpu

    saved, here = manifest.get("tvm_mcpu"), host_cpu()
    if saved != here:  # its machine code may use instructions this CPU lacks
        notes.append(f"the TVM library was built for CPU {saved!r} and this CPU is {here!r}: .program is None "
                     "(lower() the graph again)")
        return None
    try:
        library = tvm.runtime.load_module(str(path / TVM_LIB))
    except Exception as exc:  # TVM raises its own error types for a bad library
        raise ArtifactError(f"load: {path / TVM_LIB} could not be loaded by TVM {tvm.__version__} (saved with "
                            f"{manifest.get('tvm_version')}): {first_line(exc)}") from exc
    return TVMProgram(exported, trials=0, time_limit_s=None, cache_dir=None, executable=library)


def _sources(obj: Any, example_inputs: tuple | None):
    """(exported program, OpenVINO model or None, the compressed graph or None) of what save was given."""
    if isinstance(obj, torch.fx.GraphModule) and not hasattr(obj, "edge_lowering"):
        args, kwargs = _example_args(obj, example_inputs)
        for module in obj.modules():  # the graph is fixed already; torchao's convert_pt2e forbids .eval()
            module.training = False
        try:
            exported = torch.export.export(obj, args, kwargs)
        except Exception as exc:
            raise ArtifactError(f"save: torch.export could not capture the graph: {exc}") from exc
        return exported, None, obj
    exported, ov_model = getattr(obj, "exported", None), getattr(obj, "ov_model", None)
    if isinstance(exported, torch.export.ExportedProgram) and ov_model is not None:
        return exported, ov_model, getattr(obj, "source_graph", None)
    raise ArtifactError(f"save: {type(obj).__name__} is not a graph from edgepasses.compress, nor a lowered "
                        f"program that keeps its source (`exported` and `ov_model`); save the GraphModule that "
                        f"was lowered: save(gm, path) writes the OpenVINO model too")


def _example_args(gm: torch.fx.GraphModule, example_inputs: tuple | None) -> tuple[tuple, dict]:
    if example_inputs is not None:
        return tuple(example_inputs), {}
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if not vals or any(not isinstance(v, torch.Tensor) for v in vals):
        raise ArtifactError("save: the graph's inputs carry no meta['val'] to build example inputs from; pass "
                            "example_inputs")
    leaves = [torch.zeros(tuple(int(s) for s in v.shape), dtype=v.dtype) for v in vals]
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return tuple(leaves), {}
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _user_input_vals(exported: torch.export.ExportedProgram) -> list:
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    vals = [placeholders[name].meta.get("val") for name in exported.graph_signature.user_inputs]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _convert(exported, *, required: bool, openvino_version: str | None):
    if openvino_version is None:
        if required:
            raise ArtifactError("save: target_artifact='openvino' needs openvino: pip install 'edgepasses[openvino]'")
        log.info("save: openvino is not installed; saving the graph alone")
        return None
    from .backends.openvino import convert_exported

    try:
        return convert_exported(exported)
    except Exception as exc:
        if required:
            raise ArtifactError(f"save: OpenVINO could not convert the whole graph: {exc}") from exc
        log.warning("save: OpenVINO could not convert the whole graph, so only the graph is saved "
                    "(lower() it after load to run it split): %s", str(exc).splitlines()[0] if str(exc) else exc)
        return None


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _edgepasses_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgepasses")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


def _pipeline_uuid(text: str | None) -> str | None:
    if not text:
        return None
    from .pipeline import Pipeline

    try:
        return Pipeline.parse(text).uuid()
    except Exception:  # noqa: BLE001 - a pass registered by a plugin that is not imported now: keep the text alone
        return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
