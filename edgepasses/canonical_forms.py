"""One form per kind of layer, so that every pass reaches every layer (DESIGN.md, canonical form).

`canonical.export_canonical_graph` runs `canonicalize_layers` on the exported graph, after the fused
transformer ops are decomposed (`decompositions.py`):

- a matmul by a constant weight W of shape [in, out] — `addmm(b, x, W)` (transformers' Conv1D, as in
  GPT-2), `mm(x, W)`, `matmul(x, W)` — becomes `aten.linear(x, Wᵀ, b)` with Wᵀ a new constant
  (`x @ W.T` reads W itself). The flattening views Conv1D puts around its addmm are folded, so the
  linear reads [..., in] as an nn.Linear's does;
- `conv1d` (Whisper's encoder) becomes `conv2d` on the input unsqueezed at dim -2, with a kernel of
  height 1, squeezed back after (after a BatchNorm1d that follows, which fold_bn then still folds):
  prune, lowrank, sparsify_24 and quantize handle one conv form. Symmetric `'same'`/`'valid'`
  padding becomes numbers (lowrank rebuilds convs from numeric padding);
- a Linear or conv whose weight belongs to a submodule of the module calling it, or is a differently
  named parameter of it (nn.MultiheadAttention's `out_proj.weight` and `in_proj_weight`, and the
  decomposed fast paths), is named after that weight (`self_attn.out_proj`, `self_attn.in_proj`):
  no two layers share a name, under `compress` and `torch.compile` alike.

Rewritten nodes keep `nn_module_stack` and `stack_trace` (`layer_name` reads the first) and get a
true `meta["val"]`. The rewrites are exact up to float summation order.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.utils._pytree as pytree

from .graph_utils import CONV_OPS, LINEAR_OPS, add_constant, constant_value, conv_args, fake_mode_of, module_path, \
    remove_unused_attributes

aten = torch.ops.aten

SOURCE_META = ("nn_module_stack", "stack_trace")
_MATMULS = {aten.addmm.default, aten.mm.default, aten.matmul.default}
_BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def canonicalize_layers(gm: torch.fx.GraphModule, weight_paths: dict[str, str] | None = None) -> torch.fx.GraphModule:
    """Rewrite `gm` (in place) to the one layer form per kind. `weight_paths` maps `get_attr` targets to
    the weights' paths in the user's model (the same for an exported module; the backend's frozen
    constants have their own names)."""
    name_layers_by_weight(gm, weight_paths or {})
    changed = linears_from_matmuls(gm) + conv2d_from_conv1d(gm) + numeric_conv_padding(gm)
    if changed:
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
    return gm


# ------------------------------------------------------------------ helpers

def _value(gm: torch.fx.GraphModule, node):
    """A node's fake value (a constant's: made from the tensor); other arguments as they are."""
    if not isinstance(node, torch.fx.Node):
        return node
    if "val" not in node.meta:
        tensor, mode = constant_value(gm, node), fake_mode_of(gm)
        if tensor is not None and mode is not None:
            node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node.meta.get("val")


def _call(gm: torch.fx.GraphModule, target, args: tuple, *, like: torch.fx.Node, after: bool = False) -> torch.fx.Node:
    """A new `target(*args)` node before (or after) `like`, with `like`'s source meta and its fake value."""
    with gm.graph.inserting_after(like) if after else gm.graph.inserting_before(like):
        node = gm.graph.create_node("call_function", target, args, name=target.__name__.split(".")[0])
    node.meta.update({k: like.meta[k] for k in SOURCE_META if k in like.meta})
    _refresh_value(gm, node)
    return node


