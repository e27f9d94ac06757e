"""Small helpers every pass shares: reading and adding constants, fake values."""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

aten = torch.ops.aten
# The convolutions torch.export writes for nn.Conv*d; `aten.convolution` (also transposed) only after
# further decomposition, with its own argument layout.
FUNCTIONAL_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                       aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
CONV_OPS = FUNCTIONAL_CONV_OPS | {aten.convolution.default}
LINEAR_OPS = {aten.linear.default}
ACTIVATION_MATMUL_OPS = {aten.matmul.default, aten.bmm.default}


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node | None) -> torch.Tensor | None:
    """The tensor a `get_attr` node reads; None for anything else (including a missing node)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value if isinstance(value, torch.Tensor) else None


def fake_mode_of(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def add_constant(gm: torch.fx.GraphModule, name_hint: str, value: torch.Tensor,
                 *, before: torch.fx.Node) -> torch.fx.Node:
    """Register `value` as a buffer of `gm` under a fresh name and return a `get_attr` node for it."""
    base = name_hint.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    mode = fake_mode_of(gm)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(getattr(gm, name), static_shapes=True)
    return node


def remove_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers no `get_attr` reads and no called submodule owns.
    Returns how many were removed."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}  # e.g. fake-quantizers' state
    removed = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or any(u.startswith(name + ".") for u in used) or \
                any(name.startswith(m + ".") for m in called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
        removed += 1
    return removed


# Under torch.compile, module paths start at Dynamo's name for the root (`L['fn'].layer1.0`, or
# `L['self']._modules['layer1']`): stripped, so names (and ignore lists) match compress()'s.
_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]\.?")
_DYNAMO_SUBMODULE = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")


def module_path(path: str) -> str:
    return _DYNAMO_ROOT.sub("", _DYNAMO_SUBMODULE.sub(r".\1", path))


def layer_name(node: torch.fx.Node) -> str:
    """A unique, readable name: the module path of a conv/linear (e.g. `layer1.0.conv1`); for a matmul,
    which is no module of its own, the enclosing module's path and the node (`layers.0.attention/matmul_1`)."""
    stack = node.meta.get("nn_module_stack")
    path = module_path(list(stack.values())[-1][0]) if stack else ""
    if node.target in ACTIVATION_MATMUL_OPS or not path:
        return f"{path}/{node.name}" if path else node.name
    return path


def replace_arg(gm: torch.fx.GraphModule, node: torch.fx.Node, index: int, new: torch.fx.Node) -> None:
    """Set `node.args[index]` to `new`, erasing the old argument if it was a constant nothing else reads
    (its tensor goes with `remove_unused_attributes`)."""
    old = node.args[index]
    node.update_arg(index, new)
    if isinstance(old, torch.fx.Node) and old.op == "get_attr" and not old.users:
        gm.graph.erase_node(old)


def ignore_matcher(patterns: tuple[str, ...], layers: list[torch.fx.Node], name_of: Callable[[torch.fx.Node], str],
                   *, where: str, kind: str) -> Callable[[torch.fx.Node], bool]:
    """A predicate for the nodes `patterns` name (whole-name regex on `name_of(node)` or the node's name);
    a pattern naming none of `layers` is an OptionError listing them."""
    from .errors import OptionError

    compiled = [re.compile(p) for p in patterns]
    matches = lambda node: any(p.fullmatch(name_of(node)) or p.fullmatch(node.name) for p in compiled)  # noqa: E731
    unmatched = [p.pattern for p in compiled if not any(p.fullmatch(name_of(n)) or p.fullmatch(n.name) for n in layers)]
    if unmatched:
        raise OptionError(f"{where} ignore pattern(s) {', '.join(map(repr, unmatched))} matched no {kind} "
                          f"(patterns must match a whole name); layers: {', '.join(map(name_of, layers))}")
    return matches
