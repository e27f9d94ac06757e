"""`save` / `load`: a compressed graph and its target's program in one checked directory.

    path/graph.pt2             torch.export.save of torch.export.export(gm, example_inputs), with the
                               graph's dynamic dims and their ranges (`dynamic_shapes.export`)
    path/<target>/...          the target's program, the files its `artifact_files` declare
                               (openvino: model.xml/.bin, OpenVINO IR; tvm: model.so, a Relax VM
                               library, machine code for the CPU it was built on)
    path/manifest.json         format version, the edgepasses/torch versions that wrote it, the
                               pipeline (text and uuid), the target and what it needs to load its
                               program (`target_info`: its runtime's version, ...), the inputs, a
                               SHA-256 per file, and `extra` (what the caller keeps there: the
                               compile cache's key); an input's dynamic dim is its symbol in
                               `shape` and its range in `dynamic`

At most one target's program is there (none for a graph-only artifact). Targets write and read
their own files (`Target.save_program` / `load_program`); this module checks them.

Artifacts are data, not code (docs/artifacts.md). The SHA-256s catch corruption, not tampering:
whoever can write the files can write the manifest. So `load` trusts no byte of them:
- the manifest is checked completely before anything is read: it names exactly the files of its
  target, only inside its folder; the folder holds exactly those files (no extra file, no
  symbolic link); each file has its SHA-256;
- `graph.pt2` is deserialized only after its archive is checked to hold nothing that loads by
  unpickling (torch.export.load unpickles with weights_only=False) or by evaluating text: raw
  tensor bytes, JSON, example inputs that load with torch.load(weights_only=True), calls of torch
  operators (and size arithmetic) only, and symbolic shapes (which torch parses with
  sympy.sympify, and whose guards `module()` executes) only in a grammar of size arithmetic
  (`pt2_check`); `save` checks what it wrote the same way, so what it saves loads;
- a target's files are data for its runtime's reader, unless it declares them native code (TVM's
  library): loading those runs them, so `load` loads them only with `trust_native_code=True`.
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

from .dynamic_shapes import export as export_with_dynamic_dims
from .dynamic_shapes import symbol_range
from .errors import ArtifactError, first_line
from .pt2_check import check_pt2, load_checked

log = logging.getLogger(__name__)

FORMAT = "edgepasses-artifact"
FORMAT_VERSION = 2        # 2: the target's files under <target>/ and its data in `target_info`
MANIFEST = "manifest.json"
GRAPH = "graph.pt2"


@dataclass
class Artifact:
    """What `load` returns. `program` runs the target's stored program (None when there is none, or
    it cannot run here: `notes` says why); `graph` is the saved graph as a module (`exported.module()`)."""
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
         target_artifact: bool | str = True, program: Any = None, artifact_options: dict | None = None,
         extra: dict | None = None) -> Path:
    """Save `gm_or_lowered` under the directory `path` (created; an existing artifact there is replaced
    atomically: it stays as it was if anything fails).

    `gm_or_lowered`: what `compress` returned, or a whole-graph program `lower` returned that keeps
    its source (`exported`: OpenVINO's). `example_inputs` default to zeros shaped like the graph's
    placeholders (`meta["val"]`). `program`: what `lower` returned for this graph, so the target's
    build is written rather than made again. `target_artifact`: True stores `program` where its
    target can (OpenVINO, TVM), else the first `auto` target that converts the graph alone
    (OpenVINO, when installed; a WARNING and the graph alone where it does not convert); a target
    name requires that target's program; False saves the graph alone. `artifact_options`: keywords
    of the target's `save_program` (openvino: `compress_to_fp16`). `extra`: JSON-able data kept in
    the manifest.
    """
    path = Path(path)
    _check_replaceable(path)
    exported, given, gm = _sources(gm_or_lowered, example_inputs)
    program = program if program is not None else given
    target = _artifact_target(target_artifact, program)
    _check_data_only(exported)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)  # the umask's mode, as a directory the user made
    try:
        _write(tmp, exported, gm, target, program, isinstance(target_artifact, str), artifact_options or {}, extra)
        _fsync_tree(tmp)
        _move_into_place(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, ArtifactError):  # disk full, permissions, ...
            raise ArtifactError(f"save: could not write {path} ({first_line(exc)}); an artifact that was there "
                                f"is unchanged") from exc
        raise
    return path


def _artifact_target(choice: bool | str, program: Any):
    """The target whose program `save` stores (None: the graph alone); see `save`'s `target_artifact`."""
    from .backends import auto_order, make_target, saving_target, target_names

    if choice is False:
        return None
    if choice is True:
        own = saving_target(program) if program is not None else None
        converters = (make_target(name) for name in auto_order())
        return own or next((t for t in converters
                            if t.artifact_files and t.can_save(None) and not t.unavailable_reason()), None)
    if not (isinstance(choice, str) and _stored_files(choice)):
        storing = [n for n in target_names() if _stored_files(n)]
        raise ArtifactError(f"save: target_artifact must be True, False or a target that stores its program "
                            f"({', '.join(storing)}); got {choice!r}")
    target = make_target(choice)
    reason = target.unavailable_reason()
    if reason:
        raise ArtifactError(f"save: target_artifact={choice!r} cannot be written here: {reason}")
    if not target.can_save(program):
        raise ArtifactError(f"save: target_artifact={choice!r} needs program=<what lower(gm, ..., "
                            f"target={choice!r}) returned for the whole graph>; got {type(program).__name__}")
    return target


def _check_replaceable(path: Path) -> None:
    if path.is_symlink():
        raise ArtifactError(f"save: {path} is a symbolic link; save to the directory it points to")
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).exists())):
        raise ArtifactError(f"save: {path} exists and is not an edgepasses artifact directory; refusing to "
                            f"write into it")


