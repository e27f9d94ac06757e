"""Dependency analysis for structured pruning: which channels must be removed together.

Every tensor that carries prunable channels gets a `Chan`: the dims that carry them and an
integer array (one entry per position along those dims) naming the channel *element* there.
A conv/linear output creates fresh elements (a *source*); ops that tie positions of two
tensors (add, mul, cat along another dim, matmul contraction) union their elements. Elements
in one union class (an *atom*) are removed together; sources joined by any union form a
*group*, which shares one pruning decision. An op the analysis does not know fixes every
group its inputs touch (left whole, with the op and node as reason) instead of guessing:
a group is never pruned into a wrong shape.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..graph_utils import CONV_OPS, FUNCTIONAL_CONV_OPS, LINEAR_OPS, constant_value, conv_args, layer_name
from ..graph_utils import ignore_matcher as graph_ignore_matcher

aten = torch.ops.aten

BN_OPS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
# One tensor in, same shape out, channels untouched.
UNARY_OPS = {aten.relu.default, aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default,
             aten.sigmoid.default, aten.silu.default, aten.gelu.default, aten.tanh.default, aten.elu.default,
             aten.leaky_relu.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
             aten.detach.default, aten.dropout.default, aten.clamp.default, aten.clamp_min.default,
             aten.clamp_max.default, aten._to_copy.default, aten.neg.default, aten.abs.default,
             aten.mish.default, aten.softplus.default, aten.relu6.default, aten.erf.default,
             aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.pow.Tensor_Scalar}
BINARY_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
              aten.maximum.default, aten.minimum.default}
# Work on trailing (spatial) dims only; channels on dims 0/1 pass.
SPATIAL_OPS = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
               aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
               aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
               aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default,
               aten.adaptive_max_pool2d.default, aten.upsample_nearest2d.vec,
               aten.upsample_bilinear2d.vec, aten.constant_pad_nd.default, aten.pad.default}
REDUCE_OPS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
# Ops between a head split and the attention matmul.
_TO_MATMUL = {aten.permute.default, aten.transpose.int, aten.clone.default, aten.contiguous.default,
              aten.mul.Tensor, aten.div.Tensor}


@dataclass
class Chan:
    """Prunable channels of a tensor: `ids[i, j, ...]` is the element at index (i, j, ...) of `dims`."""
    dims: tuple[int, ...]  # sorted
    ids: np.ndarray


@dataclass
class Source:
    node: torch.fx.Node | None  # the conv/linear whose output channels these are; None: a placeholder
    name: str
    size: int
    base: int                   # element ids base .. base + size - 1
    reasons: list[str] = field(default_factory=list)


@dataclass
class Group:
    name: str
    sources: list[Source]
    atoms: list[np.ndarray]     # element ids removed together
    reasons: list[str]          # non-empty: left whole

    @property
    def channels(self) -> int:
        """Output channels of the group's first source (what `ratio` and `round_to` count)."""
        return self.sources[0].size

    def atom_width(self) -> int:
        first = self.sources[0]
        return max(1, min(int(((a >= first.base) & (a < first.base + first.size)).sum()) for a in self.atoms))


