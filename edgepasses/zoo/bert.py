"""A BERT-style encoder written out op by op.

Attention is spelled as explicit q/k/v projections, reshape/permute into heads, matmul, softmax
and the permute/reshape back: head-pruning passes find heads in exactly that pattern, which
nn.MultiheadAttention or scaled_dot_product_attention would hide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 4
    heads: int = 12
    max_positions: int = 512
    seq_len: int = 128  # length of the example inputs
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02
    # Trained BERTs have a few hidden dims where every LayerNorm's gain is large, so activations
    # there are 10-20x the rest (Kovaleva et al. 2021, "BERT Busters"; Dettmers et al. 2022):
    # the outliers activation quantization, SmoothQuant and AWQ are about. Random weights lack them.
    outlier_dims: int = 6
    outlier_gain: float = 12.0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden % config.heads:
            raise ValueError(f"hidden size {config.hidden} is not divisible by {config.heads} heads")
        self.heads, self.head_dim = config.heads, config.head_dim
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.out = nn.Linear(config.hidden, config.hidden)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        context = scores.softmax(dim=-1) @ v
        return self.out(context.permute(0, 2, 1, 3).reshape(batch, seq, self.heads * self.head_dim))


class BertLayer(nn.Module):
    """Post-LN as in BERT: residual add, then LayerNorm, after attention and after the MLP."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden, 4 * config.hidden), nn.GELU(),
                                 nn.Linear(4 * config.hidden, config.hidden))
        self.mlp_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention_norm(x + self.attention(x))
        return self.mlp_norm(x + self.mlp(x))


class BertEncoder(nn.Module):
    """Token ids (B, S) -> hidden states (B, S, hidden)."""

    def __init__(self, config: BertConfig = BertConfig()) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden)
        self.embedding_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.layers))
        self._init_weights()

    def _init_weights(self) -> None:
        # BERT's initialisation, so activation ranges (which quantization sees) look realistic.
        generator = torch.Generator().manual_seed(self.config.seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std, generator=generator)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        outliers = torch.randperm(self.config.hidden, generator=generator)[:self.config.outlier_dims]
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.data[outliers] = self.config.outlier_gain

    def forward(self, token_ids: Tensor) -> Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = self.embedding_norm(self.token_embedding(token_ids) + self.position_embedding(positions))
        for layer in self.layers:
            x = layer(x)
        return x


def example_token_ids(config: BertConfig, batch_size: int = 1, seed: int = 0) -> Tensor:
    """Seeded random int64 token ids of shape (batch_size, config.seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch_size, config.seq_len), generator=generator)
