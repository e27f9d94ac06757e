"""Linear layers whose constant weight is 2:4 sparse → `edge::sparse24_linear`.

Sparsity is read from the weight itself (every group of 4 along the reduction dim holds at
most 2 non-zeros), so a mask from `sparsify_24`, from pruning or from training all qualify,
and a weight that is not sparse can never be lowered to the sparse kernel by mistake.
"""
from __future__ import annotations

import torch
import torch.fx

from edgepasses.graph_utils import add_constant, constant_value, optional_arg, replace_with_call
from edgepasses.kernels import ops, panels

aten = torch.ops.aten


def is_24_sparse(weight: torch.Tensor | None) -> bool:
    """A float [N, K] weight, K a multiple of 4 (the float kernel's groups), with at most 2 non-zeros per group."""
    if weight is None or weight.dim() != 2 or weight.shape[1] % 4 or not weight.is_floating_point():
        return False
    return panels.at_most_2_of_4(weight)


def lower_sparse24(gm: torch.fx.GraphModule) -> int:
    """Rewrite float linears with 2:4-sparse weights; returns how many."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        weight = constant_value(gm, node.args[1]) if node.target == aten.linear.default else None
        if not is_24_sparse(weight):
            continue
        values, indices = ops.pack_sparse24(weight.float())
        values_node = add_constant(gm, f"{node.name}_values", values, before=node)
        indices_node = add_constant(gm, f"{node.name}_indices", indices, before=node)
        replace_with_call(gm, node, torch.ops.edge.sparse24_linear.default,
                          (node.args[0], values_node, indices_node, optional_arg(node, 2), None, None, 0))
        rewritten += 1
    return rewritten
