"""Real data for accuracy checks without any download: scikit-learn's digits set.

`load_digits()` ships inside scikit-learn: 1797 grey 8x8 images of the digits 0-9. We split it
once (stratified 80/20, fixed seed), train small models on the train part and cache their
weights, so that every compression pass can be judged by the top-1 accuracy it costs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("edgepasses.zoo")

NUM_CLASSES = 10
CACHE_VERSION = "v1"  # bump when a digits model's architecture or training recipe changes


@dataclass(frozen=True)
class DigitsData:
    """Images as float32 N x 1 x size x size (normalised with train statistics), int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@lru_cache(maxsize=None)
def _raw_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return tuple(train_test_split(digits.images.astype(np.float32), digits.target.astype(np.int64),
                                  test_size=0.2, stratify=digits.target, random_state=seed))


def _to_images(array: np.ndarray, size: int) -> Tensor:
    images = torch.from_numpy(array).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images


def load_digits_split(size: int = 8, seed: int = 0) -> DigitsData:
    """The fixed stratified 80/20 split, images resized to `size` x `size` and normalised."""
    train_x, test_x, train_y, test_y = _raw_split(seed)
    train_images, test_images = _to_images(train_x, size), _to_images(test_x, size)
    # Statistics of the train part only, so nothing about the test images leaks into the inputs.
    mean, std = train_images.mean(), train_images.std()
    # torch.tensor copies, so callers cannot alter the cached labels.
    return DigitsData(train_x=(train_images - mean) / std, train_y=torch.tensor(train_y),
                      test_x=(test_images - mean) / std, test_y=torch.tensor(test_y))


def calibration_batches(n: int, batch_size: int, size: int = 8) -> list[tuple[Tensor]]:
    """`n` input tuples of `batch_size` train images, for quantization calibration."""
    train_x = load_digits_split(size).train_x
    if n * batch_size > len(train_x):
        raise ValueError(f"{n} calibration batches of {batch_size} need {n * batch_size} images; "
                         f"the digits train split has {len(train_x)}")
    return [(train_x[i * batch_size:(i + 1) * batch_size],) for i in range(n)]


def eval_batches(batch_size: int = 256, size: int = 8) -> list[tuple[Tensor, Tensor]]:
    """(images, labels) pairs over the test split; the last batch may be smaller."""
    return _test_batches(load_digits_split(size), batch_size)


def _test_batches(data: DigitsData, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [(data.test_x[i:i + batch_size], data.test_y[i:i + batch_size])
            for i in range(0, len(data.test_x), batch_size)]


def _pad_batch(images: Tensor, batch_size: int) -> Tensor:
    # Models compiled for a static batch size (TensorRT, OpenVINO) reject a short last batch.
    missing = batch_size - len(images)
    return torch.cat([images, images.new_zeros(missing, *images.shape[1:])]) if missing else images


def accuracy(fn: Callable[[Tensor], Tensor], data: DigitsData | None = None, size: int = 8,
             batch_size: int = 256) -> float:
    """Top-1 accuracy in percent of `fn` (images -> logits) on the test split.

    `data` defaults to the standard split at `size`; every call of `fn` gets exactly
    `batch_size` images.
    """
    data = data if data is not None else load_digits_split(size)
    correct = 0
    with torch.no_grad():
        for images, labels in _test_batches(data, batch_size):
            logits = fn(_pad_batch(images, batch_size))[:len(labels)]
            correct += int((logits.argmax(dim=1) == labels).sum())
    return 100.0 * correct / len(data.test_y)


def train(model: nn.Module, data: DigitsData, epochs: int, lr: float, batch_size: int = 64,
          seed: int = 0) -> nn.Module:
    """Deterministic Adam + cross-entropy training on the train split; returns `model` in eval mode."""
    torch.manual_seed(seed)  # for any randomness inside the model (dropout)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_x), generator=shuffle)
        for batch in order.split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
            optimizer.step()
    return model.eval()


def cache_dir() -> Path:
    from edgepasses.paths import cache_root

    return cache_root()


def load_or_train(name: str, factory: Callable[[], nn.Module], epochs: int, lr: float,
                  batch_size: int = 64, size: int = 8, seed: int = 0) -> nn.Module:
    """`factory()` with weights from the cache, trained and cached on first use; in eval mode."""
    path = cache_dir() / f"digits_{name}_{CACHE_VERSION}.pt"
    if path.exists():
        model = factory()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    logger.info("training digits_%s on scikit-learn digits (first use, cached at %s)", name, path)
    # The initial weights are part of the recipe; fork_rng leaves the caller's RNG state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = train(factory(), load_digits_split(size), epochs=epochs, lr=lr,
                      batch_size=batch_size, seed=seed)
    _save_atomically(model.state_dict(), path)
    return model


def _save_atomically(state_dict: dict[str, Tensor], path: Path) -> None:
    # Parallel test workers may train the same model; readers must never see a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state_dict, partial)
    os.replace(partial, path)
