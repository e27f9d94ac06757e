"""`save` / `load`: a compressed graph and its target's artifact in one checked directory.

    path/graph.pt2             torch.export.save of torch.export.export(gm, example_inputs)
    path/openvino/model.xml    openvino.save_model of the converted graph (weights full precision
    path/openvino/model.bin      unless compress_to_fp16=True)
    path/tvm/model.so          or: the Relax VM executable of a TVM program (`export_library`),
                                 machine code for the CPU it was built on (`tvm_mcpu`)
    path/manifest.json         format version, the edgepasses/torch/openvino/tvm versions that wrote it,
                               the pipeline (text and uuid), the target, the inputs, a SHA-256 per file,
                               and `extra` (what the caller keeps there: the compile cache's key)

At most one target artifact is there (none for a graph-only artifact). `load` refuses an
unknown format version, a missing file, and a file whose hash differs (corrupt or modified),
each with an `ArtifactError` naming it; a torch of another major.minor than the one that
saved the graph gets a WARNING. It returns the graph as a module and, when the target
artifact's runtime imports, a program that runs it: OpenVINO's model compiled again, or
TVM's library loaded into a Relax VM (only on a CPU of the same `mcpu`: loading a library
runs its code, so load artifacts you trust, as with any pickle).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import ArtifactError

log = logging.getLogger(__name__)

FORMAT = "edgepasses-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.pt2"
OPENVINO_XML = "openvino/model.xml"
OPENVINO_BIN = "openvino/model.bin"
TVM_LIB = "tvm/model.so"
TARGET_FILES = (OPENVINO_XML, OPENVINO_BIN, TVM_LIB)


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


def save(gm_or_lowered: Any, path: str | os.PathLike, example_inputs: tuple | None = None, *,
         target_artifact: bool | str = True, compress_to_fp16: bool = False, program: Any = None,
         extra: dict | None = None) -> Path:
    """Save `gm_or_lowered` under the directory `path` (created; an existing artifact there is replaced).

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
    tvm_executable = getattr(program, "executable", None)
    if target_artifact == "tvm" and tvm_executable is None:
        raise ArtifactError("save: target_artifact='tvm' needs program=<the TVMProgram lower() returned for the "
                            "graph>: the library is written from its executable")
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).exists())):
        raise ArtifactError(f"save: {path} exists and is not an edgepasses artifact directory; refusing to "
                            f"write into it")
    exported, ov_model, gm = _sources(gm_or_lowered, example_inputs)
    ov_model = ov_model if ov_model is not None else getattr(program, "ov_model", None)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)  # a half-written directory is never taken for an artifact
    for name in TARGET_FILES:  # no stale target files next to a manifest that does not list them
        (path / name).unlink(missing_ok=True)
    files = [GRAPH]
    torch.export.save(exported, path / GRAPH)

    target, openvino_version, tvm_info = None, _openvino_version(), {}
    if target_artifact in (True, "tvm") and tvm_executable is not None:
        tvm_info = _save_tvm(program, path / TVM_LIB)
        files.append(TVM_LIB)
        target = "tvm"
    elif target_artifact in (True, "openvino"):
        if ov_model is None:
            ov_model = _convert(exported, required=target_artifact == "openvino", openvino_version=openvino_version)
        if ov_model is not None:
            import openvino as ov

            (path / OPENVINO_XML).parent.mkdir(exist_ok=True)
            ov.save_model(ov_model, str(path / OPENVINO_XML), compress_to_fp16=compress_to_fp16)
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
        "files": {name: _sha256(path / name) for name in files},
        "extra": _jsonable(extra),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load(path: str | os.PathLike, *, precision: str = "f32", program: bool = True,
         cache_dir: str | None = None) -> Artifact:
    """Check and load the artifact at `path` (see the module docstring); `precision` is the OpenVINO
    inference precision of `.program` (TVM runs f32); `program=False` skips compiling or loading it;
    `cache_dir` is OpenVINO's compiled-model cache (CACHE_DIR)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    saved_torch, ours = manifest.get("torch_version", "?"), torch.__version__
    if _major_minor(saved_torch) != _major_minor(ours):
        log.warning("load: %s was saved with torch %s and is loaded with torch %s; torch.export's format "
                    "may differ between versions", path, saved_torch, ours)
    _register_quantized_ops()
    try:
        exported = torch.export.load(path / GRAPH)
    except Exception as exc:
        raise ArtifactError(f"load: {path / GRAPH} could not be deserialized (an op it uses may need its "
                            f"library imported first): {exc}") from exc
    artifact = Artifact(path, manifest, exported.module(), exported)
    if manifest.get("target") == "openvino" and program:
        try:
            import openvino as ov
        except ImportError:
            artifact.notes.append("openvino is not installed: .program is None (pip install 'edgepasses[openvino]')")
        else:
            from .backends.openvino import OpenVINOProgram

            ov_model = ov.Core().read_model(str(path / OPENVINO_XML))
            artifact.program = OpenVINOProgram(ov_model, exported, precision, cache_dir)
    elif manifest.get("target") == "tvm" and program:
        artifact.program = _load_tvm(path, manifest, exported, artifact.notes)
    return artifact


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"load: {manifest_path} does not exist: {path} is not an edgepasses artifact "
                            f"(or its save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"load: {manifest_path} is not valid JSON (corrupt or modified): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"load: {manifest_path} is not an edgepasses artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"load: {path} has artifact format version {version!r}; this edgepasses "
                            f"({_edgepasses_version()}) reads format version {FORMAT_VERSION} only")
    if not isinstance(manifest.get("files"), dict) or GRAPH not in manifest["files"]:
        raise ArtifactError(f"load: {manifest_path} lists no {GRAPH} (corrupt or modified)")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists and has its SHA-256."""
    missing = [name for name in manifest["files"] if not (path / name).is_file()]
    if missing:
        raise ArtifactError(f"load: {path} is missing {', '.join(missing)} (listed in its {MANIFEST})")
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise ArtifactError(f"load: {path / name} is corrupt or modified: its SHA-256 differs from the one "
                                f"in {MANIFEST}")


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


def _load_tvm(path: Path, manifest: dict[str, Any], exported, notes: list[str]):
    """A TVMProgram running the saved library, or None (with a note) where it cannot run here."""
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
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for a bad library
        raise ArtifactError(f"load: {path / TVM_LIB} could not be loaded by TVM {tvm.__version__} (saved with "
                            f"{manifest.get('tvm_version')}): {exc}") from exc
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


def _register_quantized_ops() -> None:
    """Q/DQ graphs use `quantized_decomposed` ops, registered by importing their library."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:
        pass


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
    except Exception:  # a pass registered by a plugin that is not imported now: keep the text alone
        return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