def _check_data_only(exported: torch.export.ExportedProgram) -> None:
    """What torch.export.save would pickle (tensor subclasses, script or opaque objects), load refuses;
    refuse it here, where the graph was made."""
    for kind, values in (("weight", exported.state_dict), ("constant", exported.constants)):
        for name, value in values.items():
            if type(value) not in (torch.Tensor, torch.nn.Parameter):
                raise ArtifactError(f"save: {kind} {name!r} is a {type(value).__name__}, which torch.export "
                                    f"stores pickled; artifacts hold plain tensors only, so that loading runs "
                                    f"no code")


def _save_graph(exported: torch.export.ExportedProgram, file: Path) -> None:
    """torch.export.save, then load's own check of the bytes written (symbolic shapes in its grammar):
    an artifact that would not load is an error here, where the graph was made."""
    torch.export.save(exported, file)
    try:
        check_pt2(file.read_bytes(), file)
    except ArtifactError as exc:
        raise ArtifactError(f"save: the graph would not load back ({str(exc).removeprefix('load: ')}); save it "
                            f"with static shapes (no dynamic dims)") from exc


def _write(folder: Path, exported, gm, target, program, required: bool, artifact_options: dict,
           extra: dict | None) -> None:
    """The graph, the target's program and the manifest, into `folder`."""
    _save_graph(exported, folder / GRAPH)
    info = _write_program(folder, target, exported, program, required, artifact_options) if target else None
    target_files = [f"{target.name}/{name}" for name in target.artifact_files] if info is not None else []
    report = getattr(gm, "edge_report", None) if gm is not None else None
    pipeline = getattr(report, "pipeline", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edgepasses_version": _edgepasses_version(),
        "torch_version": torch.__version__,
        "pipeline": pipeline,
        "pipeline_uuid": _pipeline_uuid(pipeline),
        "report": _jsonable(report.to_dict()) if hasattr(report, "to_dict") else None,
        "target": target.name if info is not None else None,
        "target_info": _jsonable(info),
        "inputs": [_input_record(v) for v in _user_input_vals(exported)],
        "files": {name: _sha256(folder / name) for name in [GRAPH, *target_files]},
        "extra": _jsonable(extra),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _input_record(val: torch.Tensor) -> dict[str, Any]:
    """An input's shape (a dynamic dim as its symbol: ["s31", 3, 8, 8]), dtype, and each dynamic dim's range."""
    symbolic = {d: s for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt)}
    record = {"shape": [str(s) if d in symbolic else int(s) for d, s in enumerate(val.shape)],
              "dtype": str(val.dtype).removeprefix("torch.")}
    if symbolic:
        record["dynamic"] = {str(d): list(symbol_range(s)) for d, s in symbolic.items()}
    return record