class Analysis:
    """The result of `analyze`: per-node channel maps, roles for the rewrite, and the groups."""

    def __init__(self, gm: torch.fx.GraphModule, is_ignored=lambda node: False):
        self.gm = gm
        self.is_ignored = is_ignored
        self.parent: list[int] = []
        self.owner: list[int] = []          # element -> source index
        self.sources: list[Source] = []
        self.src_parent: list[int] = []
        self.chans: dict[torch.fx.Node, object] = {}  # Chan, list of Chan|None (tuple outputs) or None
        self.roles: dict[torch.fx.Node, tuple] = {}   # node -> (kind, extra) for apply

    # ------------------------------------------------------------------ union-find
    def new_source(self, node, size: int, name: str, reason: str | None = None) -> np.ndarray:
        base = len(self.parent)
        index = len(self.sources)
        self.sources.append(Source(node, name, size, base, [reason] if reason else []))
        self.src_parent.append(index)
        self.parent.extend(range(base, base + size))
        self.owner.extend([index] * size)
        return np.arange(base, base + size)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _find_src(self, i: int) -> int:
        while self.src_parent[i] != i:
            self.src_parent[i] = self.src_parent[self.src_parent[i]]
            i = self.src_parent[i]
        return i

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie elements of `a` and `b` position by position (same shape)."""
        for x, y in zip(np.asarray(a).flat, np.asarray(b).flat):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                self.parent[rx] = ry
                sx, sy = self._find_src(self.owner[rx]), self._find_src(self.owner[ry])
                if sx != sy:
                    self.src_parent[sx] = sy

    def tie(self, ids: np.ndarray, axes: tuple[int, ...]) -> None:
        """Tie all entries that differ only along `axes` (so those axes are kept or removed whole)."""
        if not axes:
            return
        rest = [a for a in range(ids.ndim) if a not in axes]
        flat = np.transpose(ids, rest + list(axes)).reshape(int(np.prod([ids.shape[a] for a in rest])), -1)
        for row in flat:
            self.union(row[1:], np.full(len(row) - 1, row[0]))

    def fix(self, chan, reason: str) -> None:
        """Leave every group that `chan`'s elements belong to whole."""
        for c in (chan if isinstance(chan, list) else [chan]):
            if isinstance(c, Chan):
                for src in {self.owner[int(i)] for i in np.unique(c.ids)}:
                    self.sources[src].reasons.append(reason)

    # ------------------------------------------------------------------ results
    def groups(self) -> list[Group]:
        """Groups that own at least one real conv/linear source, in graph order."""
        by_root: dict[int, list[Source]] = {}
        for index, src in enumerate(self.sources):
            by_root.setdefault(self._find_src(index), []).append(src)
        groups = []
        for members in by_root.values():
            real = [s for s in members if s.node is not None]
            if not real:
                continue
            atoms: dict[int, list[int]] = {}
            for s in members:
                for e in range(s.base, s.base + s.size):
                    atoms.setdefault(self.find(e), []).append(e)
            reasons = sorted({r for s in members for r in s.reasons})
            name = "+".join(s.name for s in real[:3]) + (f"+{len(real) - 3} more" if len(real) > 3 else "")
            while name in {g.name for g in groups}:  # a module called twice
                name += "'"
            groups.append(Group(name, real, [np.array(v) for v in atoms.values()], reasons))
        return groups


# ---------------------------------------------------------------------- helpers

def _val(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val


def _shape(node) -> tuple[int, ...]:
    """Sizes as ints; a dynamic dim by its example value, read without a guard (`int()` would specialize
    the symbol for the whole graph). Channel maps never rest on those values: `_static_channels` and
    `_view`'s symbolic check see to it."""
    return tuple(optimization_hint(s) for s in _val(node).shape)


def _size_exprs(node) -> tuple:
    """Sizes as ints or sympy expressions of the graph's input symbols."""
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in _val(node).shape)


def _is_dynamic(size) -> bool:
    return isinstance(size, sympy.Expr) and not size.is_number


def _may_exceed_one(size) -> bool:
    return _is_dynamic(size) or size > 1


def _conv_channel_dim(node: torch.fx.Node) -> int:
    x, w = _val(node.args[0]), _val(node.args[1])
    return 1 if x.dim() == w.dim() else 0  # unbatched input has channels first


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal numel into runs of consecutive dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ia, jb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ia.append(i); pa *= a[i]; i += 1
            elif pb < pa and j < len(b):
                jb.append(j); pb *= b[j]; j += 1
            else:
                return None
        groups.append((ia, jb))
    if not groups:
        return None
    # trailing size-1 dims join the last run
    groups[-1][0].extend(range(i, len(a)))
    groups[-1][1].extend(range(j, len(b)))
    return groups


def _runs_hold_symbolically(runs, ins: tuple, outs: tuple) -> bool:
    """Whether runs matched on example sizes hold for every size of the dynamic dims (equal products as
    expressions), so that no run boundary rests on a coincidence of example values."""
    if not any(map(_is_dynamic, ins + outs)):
        return True  # static: the runs were matched on the sizes themselves
    for ia, jb in runs:
        if sympy.expand(sympy.Mul(*[ins[d] for d in ia]) - sympy.Mul(*[outs[d] for d in jb])) != 0:
            return False
    return True


