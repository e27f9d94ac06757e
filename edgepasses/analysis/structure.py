"""What kind of network a graph is, read from its ops: passes tune themselves to it (a transformer's
activations carry outlier channels a CNN's do not) without asking the user."""
from __future__ import annotations

from typing import Literal

import torch
import torch.fx

from ..graph_utils import MATMUL_FAMILY_OPS

aten = torch.ops.aten

ATTENTION_OPS = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}

ModelType = Literal["transformer", "cnn"]


def _is_attention(node: torch.fx.Node) -> bool:
    """Attention in either form: the fused op, or softmax(scores) multiplied into the values."""
    if node.op != "call_function":
        return False
    if node.target in ATTENTION_OPS:
        return True
    return node.target in SOFTMAX_OPS and any(
        user.op == "call_function" and user.target in MATMUL_FAMILY_OPS for user in node.users)


def model_type(gm: torch.fx.GraphModule) -> ModelType:
    """"transformer" where the graph has attention (hybrids such as MobileViT included), else "cnn"."""
    return "transformer" if any(map(_is_attention, gm.graph.nodes)) else "cnn"
