"""FLOPs (as multiply-accumulates) and parameters of a canonical graph, from `meta["val"]` shapes.

Counted: convolutions (`out.numel() * in_channels/groups * kernel size`), linear layers and
activation matmuls/bmm (`out.numel() * K`). Ignored, as small next to those: elementwise ops,
normalisation, pooling, softmax, and embedding lookups (a gather, no MACs). Parameters are
the elements of every distinct constant a `get_attr` reads, buffers such as batch-norm
statistics included. Keep `meta["val"]` fresh (`propagate_fake`) before counting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..graph_utils import CONV_OPS, constant_value

aten = torch.ops.aten

MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.mm.default}


@dataclass
class Cost:
    macs: int = 0
    params: int = 0
    by_node: dict[str, int] = field(default_factory=dict)  # MACs of each counted node

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def node_macs(node: torch.fx.Node) -> int:
    """Multiply-accumulates of one node; 0 for what the counter ignores or cannot size. On a dynamic
    graph, at the example's sizes: reading a symbolic count as a number would add a guard that fixes
    the dims for the whole graph."""
    return optimization_hint(_symbolic_macs(node))


def _symbolic_macs(node: torch.fx.Node):
    out = _val(node)
    if node.op != "call_function" or out is None:
        return 0
    if node.target in CONV_OPS:
        weight = _val(node.args[1])
        if weight is None:
            return 0
        # weight (out, in/groups, *kernel) for a plain conv: each output element reads in/groups * kernel
        transposed = node.target is aten.convolution.default and node.args[6]
        if transposed:  # (in, out/groups, *kernel): each input element feeds out/groups * kernel outputs
            x = _val(node.args[0])
            return 0 if x is None else x.numel() * math.prod(weight.shape[1:])
        return out.numel() * math.prod(weight.shape[1:])
    if node.target is aten.linear.default:
        weight = _val(node.args[1])
        return 0 if weight is None else out.numel() * weight.shape[1]
    if node.target in MATMUL_OPS:
        a = _val(node.args[0])
        return 0 if a is None else out.numel() * a.shape[-1]
    return 0


def count_cost(gm: torch.fx.GraphModule) -> Cost:
    """MACs of every conv/linear/matmul and the parameter count of `gm`."""
    cost = Cost()
    for node in gm.graph.nodes:
        macs = node_macs(node)
        if macs:
            cost.by_node[node.name] = macs
            cost.macs += macs
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = constant_value(gm, node)
            cost.params += value.numel() if value is not None else 0
    return cost
