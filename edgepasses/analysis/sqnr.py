"""Signal-to-quantisation-noise ratio: how far a lossy graph's output is from the reference."""
from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − test‖²) in dB; +inf when they are equal."""
    reference, test = reference.detach().double(), test.detach().double()
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
