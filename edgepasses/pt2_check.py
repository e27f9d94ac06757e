"""Is a torch.export archive (.pt2) data only? `torch.export.load` unpickles weights with
weights_only=False, unpickles opaque constants, retries example inputs with weights_only=False,
evaluates symbolic shapes with sympy.sympify and resolves call targets by name, and
`ExportedProgram.module()` executes the shape guards' Python text (`guards_code`): each a way for a
crafted file to run code. These checks refuse all of them before and after deserializing
(docs/artifacts.md). Symbolic shapes are data when every expression fits a size-arithmetic grammar
(`check_sym_expr`, `check_guard`), which is checked on the JSON before torch reads any of it.
"""
from __future__ import annotations

import ast
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
# Python's integer arithmetic on sizes (a dynamic graph computes a view's size from sym_size): pure functions.
_SIZE_ARITHMETIC = {f"_operator.{op.__name__}": op for op in (
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)}
_SIZE_ARITHMETIC.update({"torch.sym_max": torch.sym_max, "torch.sym_min": torch.sym_min})
_OP_TARGET = re.compile(r"torch\.ops\.\w+\.\w+(\.\w+)?|_operator\.getitem|"
                        + "|".join(map(re.escape, _SIZE_ARITHMETIC)))

# --- the grammar of symbolic shapes -----------------------------------------------------------
# Expressions are sympy's printed form (srepr: `Mul(Integer(2), Symbol('s31', positive=True,
# integer=True))`) or plain arithmetic (`2*s31 + 1`); guards are the Python torch writes for them
# (`L['x'].size()[0] <= 64`). Both are parsed with `ast` (which evaluates nothing) and every node must
# be one of these; torch only sees text that passed.
_SYMBOL = re.compile(r"[su]\d{1,9}")  # torch's size symbols: backed (s) and unbacked (u)
_SYMBOL_ASSUMPTIONS = frozenset({"integer", "positive", "nonnegative"})
_SYMPY_FUNCTIONS = frozenset({  # the classes shape arithmetic produces (torch.utils._sympy.functions and sympy's)
    "Add", "Mul", "Max", "Min", "FloorDiv", "CleanDiv", "Mod", "PythonMod", "CeilToInt", "FloorToInt",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan"})
_MAX_POWER = 8            # Pow(s, n): a square or cube of a size; a huge n would only make sympy work hard
_MAX_EXPR_CHARS = 20_000
_MAX_DEPTH = 200          # nesting torch never writes; deeper trees would reach the recursion limit when walked
_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_SIZE_METHODS = frozenset({"size", "stride"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")  # an input's name in a guard's `L['x']`


def check_sym_expr(text: Any) -> bool:
    """Whether `text` is a size expression: symbols, integers, + - * // %, and `_SYMPY_FUNCTIONS`."""
    return _fits(text, _is_sym_expr)


def check_guard(text: Any) -> bool:
    """Whether `text` is a shape guard: comparisons (and/or/not) of integer arithmetic on inputs' sizes."""
    return _fits(text, _is_guard)


def _fits(text: Any, grammar) -> bool:
    """Whether `text` parses (as a Python expression, evaluating nothing) into a tree `grammar` accepts."""
    if not isinstance(text, str) or len(text) > _MAX_EXPR_CHARS or not text.isascii():
        return False
    try:
        tree = ast.parse(text, mode="eval").body
        return _depth(tree) <= _MAX_DEPTH and grammar(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # too deep to parse, or to walk: not a shape
        return False


def _depth(tree: ast.AST) -> int:
    """How deep `tree` nests, found without recursion (the grammar's own walk recurses)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _is_int(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def _is_sym_expr(node: ast.AST) -> bool:
    if _is_int(node):
        return True
    if isinstance(node, ast.Name):
        return bool(_SYMBOL.fullmatch(node.id))
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub) and _is_sym_expr(node.operand)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITHMETIC) and _is_sym_expr(node.left) and _is_sym_expr(node.right)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return False
    name, args = node.func.id, node.args
    if name == "Symbol":
        return (len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                and bool(_SYMBOL.fullmatch(args[0].value))
                and all(k.arg in _SYMBOL_ASSUMPTIONS and isinstance(k.value, ast.Constant)
                        and type(k.value.value) is bool for k in node.keywords))
    if node.keywords:
        return False
    if name == "Integer":
        return len(args) == 1 and _is_int(args[0])
    if name == "Pow":
        return (len(args) == 2 and _is_sym_expr(args[0]) and isinstance(args[1], ast.Call)
                and isinstance(args[1].func, ast.Name) and args[1].func.id == "Integer" and len(args[1].args) == 1
                and isinstance(args[1].args[0], ast.Constant) and args[1].args[0].value in range(2, _MAX_POWER + 1))
    return name in _SYMPY_FUNCTIONS and bool(args) and all(map(_is_sym_expr, args))


def _is_guard(node: ast.AST) -> bool:
    if isinstance(node, ast.BoolOp):
        return all(map(_is_guard, node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _is_guard(node.operand)
    if isinstance(node, ast.Compare):
        return (all(isinstance(op, _COMPARISONS) for op in node.ops)
                and all(map(_is_size_arithmetic, [node.left, *node.comparators])))
    return False


def _is_size_arithmetic(node: ast.AST) -> bool:
    if _is_int(node) or _is_size_of_input(node):
        return True
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, ast.USub) and _is_size_arithmetic(node.operand)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITHMETIC) and _is_size_arithmetic(node.left) and _is_size_arithmetic(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
        return not node.keywords and len(node.args) >= 2 and all(map(_is_size_arithmetic, node.args))
    return False


def _is_size_of_input(node: ast.AST) -> bool:
    """`L['x'].size()[1]` (or `.stride()[1]`), `L['x']` possibly indexed further (`L['args'][0]`)."""
    if not (isinstance(node, ast.Subscript) and _is_int(node.slice) and isinstance(node.value, ast.Call)):
        return False
    call = node.value
    return (not call.args and not call.keywords and isinstance(call.func, ast.Attribute)
            and call.func.attr in _SIZE_METHODS and _is_input(call.func.value))


def _is_input(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id == "L"
    if not isinstance(node, ast.Subscript) or not isinstance(node.slice, ast.Constant):
        return False
    key = node.slice.value
    return (type(key) is int or (isinstance(key, str) and bool(_NAME.fullmatch(key)))) and _is_input(node.value)


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
    """Symbolic shapes only in the grammar above (torch evaluates them as Python) and only torch operators
    (and size arithmetic) as calls; returns the operators' names."""
    if not isinstance(model, dict):
        raise ArtifactError(f"load: {file}'s models/model.json is not a serialized exported program (corrupt or "
                            f"modified)")
    _check_shape_records(model, file)
    targets: set[str] = set()
    for item in _dicts(model):
        if "expr_str" in item and not check_sym_expr(item["expr_str"]):
            raise _code_in_shapes(file, "symbolic shape expression", item["expr_str"])
        if {"target", "inputs", "outputs"} <= item.keys():
            targets.add(str(item["target"]))
        if "as_operator" in item:  # an operator passed as an argument (to a higher-order op)
            targets.add(str(item["as_operator"]))
    for target in sorted(targets):
        if not _OP_TARGET.fullmatch(target):
            raise ArtifactError(f"load: {file} calls {target!r}, which is not a torch operator: not loaded")
    return targets


def _check_shape_records(model: dict, file: Path) -> None:
    """The guards (Python that `module()` executes) and the range of each symbol (names and integers)."""
    guards = model.get("guards_code", [])
    if not isinstance(guards, list):
        raise _code_in_shapes(file, "shape guard list", guards)
    for guard in guards:
        if not check_guard(guard):
            raise _code_in_shapes(file, "shape guard", guard)
    ranges = model.get("range_constraints", {})
    if not isinstance(ranges, dict):
        raise _code_in_shapes(file, "range constraint list", ranges)
    for symbol, bounds in ranges.items():
        if not (_SYMBOL.fullmatch(symbol) and isinstance(bounds, dict) and set(bounds) <= {"min_val", "max_val"}
                and all(v is None or type(v) is int for v in bounds.values())):
            raise _code_in_shapes(file, "range constraint", f"{symbol}: {bounds}")


def _code_in_shapes(file: Path, what: str, text: Any) -> ArtifactError:
    shown = repr(text) if len(repr(text)) <= 50 else repr(text)[:47] + "..."
    return ArtifactError(f"load: {file} holds the {what} {shown}, which is not size arithmetic (torch would "
                         f"run it as Python): not loaded")


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
    return (isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) or target is operator.getitem
            or any(target is op for op in _SIZE_ARITHMETIC.values()))
