"""The `edge` backend's compile cache: one checked artifact per compile, under `<cache_dir>/compiled/<key>/`.

Opt-in: only `torch.compile(..., options={"cache_dir": ...})` reads or writes it; without
`cache_dir` nothing is written anywhere (never the working directory).

The key is a SHA-256 over everything that changes what a compile produces, so a hit can
never hand back another model's program: the canonical graph's structure (ops, wiring,
shapes, dtypes), its dynamic dims and their ranges, the values of its weights and constants, the pipeline (canonical text and
`Pipeline.uuid()`, which covers every pass's version and options), the calibration tensors'
values, the target list, its `target_options`, precision and strict, the quantizer's view of
the target (`quant_caps`, which reads this CPU), the library versions, and the target's own
`cache_key()` (its runtime's version; for TVM, this CPU).

An entry is an `edgepasses.artifacts` directory (graph.pt2, the target artifact, a manifest
with a SHA-256 per file), written into a temporary sibling and renamed into place, so a killed
compile never leaves half an entry. A dynamic graph's entry keeps its symbolic shapes (the artifact
is exported with its dynamic dims), so a hit serves every input shape in range, not the example's
alone. Entries are read as untrusted data (`artifacts.load`
deserializes nothing that runs code); the one exception is a program that is native code (TVM's
library), loaded only from an entry this user wrote and no one else can write to
(docs/artifacts.md). An entry that does not load, for whatever reason, is one WARNING, removed,
and compiled again.

A whole-graph program its target can store (`Target.can_save`: OpenVINO, TVM) is stored with the
graph: a hit skips the pipeline and the target's build. Other lowerings (the reference target,
partitioned graphs) store the compressed graph: a hit skips the pipeline and lowers that graph
again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import platform
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from . import artifacts
from .dynamic_shapes import describe, dynamic_dims
from .errors import ArtifactError, first_line
from .pipeline import PassRecord, Pipeline, PipelineReport

log = logging.getLogger("edgepasses")

ENTRIES = "compiled"      # <cache_dir>/compiled/<key>/: next to the targets' own caches in cache_dir
KEY_VERSION = 3           # 3: dynamic dims in the key and in entries. Bump when what goes into the key, or what an entry holds, changes
STALE_TMP_S = 3600        # temporary directories older than this belong to a killed compile


def key_parts(canonical: torch.fx.GraphModule, opts: Any, target: Any) -> dict[str, str]:
    """What the key hashes, readable (bulky inputs as their own hashes); kept in each entry's manifest.

    `canonical`: the graph before the pipeline; `opts`: the backend's EdgeOptions; `target`: what
    `get_target` built from them."""
    pipeline = opts.pipeline if opts.pipeline == "auto" else Pipeline.parse(opts.pipeline)  # auto: see backend
    return {
        "key_version": str(KEY_VERSION),
        "graph": graph_hash(canonical),
        "dynamic": describe(dynamic_dims(canonical)),  # a graph with other ranges builds another program
        "weights": weights_hash(canonical),
        "pipeline": str(pipeline),
        "pipeline_uuid": pipeline if isinstance(pipeline, str) else pipeline.uuid(),
        "calibration": calibration_hash(opts.calibration),
        "target": f"{opts.target} -> {target.name}",  # `auto` resolves to what is installed
        "target_options": json.dumps(opts.target_options or {}, sort_keys=True, default=repr),
        "precision": opts.precision,
        "strict": str(opts.strict),
        "quant_caps": repr(getattr(target, "quant_caps", None)),
        "host": platform.machine(),
        "target_key": target.cache_key(),
        "versions": json.dumps(library_versions(), sort_keys=True),
    }


def cache_key(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def graph_hash(gm: torch.fx.GraphModule) -> str:
    """Ops, wiring, shapes and dtypes, node by node (not `gm.code`, whose comments name source lines)."""
    lines = [str(getattr(gm, "_in_spec", None)), str(getattr(gm, "_out_spec", None))]
    for node in gm.graph.nodes:
        lines.append(f"{node.op} {node.name} {node.target} {node.args} {node.kwargs} "
                     f"{_val_text(node.meta.get('val'))}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def weights_hash(gm: torch.fx.GraphModule) -> str:
    """The bytes of every parameter, buffer and tensor constant, by name."""
    values = dict(gm.state_dict(keep_vars=True))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values.setdefault(node.target, operator.attrgetter(node.target)(gm))
    digest = hashlib.sha256()
    for name in sorted(values):
        _update(digest, name, values[name])
    return digest.hexdigest()


def calibration_hash(calibration: Any) -> str:
    """Calibration batches change what `quantize` (and data-aware passes) produce."""
    if calibration is None:
        return "none"
    leaves, spec = pytree.tree_flatten(list(calibration))
    digest = hashlib.sha256(str(spec).encode())
    for index, leaf in enumerate(leaves):
        _update(digest, str(index), leaf)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of what writes an entry (the target's runtime is in its `cache_key`)."""
    return {"edgepasses": artifacts._edgepasses_version(), "torch": torch.__version__,
            "python": platform.python_version()}


def entry_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / ENTRIES / key


def lookup(cache_dir: str | os.PathLike, key: str, target: Any, example_inputs: tuple, *, strict: bool,
           precision: str) -> tuple[Callable, PipelineReport, dict] | None:
    """(program, pipeline report of the compile that stored it, the manifest's `extra`) for `key`, or None
    on a miss.

    An entry that fails in any way (corrupt, modified, crafted, another format, native code
    someone else could have written, a program that does not build) is one WARNING, removed, and
    a miss, so the caller compiles and stores it again: never loaded, never failing forever."""
    path = entry_path(cache_dir, key)
    if not os.path.lexists(path):
        return None
    try:
        return _use_entry(path, cache_dir, key, target, example_inputs, strict=strict, precision=precision)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with an entry, compiling again is the remedy
        log.warning("edge: compile cache entry %s is unusable, so it is removed and the model compiled again: %s",
                    path, first_line(exc))
        _remove_entry(path)
        return None