def _write_program(folder: Path, target, exported, program, required: bool, options: dict) -> dict | None:
    """The target writes its files into `<folder>/<name>/`: exactly those it declares, or an error."""
    own = folder / target.name
    own.mkdir()
    try:
        info = target.save_program(own, exported, program, required=required, **options)
    except TypeError as exc:
        if not options:
            raise
        raise ArtifactError(f"save: artifact_options {sorted(options)} for target {target.name!r}: {exc}") from exc
    if info is None:  # it could not, and was not required to: the graph alone
        shutil.rmtree(own)
        return None
    written = _files_in(own)
    if written != set(target.artifact_files):
        raise ArtifactError(f"save: target {target.name!r} wrote {sorted(written)}, but declares "
                            f"{sorted(target.artifact_files)} (a bug in the target)")
    return info


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
    """Check and load the artifact at `path` (see the module docstring); `precision` is the inference
    precision of `.program` (OpenVINO: f32 or bf16); `program=False` skips compiling or loading it;
    `cache_dir` is the target's own compiled-model cache (OpenVINO's CACHE_DIR). `trust_native_code=True`
    loads a program that is native code (TVM's library), which runs it: only for artifacts whose writer
    you trust (else `.program` is None)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    _warn_on_another_torch(path, manifest)
    exported = load_graph(path / GRAPH, manifest["files"][GRAPH])
    artifact = Artifact(path, manifest, exported.module(), exported)
    if program and manifest["target"] is not None:
        artifact.program = _load_program(path, manifest, exported, precision, cache_dir, trust_native_code,
                                         artifact.notes)
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
    target = manifest.get("target")
    if target is not None and not (isinstance(target, str) and _stored_files(target)):
        raise ArtifactError(f"load: {manifest_path} names target {target!r}, which is not a target registered "
                            f"here that stores programs (a plugin target needs its package installed)")
    if not isinstance(manifest.get("target_info"), dict if target is not None else type(None)):
        raise ArtifactError(f"load: {manifest_path} has no target_info for target {target!r} (corrupt or modified)")
    return manifest


def _stored_files(target: str) -> set[str]:
    """The files an artifact of `target` holds besides the graph (empty: not a target that stores any)."""
    from .backends import make_target, target_names

    if target not in target_names() or target == "auto":
        return set()
    return {f"{target}/{name}" for name in make_target(target).artifact_files}


def native_code(manifest: dict[str, Any]) -> bool:
    """Whether the artifact's program is native code (loading it runs it)."""
    from .backends import make_target

    return manifest["target"] is not None and make_target(manifest["target"]).native_code


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest names exactly its target's files, inside `path`; `path` holds exactly those (regular
    files, no links); each has its SHA-256. Names are checked before any file is touched."""
    listed = set(manifest["files"])
    for name in sorted(listed):
        _check_name(path, name)
    expected = {GRAPH} | (_stored_files(manifest["target"]) if manifest["target"] is not None else set())
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


# --- the target's program ---------------------------------------------------------------------

def _load_program(path: Path, manifest: dict[str, Any], exported, precision: str, cache_dir: str | None,
                  trust_native_code: bool, notes: list[str]) -> Callable | None:
    """The target's stored program, or None (with a note) where it cannot or may not run here."""
    from .backends import make_target

    target = make_target(manifest["target"])
    if target.native_code and not trust_native_code:  # loading a shared library runs its initialisers
        notes.append(f"{target.name}/ is native code and loading it runs it: .program is None (load(..., "
                     "trust_native_code=True) if you trust who wrote this artifact, or lower() the graph again)")
        log.warning("load: %s", notes[-1])
        return None
    reason = target.unavailable_reason()
    if reason:
        notes.append(f"target {target.name!r} cannot run here, so .program is None: {reason}")
        return None
    return target.load_program(path / target.name, manifest["target_info"], exported, precision=precision,
                               cache_dir=cache_dir, notes=notes)


def _sources(obj: Any, example_inputs: tuple | None):
    """(exported program, the lowered program or None, the compressed graph or None) of what save was given."""
    if isinstance(obj, torch.fx.GraphModule) and not hasattr(obj, "edge_lowering"):
        args, kwargs = _example_args(obj, example_inputs)
        for module in obj.modules():  # the graph is fixed already; torchao's convert_pt2e forbids .eval()
            module.training = False
        try:
            exported = _export(obj, args, kwargs)
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"save: torch.export could not capture the graph: {exc}") from exc
        return exported, None, obj
    from .backends import saving_target

    exported = getattr(obj, "exported", None)
    if isinstance(exported, torch.export.ExportedProgram) and saving_target(obj) is not None:
        return exported, obj, getattr(obj, "source_graph", None)
    raise ArtifactError(f"save: {type(obj).__name__} is not a graph from edgepasses.compress, nor a lowered "
                        f"program that keeps its source (`exported`); save the GraphModule that was lowered, "
                        f"with program=<what lower returned>")


def _export(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """The graph exported with its dynamic dims and their ranges (static where it has none)."""
    if not kwargs:
        return export_with_dynamic_dims(gm, args)
    if any(isinstance(s, torch.SymInt) for n in gm.graph.nodes if n.op == "placeholder"
           for s in getattr(n.meta.get("val"), "shape", ())):
        raise ArtifactError("save: a graph with dynamic dims is saved from positional example inputs; pass "
                            "example_inputs as a tuple (keyword inputs keep no dynamic dims)")
    return torch.export.export(gm, args, kwargs)


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