def _feeds_matmul(node: torch.fx.Node, depth: int = 5) -> bool:
    """True when `node` reaches an activation matmul through layout ops (an attention head split)."""
    for user in node.users:
        if user.target in MATMUL_OPS:
            return True
        if depth and user.target in _TO_MATMUL and _feeds_matmul(user, depth - 1):
            return True
    return False


def _sub(chan: Chan | None, offset: int = 0) -> Chan | None:
    return None if chan is None else Chan(tuple(d + offset for d in chan.dims), chan.ids)


# ---------------------------------------------------------------------- the analysis

def analyze(gm: torch.fx.GraphModule, is_ignored=lambda node: False) -> Analysis:
    """Propagate channel dependence through `gm` (canonical form, fresh `meta["val"]`)."""
    an = Analysis(gm, is_ignored)
    for node in gm.graph.nodes:
        if node.op == "output":
            for leaf in pytree.tree_leaves(node.args):
                if isinstance(leaf, torch.fx.Node):
                    an.fix(an.chans.get(leaf), f"model output ({leaf.name})")
            continue
        if node.op != "call_function":
            an.chans[node] = None
            if node.op == "call_module":
                _unknown(an, node)
            continue
        handler = _HANDLERS.get(node.target, _dispatch_by_set(node.target))
        an.chans[node] = _static_channels(an, node, handler(an, node))
    return an


def _static_channels(an: Analysis, node: torch.fx.Node, chans):
    """`chans`, or None where channels would sit on a dynamic dim of `node`: their count changes with the
    input, so no fixed set can be removed (the groups they touch stay whole)."""
    vals = _val(node)
    if isinstance(chans, Chan) and isinstance(vals, torch.Tensor):
        sizes = _size_exprs(node)
        dynamic = [d for d in chans.dims if _is_dynamic(sizes[d])]
        if dynamic:
            an.fix(chans, f"channels on dynamic dim {dynamic[0]} of {node.name} (size {sizes[dynamic[0]]})")
            return None
    return chans


def _inputs(an: Analysis, node: torch.fx.Node):
    return [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]


def _unknown(an: Analysis, node: torch.fx.Node):
    for a in _inputs(an, node):
        an.fix(an.chans.get(a), f"{node.target} at {node.name}")
    return None


def _tracked(an: Analysis, node) -> Chan | None:
    c = an.chans.get(node) if isinstance(node, torch.fx.Node) else None
    return c if isinstance(c, Chan) else None


