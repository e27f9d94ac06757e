"""Signal-to-quantisation-noise ratio: how far a lossy graph's output is from the reference."""
from __future__ import annotations

import math

import torch


class SqnrAccumulator:
    """Sums signal and noise energy over many tensor pairs (batches, outputs, layers)."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        reference, test = reference.detach().double(), test.detach().double()
        self.signal += reference.pow(2).sum().item()
        self.noise += (reference - test).pow(2).sum().item()

    @property
    def db(self) -> float:
        """10·log10(‖ref‖² / ‖ref − test‖²) in dB; +inf when they are equal."""
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """SQNR in dB of one tensor against its reference."""
    accumulator = SqnrAccumulator()
    accumulator.add(reference, test)
    return accumulator.db
