"""A real language model without any download: a character transformer on Python's own docs.

`pydoc_data.topics` ships with the interpreter: Python's reference documentation, ~465k
characters of English prose and code. We train a small causal transformer (4 pre-norm
`nn.TransformerEncoderLayer`s) to predict the next character on the first 90% of that text and
cache its weights, so every compression pass can be judged by the held-out perplexity it costs.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .digits import _save_atomically, cache_dir

logger = logging.getLogger("edgepasses.zoo")

CACHE_VERSION = "v1"  # bump when the model's architecture, text or training recipe changes
SEQ_LEN = 64
TRAIN_FRACTION = 0.9
# Printable ASCII, fixed rather than read off the text so ids never move; id 0 is "anything else".
UNKNOWN_ID = 0
_FIRST_PRINTABLE, _LAST_PRINTABLE = 32, 126
VOCAB_SIZE = _LAST_PRINTABLE - _FIRST_PRINTABLE + 2
TRAIN_STEPS = 800
TRAIN_BATCH_SIZE = 32
TRAIN_LR = 3e-3
TRAIN_SEED = 0


@cache
def documentation_text() -> str:
    """Python's reference documentation, topics in sorted order, runs of whitespace as one space."""
    from pydoc_data.topics import topics

    return " ".join(re.sub(r"\s+", " ", topics[name]).strip() for name in sorted(topics))


def encode(text: str) -> Tensor:
    """int64 ids: printable ASCII to 1..95, anything else to UNKNOWN_ID."""
    codes = torch.tensor(list(text.encode("utf-32-le")), dtype=torch.uint8).view(torch.int32).long()
    printable = (codes >= _FIRST_PRINTABLE) & (codes <= _LAST_PRINTABLE)
    return torch.where(printable, codes - _FIRST_PRINTABLE + 1, UNKNOWN_ID)


def decode(ids: Tensor) -> str:
    """Inverse of `encode` for printable ASCII; unknown ids read as '?'."""
    return "".join(chr(i + _FIRST_PRINTABLE - 1) if i != UNKNOWN_ID else "?" for i in ids.tolist())


@cache
def _split() -> tuple[Tensor, Tensor]:
    ids = encode(documentation_text())
    cut = int(len(ids) * TRAIN_FRACTION)
    return ids[:cut], ids[cut:]


def train_ids() -> Tensor:
    """The first 90% of the encoded text (a contiguous cut, so no window straddles the split)."""
    return _split()[0].clone()  # clones, so callers cannot alter the cached split


def heldout_ids() -> Tensor:
    """The last 10% of the encoded text."""
    return _split()[1].clone()


def _windows(ids: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    # Each window: SEQ_LEN input ids and, shifted by one, the SEQ_LEN characters that follow them.
    index = starts.unsqueeze(1) + torch.arange(SEQ_LEN + 1)
    chunk = ids[index]
    return chunk[:, :-1], chunk[:, 1:]


def _strided_batches(ids: Tensor, batch_size: int, count: int | None) -> list[tuple[Tensor, Tensor]]:
    # Non-overlapping windows from the start, full batches only: models compiled for a static
    # batch size (OpenVINO, TensorRT) reject a short last batch.
    starts = torch.arange(0, len(ids) - SEQ_LEN, SEQ_LEN)
    available = len(starts) // batch_size
    count = available if count is None else count
    if count > available:
        raise ValueError(f"{count} batches of {batch_size} windows need {count * batch_size * SEQ_LEN} "
                         f"characters; the split has {len(ids)}")
    return [_windows(ids, starts[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def calibration_batches(n: int, batch_size: int) -> list[tuple[Tensor]]:
    """`n` input tuples of `batch_size` train windows (token ids), for quantization calibration."""
    return [(inputs,) for inputs, _ in _strided_batches(_split()[0], batch_size, n)]


def eval_batches(batch_size: int = 8, count: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """(token ids, next-character targets) pairs of held-out windows; all full batches by default."""
    return _strided_batches(_split()[1], batch_size, count)


def _heldout_scores(fn: Callable[[Tensor], Tensor], batch_size: int,
                    batches: int | None) -> tuple[float, int, int]:
    nll, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in eval_batches(batch_size, batches):
            logits = fn(inputs).float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            total += targets.numel()
    return nll, correct, total


def perplexity(fn: Callable[[Tensor], Tensor], batch_size: int = 8, batches: int | None = None) -> float:
    """Per-character perplexity of `fn` (token ids [B, S] -> logits [B, S, vocab]) on held-out text.

    Lower is better; uniform logits score VOCAB_SIZE. Every call of `fn` gets exactly `batch_size`
    windows; `batches` limits how many (all full batches by default).
    """
    nll, _, total = _heldout_scores(fn, batch_size, batches)
    return float(torch.tensor(nll / total).exp())


def next_char_accuracy(fn: Callable[[Tensor], Tensor], batch_size: int = 8,
                       batches: int | None = None) -> float:
    """Top-1 next-character accuracy in percent of `fn` on held-out text (higher is better)."""
    _, correct, total = _heldout_scores(fn, batch_size, batches)
    return 100.0 * correct / total


class CharTransformer(nn.Module):
    """Causal character LM from stock torch.nn parts: token + learned position embeddings,
    pre-norm `nn.TransformerEncoder` under a causal mask, final LayerNorm, linear head."""

    def __init__(self, d_model: int = 128, nhead: int = 4, dim_feedforward: int = 512,
                 num_layers: int = 4, seq_len: int = SEQ_LEN, vocab_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                                           dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        # Nested tensors only serve padding masks, and pre-norm layers cannot use them (it warns).
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, token_ids: Tensor) -> Tensor:
        seq = token_ids.shape[1]
        hidden = self.tokens(token_ids) + self.positions(torch.arange(seq, device=token_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=token_ids.device)
        hidden = self.encoder(hidden, mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def train(model: nn.Module, steps: int, batch_size: int = TRAIN_BATCH_SIZE, lr: float = TRAIN_LR,
          seed: int = 0) -> nn.Module:
    """Deterministic AdamW + cross-entropy on random train windows, cosine-decayed learning rate;
    returns `model` in eval mode. `steps` is a parameter so tests can train a tiny model cheaply."""
    ids = _split()[0]
    sampler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN, (batch_size,), generator=sampler)
        inputs, targets = _windows(ids, starts)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # keeps the high early learning rate stable
        optimizer.step()
        schedule.step()
    return model.eval()


def load_or_train_char_lm() -> CharTransformer:
    """The standard CharTransformer with weights from the cache, trained and cached on first use
    (minutes on a small CPU, longer on a busy one); in eval mode."""
    path = cache_dir() / f"char_lm_{CACHE_VERSION}.pt"
    if path.exists():
        model = CharTransformer()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    logger.info("training char_lm on Python's pydoc_data documentation (first use, cached at %s)", path)
    # The initial weights are part of the recipe; fork_rng leaves the caller's RNG state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        model = train(CharTransformer(), TRAIN_STEPS, seed=TRAIN_SEED)
    _save_atomically(model.state_dict(), path)
    return model
