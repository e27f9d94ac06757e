"""Two chained float linears with no bias between them (what `lowrank` makes of a Linear)
→ one `edge::lowrank_linear`, whose [M, r] intermediate never leaves the op."""
from __future__ import annotations

import torch
import torch.fx

from edgepasses.graph_utils import constant_value, optional_arg, replace_with_call

aten = torch.ops.aten


def _inner_factor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The bias-free linear feeding `node` and read by nothing else, if its weight is a constant."""
    inner = node.args[0]
    if not isinstance(inner, torch.fx.Node) or inner.target != aten.linear.default or len(inner.users) != 1:
        return None
    return None if optional_arg(inner, 2) is not None or constant_value(gm, inner.args[1]) is None else inner


def lower_lowrank_pairs(gm: torch.fx.GraphModule) -> int:
    """Rewrite linear(linear(x, first), second, bias) with constant factors; returns how many."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.target != aten.linear.default or constant_value(gm, node.args[1]) is None:
            continue
        inner = _inner_factor(gm, node)
        if inner is None:
            continue
        replace_with_call(gm, node, torch.ops.edge.lowrank_linear.default,
                          (inner.args[0], inner.args[1], node.args[1], optional_arg(node, 2)))
        gm.graph.erase_node(inner)
        rewritten += 1
    return rewritten
