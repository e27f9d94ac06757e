"""Small helpers every pass shares: reading and adding constants, fake values, replacing a node by a
call, conv arguments, ignore lists, the weight layers in every form."""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

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
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten.flatten.using_ints}
# Weight layers in forms no pass rewrites; `weight_layers` lists them with the reason.
TRANSPOSED_CONV_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
RECURRENT_OPS = {aten.lstm.input, aten.gru.input, aten.rnn_tanh.input, aten.rnn_relu.input}
MATMUL_FAMILY_OPS = {aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
                     aten.baddbmm.default, aten.einsum.default}
# node.meta key marking a layer whose weight is 2:4 sparse: sparsify_24 sets it, lowerings and training read it.
SPARSE24 = "sparse24"


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


def drop_export_guards(gm: torch.fx.GraphModule) -> None:
    """Remove torch.export's input check (`_guards_fn`) from an unlifted module."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


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


def replace_with_call(gm: torch.fx.GraphModule, node: torch.fx.Node, op, args: tuple) -> torch.fx.Node:
    """Put `op(*args)` where `node` was: the call takes its meta (value, source) and its readers, and
    `node` is erased."""
    with gm.graph.inserting_before(node):
        call = gm.graph.call_function(op, args)
    call.meta = {**node.meta}
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def optional_arg(node: torch.fx.Node, index: int):
    """`node.args[index]`, None where the call leaves it out (a linear's or conv's bias)."""
    return node.args[index] if len(node.args) > index else None


def inputs_have_values(inputs: tuple) -> bool:
    """Example inputs hold values (under torch.compile Dynamo may hand fake tensors, which have none)
    that can score SQNR (NaN/Inf there is no calibration data to refuse: the stats are just skipped)."""
    return all(not isinstance(x, FakeTensor) and _finite(x) for x in inputs)


def _finite(x) -> bool:
    return not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(torch.isfinite(x).all())


# ------------------------------------------------------------------ conv arguments

@dataclass(frozen=True)
class ConvArgs:
    """A conv node's arguments with keywords and defaults filled in; stride, padding and dilation have
    one entry per spatial dim (padding is 'same' or 'valid' where the `.padding` overload names it)."""
    input: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    stride: list[int]
    padding: list[int] | str
    dilation: list[int]
    groups: int
    transposed: bool = False


_FUNCTIONAL_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                       "groups")


def conv_args(node: torch.fx.Node) -> ConvArgs:
    """The arguments of a node in CONV_OPS (`aten.conv{1,2,3}d`, their `.padding` overloads,
    `aten.convolution`)."""
    names = _CONVOLUTION_PARAMS if node.target is aten.convolution.default else _FUNCTIONAL_CONV_PARAMS
    defaults = {"bias": None, "stride": 1, "padding": "valid" if node.target._overloadname == "padding" else 0,
                "dilation": 1, "groups": 1, "transposed": False}
    given = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    dims = len(given["stride"]) if node.target is aten.convolution.default else int(node.target._opname[4])

    def per_dim(value):
        values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
        return values * dims if len(values) == 1 else values

    padding = given["padding"] if isinstance(given["padding"], str) else per_dim(given["padding"])
    return ConvArgs(given["input"], given["weight"], given["bias"], per_dim(given["stride"]), padding,
                    per_dim(given["dilation"]), int(given["groups"]), bool(given["transposed"]))


# ------------------------------------------------------------------ ignore lists

def ignore_matcher(patterns: tuple[str, ...], layers: list[torch.fx.Node],
                   name_of: Callable[[torch.fx.Node], str] = layer_name, *, where: str, kind: str,
                   option: str = "ignore") -> Callable[[torch.fx.Node], bool]:
    """A predicate for the nodes `patterns` name (whole-name regex on `name_of(node)` or the node's name);
    a pattern naming none of `layers` is an OptionError listing them (`where`, `option`: the option's
    owner and name; `kind`: what the layers are)."""
    from .errors import OptionError

    compiled = [re.compile(p) for p in patterns]
    matches = lambda node: any(p.fullmatch(name_of(node)) or p.fullmatch(node.name) for p in compiled)  # noqa: E731
    unmatched = [p.pattern for p in compiled if not any(p.fullmatch(name_of(n)) or p.fullmatch(n.name) for n in layers)]
    if unmatched:
        raise OptionError(f"{where} {option} pattern(s) {', '.join(map(repr, unmatched))} matched no {kind} "
                          f"(patterns must match a whole name); layers: {', '.join(map(name_of, layers)) or 'none'}")
    return matches


def weight_layer_ignore(gm: torch.fx.GraphModule, patterns: tuple[str, ...], *, where: str) -> Callable[[torch.fx.Node], bool]:
    """`ignore_matcher` over every weight layer (`weight_layers`), the layers a pass's ignore list names."""
    return ignore_matcher(patterns, [layer.node for layer in weight_layers(gm)], where=where, kind="Linear or conv")


# ------------------------------------------------------------------ weight layers in every form

@dataclass(frozen=True)
class WeightLayer:
    """An op that applies a constant weight (or a Linear/conv whose weight is computed)."""
    node: torch.fx.Node
    name: str                  # layer_name(node)
    form: str                  # the op: linear, conv2d, conv_transpose2d, bmm, lstm, ...
    unreachable: str | None    # why no pass can rewrite it; None: a Linear/conv with a constant weight


def _form(node: torch.fx.Node) -> str:
    if node.target is aten.convolution.default:
        return "conv_transpose" if conv_args(node).transposed else "convolution"
    return getattr(node.target, "_opname", str(node.target))


def _tensor_args(node: torch.fx.Node) -> list:
    return list(node.args[1]) if node.target is aten.einsum.default else list(node.args[:3])


def _unreachable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None | bool:
    """Why a weight-applying node cannot be rewritten; None where passes can; False: not a weight layer."""
    target = node.target
    if target in TRANSPOSED_CONV_OPS or (target is aten.convolution.default and conv_args(node).transposed):
        return "transposed convolution"
    if target in LINEAR_OPS | CONV_OPS:
        return None if constant_value(gm, node.args[1]) is not None else \
            "weight is not a constant in the graph (an input, or computed as by weight norm): nothing to rewrite"
    if target in RECURRENT_OPS:
        return f"recurrent layer: its weights stay inside one fused aten.{_form(node)} op"
    if target in MATMUL_FAMILY_OPS:
        constants = [constant_value(gm, a) for a in _tensor_args(node)]
        if not any(c is not None for c in constants):
            return False  # activations only (attention): not a weight layer
        if target is aten.einsum.default:
            return "einsum with a constant operand: write it as x @ W or an nn.Linear to reach it"
        if target is aten.addmm.default:
            return "addmm whose bias is not a constant vector or that scales by alpha/beta: no Linear form"
        weight = constants[1]
        if weight is None:
            return "constant on the left (W @ x): no Linear form"
        return f"matmul by a constant {weight.dim()}-D weight (one per batch entry): no Linear form"
    return False


def weight_layers(gm: torch.fx.GraphModule) -> list[WeightLayer]:
    """Every layer applying a weight, in any form, with why no pass can reach it where none can.
    After canonicalization (`canonical_forms`) the reachable ones are `aten.linear` and the convs."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        reason = _unreachable(gm, node)
        if reason is not False:
            found.append(WeightLayer(node, layer_name(node), _form(node), reason))
    return found


def skipped_forms(layers: list[WeightLayer], skipped: dict[str, str]) -> str:
    """The skipped layers by form and reason: `2 conv_transpose2d (transposed convolution); 1 linear (...)`."""
    forms = {layer.name: layer.form for layer in layers}
    counts = Counter((forms.get(name, "layer"), reason) for name, reason in skipped.items())
    return "; ".join(f"{n} {form} ({reason})" for (form, reason), n in counts.most_common())


def warn_nothing_reached(log, pass_name: str, done: str, layers: list[WeightLayer], skipped: dict[str, str]) -> None:
    """The one WARNING of a pass that changed no layer: the forms it saw and why it skipped each."""
    if not layers:
        log.warning("%s: the graph has no Linear or conv layer in any form; nothing was %s", pass_name, done)
    else:
        log.warning("%s: no layer was %s; of %d layers with weights it skipped %s", pass_name, done,
                    len(layers), skipped_forms(layers, skipped) or "none (each was left as it is)")


def copy_sharing_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose graph can change apart from `gm`'s while its weight tensors stay shared:
    a model's worth of weights per trial copy would not fit in memory. Passes never write into a
    weight tensor, they add new ones."""
    import copy
    import itertools

    shared = {id(t): t for t in itertools.chain(gm.parameters(), gm.buffers())}
    return copy.deepcopy(gm, shared)


def readers_through_reshapes(node: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(reader, the value it reads) for every user reached from `node` through reshapes alone."""
    found = []
    for user in node.users:
        if user.op == "call_function" and user.target in RESHAPE_OPS:
            found += readers_through_reshapes(user)
        else:
            found.append((user, node))
    return found


def through_reshapes(node):
    """The value `node` reshapes, through any chain of reshapes (a classifier's flatten)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in RESHAPE_OPS:
        node = node.args[0]
    return node


@contextlib.contextmanager
def dynamo_caches_kept() -> Iterator[None]:
    """Passes run with `torch._dynamo.reset` as a no-op. torch.export(strict=True) starts with that reset,
    which drops the compiled code of every torch.compile'd model in the process, the one being compiled
    included: it would recompile, and recalibrate, on every call. torchao's convert_pt2e did so for its
    QAT conv-bn patterns whenever a BatchNorm was left (DenseNet); `quant.quantizer.convert` now skips
    that step, and this keeps any other strict export (a registered pass's, a peer's) harmless."""
    import torch._dynamo

    reset = torch._dynamo.reset
    torch._dynamo.reset = lambda: None
    try:
        yield
    finally:
        torch._dynamo.reset = reset
