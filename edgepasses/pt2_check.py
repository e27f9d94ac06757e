"""Is a torch.export archive (.pt2) data only? `torch.export.load` unpickles weights with
weights_only=False, unpickles opaque constants, retries example inputs with weights_only=False,
evaluates symbolic shapes with sympy.sympify and resolves call targets by name: each a way for a
crafted file to run code. These checks refuse all of them before and after deserializing
(docs/artifacts.md).
"""
from __future__ import annotations

import io
import json
import operator
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from .errors import ArtifactError, first_line

# What torch.export.save writes for plain tensors (archive root "<name>/"); anything else (pickled
# weights, script/opaque objects, AOTInductor libraries, extra files) is refused by name.
_PT2_ENTRY = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                        r"|models/model\.json|data/sample_inputs/model\.pt"
                        r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                        r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+")
_PT2_PAYLOADS = (("weight", "data/weights/", "model_weights_config.json", "weight_"),
                 ("constant", "data/constants/", "model_constants_config.json", "tensor_"))
_OP_TARGET = re.compile(r"torch\.ops\.\w+\.\w+(\.\w+)?|_operator\.getitem")


def load_checked(data: bytes, file: Path) -> torch.export.ExportedProgram:
    """The exported program in `data` (the bytes of `file`), deserialized only after `check_pt2` found
    nothing but data in them, with every call checked to be a torch operator."""
    import_op_libraries(check_pt2(data, file))
    try:
        exported = torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ArtifactError(f"load: {file} could not be deserialized (an op it uses may need its library "
                            f"imported first): {first_line(exc)}") from exc
    check_calls(exported, file)
    return exported


def check_pt2(data: bytes, file: Path) -> set[str]:
    """Raise unless the .pt2 archive `data` loads without unpickling or evaluating anything; return the
    operator names its graph calls."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"load: {file} is not a torch.export archive (corrupt or modified): {exc}") from exc
    with archive:
        entries = _pt2_entries(archive, file)
        for kind, folder, config, prefix in _PT2_PAYLOADS:
            _check_payloads(_read_json(archive, entries, folder + config, file), kind, prefix, file)
        _check_example_inputs(archive.read(entries["data/sample_inputs/model.pt"]), file)
        return _check_model(_read_json(archive, entries, "models/model.json", file), file)


def _pt2_entries(archive: zipfile.ZipFile, file: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's entries by name below its root folder: one root, no duplicate, only known names."""
    infos = archive.infolist()
    root = infos[0].filename.split("/")[0] + "/" if infos else ""
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename.removeprefix(root)
        if not info.filename.startswith(root) or name in entries or not _PT2_ENTRY.fullmatch(name):
            raise ArtifactError(f"load: {file} holds {info.filename!r}, which a graph saved by edgepasses never "
                                f"holds (pickled data, native code or a crafted archive): not loaded")
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores records uncompressed: no zip bombs
            raise ArtifactError(f"load: {file} holds {info.filename!r} compressed, which torch.export.save never "
                                f"writes (a crafted archive): not loaded")
        entries[name] = info
    required = ["models/model.json", "data/sample_inputs/model.pt"] + [f + c for _, f, c, _ in _PT2_PAYLOADS]
    for name in required:
        if name not in entries:
            raise ArtifactError(f"load: {file} has no {name} (corrupt, or not saved by edgepasses)")
    return entries


def _read_json(archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], name: str, file: Path) -> Any:
    try:
        return json.loads(archive.read(entries[name]))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ArtifactError(f"load: {file}'s {name} is not valid JSON (corrupt or modified)") from exc


def _check_payloads(config: Any, kind: str, prefix: str, file: Path) -> None:
    """Every weight / constant is raw tensor bytes (use_pickle false), never a pickled object."""
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise ArtifactError(f"load: {file}'s {kind} list is malformed (corrupt or modified)")
    for name, meta in items.items():
        raw = isinstance(meta, dict) and meta.get("use_pickle") is False
        if not raw or not re.fullmatch(re.escape(prefix) + r"\d+", str(meta.get("path_name"))):
            raise ArtifactError(f"load: {file} stores {kind} {name!r} as a pickled object, which loading would "
                                f"run as code: not loaded (artifacts hold raw tensors only)")


def _check_example_inputs(data: bytes, file: Path) -> None:
    """torch.export.load retries its example inputs with weights_only=False when weights_only=True fails:
    they must load with weights_only=True here, so that the retry never happens."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"load: {file}'s example inputs are not plain tensors (torch.load with "
                            f"weights_only=True refuses them; the retry would unpickle them): not loaded") from exc


def _check_model(model: Any, file: Path) -> set[str]:
    """No symbolic shape (torch parses those with sympy.sympify, which evaluates Python) and only
    torch operators as calls; returns the operators' names."""
    targets: set[str] = set()
    for item in _dicts(model):
        if "expr_str" in item:
            raise ArtifactError(f"load: {file} holds a symbolic shape expression, which loading would evaluate "
                                f"as Python: not loaded (artifacts hold static shapes only)")
        if {"target", "inputs", "outputs"} <= item.keys():
            targets.add(str(item["target"]))
        if "as_operator" in item:  # an operator passed as an argument (to a higher-order op)
            targets.add(str(item["as_operator"]))
    for target in sorted(targets):
        if not _OP_TARGET.fullmatch(target):
            raise ArtifactError(f"load: {file} calls {target!r}, which is not a torch operator: not loaded")
    return targets


def _dicts(value: Any):
    """Every dict nested in a JSON value."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def import_op_libraries(targets: set[str]) -> None:
    """Register the operator libraries the graph calls that torch does not load by itself: Q/DQ ops
    (`quantized_decomposed`) and our own kernels (`edge::*`)."""
    try:
        import torch.ao.quantization.fx._decomposed  # noqa: F401
    except ImportError:
        pass
    if any(t.startswith("torch.ops.edge.") for t in targets):
        from .kernels import ops  # noqa: F401


def check_calls(exported: torch.export.ExportedProgram, file: Path) -> None:
    """After deserializing: every call is an operator object (a name like torch.ops.load_library resolves
    to a function that would run when the graph runs)."""
    for module in exported.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            for called in [node.target, *_callable_args(node)]:
                if node.op != "call_function" or not _is_operator(called):
                    raise ArtifactError(f"load: {file} calls {called!r} ({node.op}), which is not a torch "
                                        f"operator: not loaded")


def _callable_args(node: torch.fx.Node) -> list:
    """Functions passed as arguments (a higher-order op calls them)."""
    return [leaf for leaf in pytree.tree_leaves((node.args, node.kwargs)) if callable(leaf)]


def _is_operator(target: Any) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or target is operator.getitem