def _use_entry(path: Path, cache_dir, key: str, target: Any, example_inputs: tuple, *, strict: bool,
               precision: str) -> tuple[Callable, PipelineReport, dict]:
    own = written_by_this_user(path)
    if not own and artifacts.native_code(artifacts.read_manifest(path)):
        raise ArtifactError(f"load: {path} holds native code in a directory that another user owns or can write "
                            f"to; it is not loaded")
    artifact = artifacts.load(path, precision=precision, cache_dir=str(cache_dir), trust_native_code=own)
    extra = artifact.manifest.get("extra") or {}
    if extra.get("cache_key") != key:
        raise ArtifactError(f"load: {path} is not the compile cache entry of key {key}")
    report = _report(artifact.manifest.get("report"))
    if artifact.program is not None:
        artifact.program.edge_lowering = _lowering(extra.get("lowering"), artifact.program)
        return artifact.program, report, extra
    log.info("edge: compile cache entry %s holds the compressed graph; lowering it to %s again (%s)", path,
             target.name, "; ".join(artifact.notes) or "the lowering is not stored as one program")
    lowered = target.lower(artifact.graph, example_inputs, strict=strict, precision=precision,
                           cache_dir=str(cache_dir))
    return lowered, report, extra


def written_by_this_user(path: Path) -> bool:
    """True when `path` and everything under it are this user's and writable by no one else (lstat:
    links are not followed). Only then is native code in it as trusted as code this user built."""
    if not hasattr(os, "getuid"):
        return False
    for folder, dirs, files in os.walk(path):
        for entry in [folder, *(os.path.join(folder, name) for name in dirs + files)]:
            info = os.lstat(entry)
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
                return False
    return os.path.isdir(path) and not os.path.islink(path)


def store(cache_dir: str | os.PathLike, key: str, parts: dict[str, str], compressed: torch.fx.GraphModule,
          lowered: Any, example_inputs: tuple, extra: dict | None = None) -> Path | None:
    """Write the entry for `key` atomically; None (with a WARNING) where it cannot be written. `extra`: more
    of the manifest's `extra` record (JSON), which `lookup` hands back.

    A whole-graph program its target can store is stored with the graph, anything else as the
    compressed graph alone. A failed store never fails the compile: the program runs uncached."""
    from .backends import saving_target

    root = Path(cache_dir) / ENTRIES
    target = saving_target(lowered)
    kind = target.name if target is not None else None
    extra = {**(extra or {}), "cache_key": key, "key_parts": parts, "program": kind,
             "lowering": _lowering_dict(getattr(lowered, "edge_lowering", None))}
    tmp = root / f".{key[:12]}-{secrets.token_hex(6)}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        artifacts.save(compressed, tmp, example_inputs, target_artifact=kind or False,
                       program=lowered if kind else None, extra=extra)
        _forbid_writes_by_others(tmp)
        os.rename(tmp, root / key)  # atomic; fails when another compile stored the key first
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be written must not fail the compile
        shutil.rmtree(tmp, ignore_errors=True)
        if (root / key).exists():
            return root / key
        log.warning("edge: could not store the compile cache entry %s: %s", root / key, first_line(exc))
        return None
    return root / key


def _forbid_writes_by_others(path: Path) -> None:
    """Group and others lose write permission on the entry (whatever the umask), so that
    `written_by_this_user` holds for it."""
    for folder, _, files in os.walk(path):
        for entry in [folder, *(os.path.join(folder, name) for name in files)]:
            os.chmod(entry, stat.S_IMODE(os.lstat(entry).st_mode) & ~0o022)


def _remove_entry(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _lowering_dict(lowering: Any) -> dict | None:
    if lowering is None:
        return None
    from dataclasses import asdict

    return asdict(lowering)


def _lowering(record: Any, program: Any):
    """The stored Lowering of a whole-graph program, with the precision the loaded program runs."""
    from .backends import Lowering
    from .backends.chain import Placement

    try:
        lowering = Lowering(**{**record, "fallbacks": [], "placements": []})
        lowering.placements = [Placement(**p) for p in record["placements"]]
    except (TypeError, KeyError) as exc:
        raise ArtifactError(f"load: the entry's lowering record is missing or malformed: {exc}") from exc
    lowering.precision = getattr(program, "precision", lowering.precision)
    return lowering


def _report(record: Any) -> PipelineReport:
    try:
        return PipelineReport(record["pipeline"], [PassRecord(**r) for r in record["records"]])
    except (TypeError, KeyError) as exc:
        raise ArtifactError(f"load: the entry's pipeline report is missing or malformed: {exc}") from exc


def _remove_stale_tmp(root: Path) -> None:
    """Temporary directories a killed compile left (never read as entries; only disk space)."""
    for tmp in root.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def _val_text(val: Any) -> str:
    leaves = pytree.tree_leaves(val)
    return repr([(tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else repr(v) for v in leaves])


def _update(digest, name: str, value: Any) -> None:
    """Hash a named value: a tensor's shape, dtype and bytes; anything else by repr (an object whose
    repr holds its address then never matches: a miss, never a wrong hit)."""
    if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        digest.update(f"{name} {type(value).__qualname__} {value!r}\n".encode())
        return
    tensor = value.detach().cpu().contiguous()
    digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
    try:
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    except (RuntimeError, TypeError):  # quantized, sparse, ...: their saved form
        import io

        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        digest.update(buffer.getvalue())
