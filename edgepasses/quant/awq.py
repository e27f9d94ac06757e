"""AWQ: activation-aware scaling for weight-only quantization (Lin et al. 2024).

Weights that meet large activations matter most. Scaling input channel j of a Linear group by
s_j = mean|x_j|^alpha before rounding protects them: the group computes (x / s)·Q(W·diag(s))ᵀ.
alpha is searched on a grid to minimise the group's output error on calibration rows; alpha = 0
is plain round-to-nearest, so the search never does worse than it on those rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .weight_only import fake_quantize_weight

GRID = 10          # alphas 0, 0.1, ..., 1
SAMPLE_ROWS = 256  # activation rows per group the search runs on


@dataclass(frozen=True)
class AwqChoice:
    scale: torch.Tensor
    alpha: float
    error_plain: float   # mean squared output error of round-to-nearest on the sample
    error: float         # the same with the chosen scale


def search_scale(rows: torch.Tensor, abs_mean: torch.Tensor, weight: torch.Tensor, bits: int,
                 group: int) -> AwqChoice:
    """The per-input-channel scale, among mean|x|^alpha, with the least output error."""
    weight = weight.float()
    reference = rows @ weight.T
    magnitude = abs_mean.float().clamp(min=1e-4)
    best = None
    for step in range(GRID + 1):
        alpha = step / GRID
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centre the scales around 1
        quantized = fake_quantize_weight(weight * scale, bits, group) / scale
        error = (rows @ quantized.T - reference).pow(2).mean().item()
        if best is None or error < best[1]:
            best = (alpha, error, scale)
        if step == 0:
            plain = error
    alpha, error, scale = best
    return AwqChoice(scale.to(weight.dtype), alpha, plain, error)