def _refresh_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Recompute `node`'s fake value from its arguments'."""
    mode = fake_mode_of(gm)
    if mode is not None:
        with mode:
            node.meta["val"] = node.target(*pytree.tree_map(lambda a: _value(gm, a), node.args))


# ------------------------------------------------------------------ matmul by a constant -> linear

def _matmul_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple | None:
    """(input, weight, bias or None) of a matmul by a constant 2-D weight the Linear form can take
    (the weight a constant [in, out], or the transpose of a constant [out, in]); else None."""
    if node.target is aten.addmm.default:
        bias, x, weight = node.args[:3]
        bias_value = constant_value(gm, bias)
        out = _value(gm, node)
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or bias_value is None \
                or out is None or tuple(bias_value.shape) != (out.shape[-1],):
            return None  # a bias to broadcast, or scaled: no Linear form
    elif node.target in (aten.mm.default, aten.matmul.default):
        (x, weight), bias = node.args[:2], None
    else:
        return None
    value = constant_value(gm, weight)
    known = (value is not None and value.dim() == 2) or _untransposed(gm, weight) is not None
    return (x, weight, bias) if known and constant_value(gm, x) is None else None


def _untransposed(gm: torch.fx.GraphModule, node) -> torch.fx.Node | None:
    """The constant C where `node` is Cᵀ of a 2-D constant (`x @ self.weight.T`); else None."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    value = constant_value(gm, node.args[0])
    if value is None or value.dim() != 2:
        return None
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} != {0, 1}:
        return None
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    return node.args[0]


def linears_from_matmuls(gm: torch.fx.GraphModule) -> int:
    """addmm / mm / matmul by a constant [in, out] weight -> aten.linear(x, Wᵀ, bias). Returns how many."""
    transposed: dict[torch.fx.Node, torch.fx.Node] = {}  # one Wᵀ constant per W, however many read it
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _matmul_weight(gm, node)
        if found is None:
            continue
        x, weight, bias = found
        linear_weight = _untransposed(gm, weight)
        if linear_weight is None:
            if weight not in transposed:
                transposed[weight] = add_constant(gm, f"{weight.target}_t", constant_value(gm, weight).t(),
                                                  before=weight.next)
            linear_weight = transposed[weight]
        linear = _call(gm, aten.linear.default, (x, linear_weight) + ((bias,) if bias is not None else ()),
                       like=node)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not weight.users:  # the [in, out] constant or the transpose node
            gm.graph.erase_node(weight)
        _fold_flattening_views(gm, linear)
        count += 1
    return count


