"""Decompositions of PyTorch's fused transformer fast paths, for the canonical form's export.

`nn.TransformerEncoderLayer` and `nn.MultiheadAttention` in eval mode without grad call one fused op
(`aten._transformer_encoder_layer_fwd`, `aten._native_multi_head_attention`) that takes every weight
as an argument: the Linears vanish inside it and no pass can reach them. Dynamo traces into these
fast paths (torch.export's non-strict tracing happens to take the slow one), and torch._decomp has no
decomposition for either op, so they are written here with the ops the slow path produces: one
`linear` per Linear (the packed q/k/v projection stays one Linear, as `in_proj`), `layer_norm`,
`relu`/`gelu`, `scaled_dot_product_attention` (matmul + softmax when attention weights are returned).

Numerics follow the fused kernels: a float mask is read as booleans (non-zero: masked), the query is
scaled before q·kᵀ, and `gelu` is the exact one.
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten

_KEY_PADDING = 1  # mask_type of a [batch, source] key-padding mask (MultiheadAttention.merge_masks)


def _project_qkv(query, key, value, qkv_weight, qkv_bias):
    """q, k, v projections: one Linear on the shared input for self-attention (the fast path's case)."""
    if query is key and key is value:
        return aten.linear(query, qkv_weight, qkv_bias).chunk(3, -1)
    weights, biases = qkv_weight.chunk(3, 0), qkv_bias.chunk(3, 0)
    return [aten.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]


def _split_heads(x, num_heads: int):
    """[batch, tokens, embed] -> [batch, heads, tokens, head_dim]."""
    batch, tokens, embed = x.shape
    return x.view(batch, tokens, num_heads, embed // num_heads).transpose(1, 2)


def _masked(mask, mask_type, batch: int):
    """The fused kernels' mask as booleans (True: masked; a float mask's non-zeros, as they read it),
    broadcastable to [batch, heads, target, source]."""
    if mask is None:
        return None
    masked = mask.to(torch.bool)
    if mask_type == _KEY_PADDING:
        return masked.view(batch, 1, 1, masked.shape[-1])
    return masked  # [target, source] or [batch, heads, target, source]


def native_multi_head_attention(query, key, value, embed_dim: int, num_head: int, qkv_weight, qkv_bias,
                                proj_weight, proj_bias, mask=None, need_weights: bool = True,
                                average_attn_weights: bool = True, mask_type=None):
    """`aten._native_multi_head_attention`: batch-first attention -> (output, attention weights or empty)."""
    batch, target = query.shape[0], query.shape[1]
    q, k, v = (_split_heads(t, num_head) for t in _project_qkv(query, key, value, qkv_weight, qkv_bias))
    masked = _masked(mask, mask_type, batch)
    if need_weights:
        scores = aten.matmul(q * (1.0 / math.sqrt(embed_dim // num_head)), k.transpose(-2, -1))
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        weights = scores.softmax(-1)
        context = aten.matmul(weights, v)
        if average_attn_weights:
            weights = weights.sum(1) / num_head
    else:
        keep = None if masked is None else aten.logical_not(masked)  # sdpa's boolean mask: True attends
        context = aten.scaled_dot_product_attention(q, k, v, keep)
        weights = query.new_empty(0)
    merged = context.transpose(1, 2).reshape(batch, target, embed_dim)
    return aten.linear(merged, proj_weight, proj_bias), weights


def transformer_encoder_layer_fwd(src, embed_dim: int, num_heads: int, qkv_weight, qkv_bias, proj_weight,
                                  proj_bias, use_gelu: bool, norm_first: bool, eps: float,
                                  norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
                                  ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2,
                                  mask=None, mask_type=None):
    """`aten._transformer_encoder_layer_fwd`: self-attention and feed-forward blocks with residuals,
    layer norm before (`norm_first`) or after each."""
    def norm(x, weight, bias):
        return aten.layer_norm(x, [embed_dim], weight, bias, eps)

    x = norm(src, norm_weight_1, norm_bias_1) if norm_first else src
    x = native_multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                    proj_bias, mask, False, True, mask_type)[0]
    x = x + src
    if not norm_first:
        x = norm(x, norm_weight_1, norm_bias_1)
    residual = x
    if norm_first:
        x = norm(x, norm_weight_2, norm_bias_2)
    x = aten.linear(x, ffn_weight_1, ffn_bias_1)
    x = aten.gelu(x) if use_gelu else aten.relu(x)
    x = aten.linear(x, ffn_weight_2, ffn_bias_2) + residual
    return norm(x, norm_weight_2, norm_bias_2) if not norm_first else x


FUSED_DECOMPOSITIONS = {
    aten._native_multi_head_attention.default: native_multi_head_attention,
    aten._transformer_encoder_layer_fwd.default: transformer_encoder_layer_fwd,
}
