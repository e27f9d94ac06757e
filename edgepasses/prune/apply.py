"""Rewrite the graph to the kept channels: slice constants, fix shape arguments.

Every node the analysis gave a role is rewritten from the keep masks of the channel maps
around it; `meta["val"]` is recomputed by the caller afterwards (`propagate_fake`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from ..errors import DynamicShapesError
from ..graph_utils import add_constant, constant_value, conv_args, replace_arg
from .groups import Analysis, Chan

aten = torch.ops.aten


class Masks:
    """Keep masks of channel maps, from one keep flag per element."""

    def __init__(self, an: Analysis, keep: np.ndarray):
        self.an, self.keep = an, keep

    def of(self, node) -> Chan | None:
        c = self.an.chans.get(node) if isinstance(node, torch.fx.Node) else None
        return c if isinstance(c, Chan) else None

    def axes(self, chan: Chan) -> list[np.ndarray]:
        """One mask per channel dim; raises when the kept set is not a rectangle (an analysis bug)."""
        full = self.keep[chan.ids]
        masks = [full.any(axis=tuple(a for a in range(full.ndim) if a != j)) if full.ndim > 1 else full
                 for j in range(full.ndim)]
        product = masks[0]
        for m in masks[1:]:
            product = np.multiply.outer(product, m)
        if not np.array_equal(product, full):
            raise RuntimeError(f"prune: kept channels on dims {chan.dims} are not rectangular")
        return masks

    def dim(self, node, dim: int) -> np.ndarray | None:
        """The mask along `dim` of `node`'s output, None when nothing there is pruned."""
        c = self.of(node)
        if c is None or dim not in c.dims:
            return None
        mask = self.axes(c)[c.dims.index(dim)]
        return None if mask.all() else mask

    def new_sizes(self, node) -> dict[int, int]:
        """The kept size of each channel dim of `node`'s output."""
        c = self.of(node)
        return {} if c is None else {d: int(m.sum()) for d, m in zip(c.dims, self.axes(c))}


def _take(t: torch.Tensor, dim: int, mask: np.ndarray | None) -> torch.Tensor:
    if mask is None:
        return t
    return t.index_select(dim, torch.from_numpy(np.nonzero(mask)[0]))


def _set_constant(gm, node: torch.fx.Node, index: int, value: torch.Tensor, old: torch.Tensor) -> None:
    if value.shape == old.shape:
        return
    arg = node.args[index]
    new = add_constant(gm, f"{arg.target}_pruned", value, before=node)
    replace_arg(gm, node, index, new)


def _weights(gm, m: Masks, node, out_mask, in_dim_mask) -> None:
    """Slice a conv/linear weight (dim 0 by output, dim 1 by input mask) and its bias."""
    weight = constant_value(gm, node.args[1])
    _set_constant(gm, node, 1, _take(_take(weight, 0, out_mask), 1, in_dim_mask), weight)
    bias = constant_value(gm, node.args[2]) if len(node.args) > 2 else None
    if bias is not None:
        _set_constant(gm, node, 2, _take(bias, 0, out_mask), bias)


def _conv(gm, m: Masks, node, cdim):
    _weights(gm, m, node, m.dim(node, cdim), m.dim(node.args[0], cdim))


def _linear(gm, m: Masks, node, last):
    _weights(gm, m, node, m.dim(node, len(node.meta["val"].shape) - 1), m.dim(node.args[0], last))


def _set_groups(node, groups: int) -> None:
    index = 8 if node.target is aten.convolution.default else 6
    if len(node.args) > index:
        node.update_arg(index, groups)
    else:
        node.update_kwarg("groups", groups)


def _dwconv(gm, m: Masks, node, cdim):
    out_mask = m.dim(node, cdim)
    if out_mask is None:
        return
    c_in, c_out = node.args[0].meta["val"].shape[cdim], node.meta["val"].shape[cdim]
    _weights(gm, m, node, out_mask, None)
    _set_groups(node, int(out_mask.sum()) // (c_out // c_in))


def _gconv(gm, m: Masks, node, cdim):
    groups = conv_args(node).groups
    inner = None
    c = m.of(node.args[0])
    if c is not None:
        full = m.keep[c.ids].reshape(groups, -1)
        inner = None if full[0].all() else full[0]
    _weights(gm, m, node, m.dim(node, cdim), inner)


def _bn(gm, m: Masks, node, _):
    mask = m.dim(node.args[0], 1)
    for index in range(1, 5):
        value = constant_value(gm, node.args[index])
        if value is not None:
            _set_constant(gm, node, index, _take(value, 0, mask), value)


def _binary(gm, m: Masks, node, constants):
    c = m.of(node)
    for index, offset in constants:
        value = constant_value(gm, node.args[index])
        new = value
        for d, mask in zip(c.dims, m.axes(c)):
            if d - offset >= 0 and value.shape[d - offset] > 1:
                new = _take(new, d - offset, None if mask.all() else mask)
        _set_constant(gm, node, index, new, value)


def _view(gm, m: Masks, node, _):
    """Rewrite the channel dims' sizes only: the others keep their arguments (a dynamic dim's
    `sym_size` node, -1), so that the view stays right at every input size."""
    if node.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return
    shape = list(node.args[1])
    for dim, size in m.new_sizes(node).items():
        if isinstance(shape[dim], torch.fx.Node):  # the analysis keeps channels off dynamic dims
            raise DynamicShapesError(f"prune: {node.name} ({node.target}) takes the size of channel dim {dim} from "
                                     f"{shape[dim].name} at run time; cannot set it to the {size} kept channels")
        shape[dim] = size
    if shape != list(node.args[1]):
        node.update_arg(1, shape)


def _split(gm, m: Masks, node, dim):
    pieces = m.an.chans[node]
    sizes = [int(m.keep[c.ids].sum()) for c in pieces]
    if sizes == [int(v.shape[dim]) for v in node.meta["val"]]:
        return
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def _slice(gm, m: Masks, node, spec):
    dim, start, end = spec
    mask = m.dim(node.args[0], dim)
    if mask is None:
        return
    new_start = int(mask[:start].sum())
    args = list(node.args) + [None] * (5 - len(node.args))
    args[1], args[2], args[3], args[4] = dim, new_start, new_start + int(mask[start:end].sum()), 1
    node.args = tuple(args)


_REWRITES = {"conv": _conv, "linear": _linear, "dwconv": _dwconv, "gconv": _gconv, "bn": _bn,
             "binary": _binary, "view": _view, "split": _split, "slice": _slice}


def apply_keep(gm: torch.fx.GraphModule, an: Analysis, keep: np.ndarray) -> None:
    """Rewrite `gm` so only elements with `keep` True remain. Check every mask first, then edit."""
    masks = Masks(an, keep)
    for node in an.chans:
        c = masks.of(node)
        if c is not None:
            masks.axes(c)
    for node, (kind, extra) in list(an.roles.items()):
        if kind in _REWRITES:
            _REWRITES[kind](gm, masks, node, extra)