def _fold_flattening_views(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> None:
    """view(x, [-1, in]) -> linear -> view([..., out]), as Conv1D writes it, becomes linear(x): the form
    nn.Linear exports, whose input and output keep their leading dims."""
    flat = linear.args[0]
    if not (isinstance(flat, torch.fx.Node) and flat.op == "call_function" and flat.target in _RESHAPES):
        return
    source = flat.args[0]
    lead = tuple(_value(gm, source).shape[:-1]) if isinstance(_value(gm, source), torch.Tensor) else None
    if lead is None or tuple(_value(gm, flat).shape) != (math.prod(lead), _value(gm, source).shape[-1]):
        return
    out_shape = lead + (_value(gm, linear).shape[-1],)
    readers = list(linear.users)
    if not readers or any(r.op != "call_function" or r.target not in _RESHAPES
                          or tuple(_value(gm, r).shape) != out_shape for r in readers):
        return
    whole = _call(gm, aten.linear.default, (source, *linear.args[1:]), like=linear)
    for reader in readers:
        reader.replace_all_uses_with(whole)
        gm.graph.erase_node(reader)
    gm.graph.erase_node(linear)
    if not flat.users:
        gm.graph.erase_node(flat)


# ------------------------------------------------------------------ conv1d -> conv2d

def conv2d_from_conv1d(gm: torch.fx.GraphModule) -> int:
    """conv1d(x, w) -> squeeze(conv2d(unsqueeze(x, -2), w[:, :, None]), -2). Returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.conv1d.default, aten.conv1d.padding):
            continue
        weight = constant_value(gm, node.args[1])
        if weight is None:
            continue  # no pass reaches a computed weight; it keeps its form and the passes say why
        args = conv_args(node)
        weight_node = args.weight
        kernel = add_constant(gm, f"{weight_node.target}_2d", weight.unsqueeze(-2), before=node)
        rows = _call(gm, aten.unsqueeze.default, (args.input, -2), like=node)
        named_padding = isinstance(args.padding, str)
        padding2d = args.padding if named_padding else [0, args.padding[0]]
        target = aten.conv2d.padding if named_padding else aten.conv2d.default
        conv = _call(gm, target, (rows, kernel, args.bias, [1, args.stride[0]], padding2d, [1, args.dilation[0]],
                                  args.groups), like=node)
        out = _call(gm, aten.squeeze.dim, (conv, -2), like=node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        if not weight_node.users:
            gm.graph.erase_node(weight_node)
        _squeeze_after_batch_norm(gm, out)
        count += 1
    return count


def _squeeze_after_batch_norm(gm: torch.fx.GraphModule, squeeze: torch.fx.Node) -> None:
    """conv1d -> BatchNorm1d: the norm reads the 4-D conv output (channels still on dim 1) and the squeeze
    follows it, so that fold_bn finds the conv right before the norm, as it did the conv1d."""
    norm = next(iter(squeeze.users)) if len(squeeze.users) == 1 else None
    if norm is None or norm.target not in _BATCH_NORMS or norm.args[0] is not squeeze \
            or _value(gm, squeeze).dim() != 3:
        return
    norm.update_arg(0, squeeze.args[0])
    _refresh_value(gm, norm)
    outputs = [norm] if norm.target is aten.batch_norm.default else list(norm.users)  # getitems
    for output in outputs:
        _refresh_value(gm, output)
        if output is not norm and output.args[1] != 0:
            continue  # saved statistics: no channels-first output to squeeze
        readers = list(output.users)
        squeezed = _call(gm, aten.squeeze.dim, (output, -2), like=output, after=True)
        for reader in readers:
            reader.replace_input_with(output, squeezed)
    gm.graph.erase_node(squeeze)


def numeric_conv_padding(gm: torch.fx.GraphModule) -> int:
    """conv2d(padding='valid' | 'same') -> conv2d with the same padding as numbers, where it is
    symmetric (all of 'same' but an odd total, which PyTorch pads one more on the right). Passes that
    rebuild a conv (lowrank's factors) read numeric padding. Returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.conv2d.padding:
            continue
        conv = conv_args(node)
        kernel = _value(gm, conv.weight).shape[2:]
        totals = [0, 0] if conv.padding == "valid" else [d * (k - 1) for d, k in zip(conv.dilation, kernel)]
        if any(t % 2 for t in totals):
            continue
        node.target = aten.conv2d.default
        node.args = (conv.input, conv.weight, conv.bias, conv.stride, [t // 2 for t in totals], conv.dilation,
                     conv.groups)
        node.kwargs = {}
        count += 1
    return count


# ------------------------------------------------------------------ layer names

def name_layers_by_weight(gm: torch.fx.GraphModule, weight_paths: dict[str, str]) -> None:
    """Name a Linear/conv after its weight where the weight belongs to a submodule of the calling module,
    or is a parameter of it other than `weight` (nn.MultiheadAttention's in_proj_weight, out_proj.weight):
    one entry more on its `nn_module_stack`. Tied weights of unrelated modules leave the name as it is."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_OPS | CONV_OPS | _MATMULS:
            continue
        weight = node.args[1] if node.target is not aten.addmm.default else node.args[2]
        weight = _untransposed(gm, weight) or weight
        if not isinstance(weight, torch.fx.Node) or weight.target not in weight_paths:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        entries = list(stack.values())
        calling = module_path(entries[-1][0]) if entries else ""
        name = owner_name(calling, weight_paths[weight.target])
        if name is not None:
            kind = entries[-1][1] if entries else ""
            node.meta["nn_module_stack"] = {**stack, f"edge_weight_owner.{name}": (name, kind)}


def owner_name(calling: str, weight_path: str) -> str | None:
    """The layer name a weight at `weight_path` gives a call made in module `calling`, or None where the
    calling module's name stands (its own `weight`, or a weight of an unrelated module)."""
    owner, _, param = weight_path.rpartition(".")
    if not (owner == calling or not calling or owner.startswith(calling + ".")):
        return None
    name = owner if param == "weight" else ".".join(p for p in (owner, param.removesuffix("_weight")) if p)
    return None if name == calling or not name else name
