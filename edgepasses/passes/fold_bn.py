"""`fold_bn`: fold an inference batch norm into the convolution or linear layer before it.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta
      = (W * s) x + ((b - mean) * s + beta),      s = gamma / sqrt(var + eps)

Exact up to float rounding. Only eval-mode batch norms (running statistics) fold; the
producer must have the batch norm as its only user, and every weight must be a constant.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_utils import FUNCTIONAL_CONV_OPS, add_constant, constant_value
from ..pass_base import NoOptions, PassContext, PassResult, register_pass

aten = torch.ops.aten



@dataclass
class BatchNorm:
    node: torch.fx.Node       # the node whose users read the normalised tensor
    input: torch.fx.Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def _match_batch_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> BatchNorm | None:
    if node.op != "call_function":
        return None
    if node.target is aten.batch_norm.default:
        x, w, b, mean, var, training, _, eps, _ = node.args
        if training:
            return None
        output = node
    elif node.target is aten._native_batch_norm_legit_no_training.default:
        x, w, b, mean, var, _, eps = node.args
        getitems = list(node.users)
        if not all(u.target is operator.getitem for u in getitems):
            return None
        if any(u.args[1] != 0 and u.users for u in getitems) or sum(u.args[1] == 0 for u in getitems) != 1:
            return None
        output = next(u for u in getitems if u.args[1] == 0)
    else:
        return None
    mean_t, var_t = constant_value(gm, mean), constant_value(gm, var)
    if mean_t is None or var_t is None:
        return None
    w_t, b_t = constant_value(gm, w), constant_value(gm, b)
    if (w is not None and w_t is None) or (b is not None and b_t is None):
        return None
    return BatchNorm(output, x, w_t, b_t, mean_t, var_t, eps)


def _producer_weight_axis(node: torch.fx.Node, bn: BatchNorm) -> bool:
    """True when `node` is a conv, or a linear whose features are the batch norm's channels."""
    if node.op != "call_function":
        return False
    if node.target in FUNCTIONAL_CONV_OPS:
        return True
    if node.target is aten.convolution.default:
        return not node.args[6]  # transposed convs keep out-channels on weight axis 1: not folded
    if node.target is aten.linear.default:
        val = node.meta.get("val")
        return val is not None and val.dim() == 2  # BatchNorm1d on (N, C) normalises linear features
    return False


def _fold_one(gm: torch.fx.GraphModule, producer: torch.fx.Node, bn: BatchNorm) -> None:
    weight = constant_value(gm, producer.args[1])
    bias = constant_value(gm, producer.args[2]) if len(producer.args) > 2 else None
    out_channels = weight.shape[0]
    mean, var = bn.mean.double(), bn.var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(out_channels, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    old_bias = bias.double() if bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    new_weight = (weight.double() * scale.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
    new_bias = ((old_bias - mean) * scale + beta).to(weight.dtype)

    name = producer.args[1].target if producer.args[1].op == "get_attr" else producer.name
    weight_node = add_constant(gm, f"{name}_bnfold", new_weight, before=producer)
    bias_node = add_constant(gm, f"{name}_bnfold_bias", new_bias, before=producer)
    args = list(producer.args)
    args[1] = weight_node
    if len(args) > 2:
        args[2] = bias_node
    else:
        args.append(bias_node)
    producer.args = tuple(args)
    bn.node.replace_all_uses_with(producer)


@register_pass("fold_bn")
def fold_bn(gm: torch.fx.GraphModule, opts: NoOptions, ctx: PassContext) -> PassResult:
    """Fold eval-mode batch norms into the preceding conv or linear (exact)."""
    folded, skipped = 0, {}
    for node in list(gm.graph.nodes):
        bn = _match_batch_norm(gm, node)
        if bn is None:
            continue
        producer = bn.input
        if not _producer_weight_axis(producer, bn):
            skipped[node.name] = f"input {producer.name} is not a conv or 2-D linear"
        elif len(producer.users) != 1:
            skipped[node.name] = f"{producer.name} has other users that need the un-normalised values"
        elif constant_value(gm, producer.args[1]) is None:
            skipped[node.name] = f"{producer.name} has a weight that is not a constant"
        else:
            _fold_one(gm, producer, bn)
            folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, modified=folded > 0, stats={"folded": folded, "skipped": len(skipped),
                                                      **({"skipped_nodes": skipped} if skipped else {})})