def _conv(an: Analysis, node: torch.fx.Node):
    conv = conv_args(node)
    if conv.transposed:
        return _unknown(an, node)  # transposed conv: not handled
    x, w = conv.input, conv.weight
    if constant_value(an.gm, w) is None:
        return _unknown(an, node)
    cdim = _conv_channel_dim(node)
    c_in, c_out, groups = _shape(x)[cdim], _shape(node)[cdim], conv.groups
    cin = _tracked(an, x)
    if cin is not None and cin.dims != (cdim,):
        an.fix(cin, f"conv {node.name} reads channels on dims {cin.dims}")
        cin = None
    if groups == 1:
        an.roles[node] = ("conv", cdim)
        return _new_source(an, node, cdim, c_out)
    if groups == c_in:  # depthwise (channel multiplier c_out / c_in): output channels follow input's
        an.roles[node] = ("dwconv", cdim)
        ids = cin.ids if cin is not None else an.new_source(None, c_in, node.name, f"input of {node.name}")
        return Chan((cdim,), np.repeat(ids, c_out // c_in))
    # grouped: prune the same channels in every group so the groups stay equal
    an.roles[node] = ("gconv", cdim)
    if cin is not None:
        an.tie(cin.ids.reshape(groups, c_in // groups), (0,))
    out = _new_source(an, node, cdim, c_out)
    an.tie(out.ids.reshape(groups, c_out // groups), (0,))
    return out


def _new_source(an: Analysis, node: torch.fx.Node, dim: int, size: int) -> Chan:
    reason = f"ignored layer {layer_name(node)}" if an.is_ignored(node) else None
    return Chan((dim,), an.new_source(node, size, layer_name(node), reason))


def _linear(an: Analysis, node: torch.fx.Node):
    x, w = node.args[0], node.args[1]
    if constant_value(an.gm, w) is None:
        return _unknown(an, node)
    last = len(_shape(x)) - 1
    cin = _tracked(an, x)
    if cin is not None and cin.dims != (last,):
        an.fix(cin, f"linear {node.name} reads channels on dims {cin.dims}")
    an.roles[node] = ("linear", last)
    return _new_source(an, node, len(_shape(node)) - 1, _shape(node)[-1])


def _batch_norm(an: Analysis, node: torch.fx.Node):
    cin = _tracked(an, node.args[0])
    params = [a for a in node.args[1:5] if a is not None]
    if any(constant_value(an.gm, p) is None for p in params):
        return _unknown(an, node)
    if cin is None:
        return None if node.target is aten.batch_norm.default else [None, None, None]
    if cin.dims != (1,):
        an.fix(cin, f"batch norm {node.name} over channels on dims {cin.dims}")
    an.roles[node] = ("bn", None)
    return cin if node.target is aten.batch_norm.default else [cin, None, None]


def _getitem(an: Analysis, node: torch.fx.Node):
    parent, index = node.args
    chans = an.chans.get(parent)
    if isinstance(chans, list):
        return chans[index] if index < len(chans) else None
    return _unknown(an, node)


def _unary(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is not None and _shape(node) != _shape(node.args[0]):
        return _unknown(an, node)
    return c


def _spatial(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ins, outs = _shape(node.args[0]), _shape(node)
    if len(ins) != len(outs) or any(d > 1 or ins[d] != outs[d] for d in c.dims):
        return _unknown(an, node)
    return c


def _reduce(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ndim = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    reduced = set(range(ndim)) if not dims else {d % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if reduced & set(c.dims):
        return _unknown(an, node)
    if keepdim:
        return c
    return Chan(tuple(d - sum(r < d for r in reduced) for d in c.dims), c.ids)


def _dim_op(an: Analysis, node: torch.fx.Node):
    """Softmax / layer norm: fine when they work on other dims than the channels."""
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ndim = len(_shape(node.args[0]))
    if node.target is aten.layer_norm.default:
        touched = set(range(ndim - len(node.args[1]), ndim))
        if any(a is not None for a in node.args[2:4]) and touched & set(c.dims):
            return _unknown(an, node)
    else:
        touched = {node.args[1] % ndim}
    if touched & set(c.dims):
        return _unknown(an, node)
    return c


def _binary(an: Analysis, node: torch.fx.Node):
    out_shape = _shape(node)
    nd = len(out_shape)
    tensors = [(i, a) for i, a in enumerate(node.args[:2]) if isinstance(a, torch.fx.Node)]
    tracked = [(i, a, _sub(_tracked(an, a), nd - len(_shape(a)))) for i, a in tensors if _tracked(an, a)]
    if not tracked:
        return None
    out = None
    for _, a, c in tracked:
        if any(_shape(a)[d - (nd - len(_shape(a)))] != out_shape[d] for d in c.dims):
            return _unknown(an, node)
        if out is None:
            out = c
        elif out.dims == c.dims and out.ids.shape == c.ids.shape:
            an.union(out.ids, c.ids)
        else:
            return _unknown(an, node)
    constants = []
    for i, a in tensors:
        if _tracked(an, a) is not None:
            continue
        sizes = (1,) * (nd - len(_shape(a))) + _size_exprs(a)
        if not any(_may_exceed_one(sizes[d]) for d in out.dims):
            continue  # broadcast along the channels: nothing to slice
        if constant_value(an.gm, a) is None:
            an.fix(out, f"{node.target} at {node.name} with {a.name}, which is not prunable")
            return out
        constants.append((i, nd - len(_shape(a))))
    an.roles[node] = ("binary", constants)
    return out


def _permute(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ndim = len(_shape(node.args[0]))
    if node.target is aten.permute.default:
        perm = [d % ndim for d in node.args[1]]
    else:
        perm = list(range(ndim))
        a, b = node.args[1] % ndim, node.args[2] % ndim
        perm[a], perm[b] = perm[b], perm[a]
    new_dims = [perm.index(d) for d in c.dims]
    order = np.argsort(new_dims)
    return Chan(tuple(sorted(new_dims)), np.transpose(c.ids, order))


def _view(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ins, outs = _shape(node.args[0]), _shape(node)
    runs = _reshape_groups(ins, outs)
    in_exprs, out_exprs = _size_exprs(node.args[0]), _size_exprs(node)
    if runs is None or not _runs_hold_symbolically(runs, in_exprs, out_exprs):
        return _unknown(an, node)
    chan_runs = [(ia, jb) for ia, jb in runs if set(ia) & set(c.dims)]
    if any(_is_dynamic(in_exprs[d]) for ia, _ in chan_runs for d in ia) or \
            any(_is_dynamic(out_exprs[d]) for _, jb in chan_runs for d in jb):
        an.fix(c, f"{node.name} merges channels with a dynamic dim")
        return None
    in_dims = [d for ia, _ in chan_runs for d in ia]
    out_dims = [d for _, jb in chan_runs for d in jb]
    # broadcast the ids over the non-channel dims of those runs, then reshape run by run
    expand = [ins[d] for d in in_dims]
    index = tuple(slice(None) if d in c.dims else None for d in in_dims)
    ids = np.broadcast_to(c.ids[index], expand).reshape([outs[d] for d in out_dims])
    # size-1 dims carry no channels; a run that is all size-1 keeps its first
    kept_runs = [[d for d in jb if outs[d] > 1] or jb[:1] for _, jb in chan_runs]
    dims = [d for run in kept_runs for d in run]
    ids = ids.reshape([outs[d] for d in dims])
    axis = 0
    for run in kept_runs:
        if len(run) > 1:  # one channel dim became several: keep the split rectangular
            axes = tuple(range(axis, axis + len(run)))
            head_mode = _feeds_matmul(node)
            an.tie(ids, axes[1:] if head_mode else axes[:-1])
        axis += len(run)
    an.roles[node] = ("view", None)
    return Chan(tuple(dims), ids)


def _cat(an: Analysis, node: torch.fx.Node):
    parts = node.args[0]
    ndim = len(_shape(node))
    dim = (node.args[1] if len(node.args) > 1 else 0) % ndim
    chans = [_tracked(an, p) for p in parts]
    if all(c is None for c in chans):
        return None
    if any(c is not None and len(c.dims) != 1 for c in chans):
        return _unknown(an, node)
    cdims = {c.dims for c in chans if c is not None}
    if cdims == {(dim,)}:
        ids = [c.ids if c is not None else an.new_source(None, _shape(p)[dim], p.name, f"{p.name} into {node.name}")
               for p, c in zip(parts, chans)]
        an.roles[node] = ("cat", None)
        return Chan((dim,), np.concatenate(ids))
    if len(cdims) == 1 and all(c is not None for c in chans) and dim not in next(iter(cdims)):
        for c in chans[1:]:
            an.union(chans[0].ids, c.ids)
        return chans[0]
    return _unknown(an, node)


def _split(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    vals = _val(node)
    if c is None:
        return [None] * len(vals)
    ndim = len(_shape(node.args[0]))
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % ndim
    if dim not in c.dims:
        return [c] * len(vals)
    if len(c.dims) != 1:
        return _unknown(an, node) or [None] * len(vals)
    an.roles[node] = ("split", dim)
    bounds = np.cumsum([0] + [int(v.shape[dim]) for v in vals])
    return [Chan(c.dims, c.ids[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]


def _slice(an: Analysis, node: torch.fx.Node):
    c = _tracked(an, node.args[0])
    if c is None:
        return None
    ndim = len(_shape(node.args[0]))
    dim = (node.args[1] if len(node.args) > 1 else 0) % ndim
    if dim not in c.dims:
        return c
    step = node.args[4] if len(node.args) > 4 else 1
    if len(c.dims) != 1 or step != 1:
        return _unknown(an, node)
    size = _shape(node.args[0])[dim]
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    if not isinstance(start, int) or not isinstance(end, int):
        return _unknown(an, node)  # bounds computed at run time: which channels it takes is not fixed
    start, end = (start % size if start < 0 else min(start, size)), (end % size if end < 0 else min(end, size))
    an.roles[node] = ("slice", (dim, start, end))
    return Chan(c.dims, c.ids[start:end])


def _matmul(an: Analysis, node: torch.fx.Node):
    """Activation matmul (attention): the contracted dim and shared batch dims tie both sides."""
    a, b = node.args[0], node.args[1]
    ca, cb = _tracked(an, a), _tracked(an, b)
    if ca is None and cb is None:
        return None
    sa, sb, so = _shape(a), _shape(b), _shape(node)
    if min(len(sa), len(sb)) < 2:
        return _unknown(an, node)
    pa, pb = _mm_labels(ca, sa, so, False), _mm_labels(cb, sb, so, True)
    if pa is None or pb is None:
        return _unknown(an, node)
    if ca is None or cb is None:
        lab, ids = pb if ca is None else pa
        other = _size_exprs(b if ca is not None else a)
        # a dynamic size may exceed 1 at run time: shared, not broadcast
        shared = [x for x in lab if x == "K" or (len(other) - len(so) + x >= 0
                                                  and _may_exceed_one(other[len(other) - len(so) + x]))]
        return _unknown(an, node) if shared else _mm_drop_k(an, lab, ids)
    if ("K" in pa[0]) != ("K" in pb[0]):
        return _unknown(an, node)
    shared = [x for x in pa[0] if x in pb[0]]
    if not shared:
        if pa[0] and pb[0]:
            return _unknown(an, node)  # rows from one side, columns from the other: not one id per position
        return _mm_drop_k(an, *(pa if pa[0] else pb))
    a_lab, a_ids = _mm_link(an, pa, shared)
    b_lab, b_ids = _mm_link(an, pb, shared)
    an.union(a_ids, np.transpose(b_ids, [b_lab.index(x) for x in a_lab]))
    big = max((pa, pb), key=lambda p: len(p[0]))
    small = pb if big is pa else pa
    if not set(small[0]) <= set(big[0]):
        return _unknown(an, node)
    return _mm_drop_k(an, *big)


def _mm_labels(c, shape, out_shape, is_b):
    """Labels of a matmul operand's channel dims: "K" (contracted), "N" (b's columns) or an output dim."""
    if c is None:
        return ([], None)
    n, no = len(shape), len(out_shape)
    labels = []
    for d in c.dims:
        if d == n - 1:
            labels.append(no - 1 if is_b else "K")
        elif d == n - 2:
            labels.append("K" if is_b else no - 2)
        elif shape[d] != out_shape[d + no - n]:
            return None
        else:
            labels.append(d + no - n)
    return (labels, c.ids)


def _mm_link(an: Analysis, part, shared):
    """Tie an operand along its labels outside `shared`; return its ids over `shared` only."""
    labels, ids = part
    extra = tuple(i for i, x in enumerate(labels) if x not in shared)
    an.tie(ids, extra)
    picked = ids[tuple(0 if i in extra else slice(None) for i in range(len(labels)))]
    return [x for x in labels if x in shared], picked


def _mm_drop_k(an: Analysis, labels, ids):
    """The output channel map: the contracted axis is tied and removed."""
    if "K" in labels:
        k = labels.index("K")
        an.tie(ids, (k,))
        ids, labels = np.take(ids, 0, axis=k), [x for x in labels if x != "K"]
    if not labels:
        return None
    order = np.argsort(labels)
    return Chan(tuple(sorted(labels)), np.transpose(ids, order))


def _dispatch_by_set(target):
    for ops, handler in _SET_HANDLERS:
        if target in ops:
            return handler
    return _unknown


_SET_HANDLERS = [(FUNCTIONAL_CONV_OPS, _conv), (BN_OPS, _batch_norm), (UNARY_OPS, _unary), (BINARY_OPS, _binary),
                 (SPATIAL_OPS, _spatial), (REDUCE_OPS, _reduce), (VIEW_OPS, _view), (SPLIT_OPS, _split),
                 (MATMUL_OPS, _matmul), (SOFTMAX_OPS, _dim_op)]
_HANDLERS = {aten.convolution.default: _conv, aten.linear.default: _linear, operator.getitem: _getitem,
             aten.permute.default: _permute, aten.transpose.int: _permute, aten.cat.default: _cat,
             aten.slice.Tensor: _slice, aten.layer_norm.default: _dim_op}


def ignore_matcher(gm: torch.fx.GraphModule, patterns: tuple[str, ...]):
    """A predicate for the conv/linear layers `patterns` name (whole-name regex on module path or node)."""
    layers = [n for n in gm.graph.nodes if n.op == "call_function"
              and n.target in CONV_OPS | LINEAR_OPS]
    return graph_ignore_matcher(patterns, layers, where="prune", kind="conv or linear")
