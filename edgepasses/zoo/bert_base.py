"""BERT-base as transformers builds it, with seeded random weights: nothing is downloaded.

Hidden 768, 12 layers, 12 heads, intermediate 3072 (110 M parameters): the size transformer latency on
CPUs is usually quoted at. Unlike `bert_encoder` (ours, op by op), this is `transformers.BertModel`
itself, so its graph is the one users export (sdpa attention, the extended attention mask). The
weights are random (BERT's own initialisation), so compression is judged by output SQNR against fp32,
not by a task metric. Kept out of ZOO_NAMES: the zoo-wide runs (demo, tests) stay light.

    from edgepasses.zoo.bert_base import bert_base
    model = bert_base()                       # (input_ids, attention_mask) -> last hidden states
    tiny = bert_base(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


class LastHiddenState(nn.Module):
    """(token ids, attention mask) -> the encoder's last hidden states (B, S, hidden): one tensor out,
    as every runtime returns it."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert_base(seed: int = 0, **config) -> LastHiddenState:
    """transformers' BertModel at BERT-base size (`config` overrides any BertConfig field), random
    weights seeded by `seed`, in eval mode."""
    from edgepasses.testing import import_transformers

    transformers = import_transformers()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is spared
        torch.manual_seed(seed)
        encoder = transformers.BertModel(transformers.BertConfig(**{**BERT_BASE, **config}), add_pooling_layer=False)
    return LastHiddenState(encoder).eval()


def random_token_batches(count: int, batch: int, seq: int, vocab_size: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """`count` seeded (token ids, all-ones attention mask) batches of batch x seq."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab_size, (batch, seq), generator=generator), torch.ones(batch, seq, dtype=torch.int64))
            for _ in range(count)]
