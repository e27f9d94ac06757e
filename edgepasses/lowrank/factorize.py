"""The math of low-rank factorisation: one projection step, three layer factorisations.

Every method is built from `Projection`: for a matrix W (m × n) whose columns meet inputs with
Gram matrix G = Σ x·xᵀ (n × n), the rank-r W' minimising the output error ‖(W − W')·L‖_F
(G = L·Lᵀ) — the truncated SVD of W·L mapped back, as in SVD-LLM — and with G = I plain
truncated SVD. It is computed from the eigendecomposition of the smaller Gram side (W·G·Wᵀ or
Lᵀ·Wᵀ·W·L), so no full SVD of a large matrix is needed, and the factors multiply back to W
exactly at full rank (an orthogonal projection, no division by singular values).

    Linear / 1×1 conv   W (out, in) ≈ B·A                    linear(in→r) → linear(r→out)
    Tucker-2 (k×k conv) W ≈ last ×₀ core ×₁ first             1×1 (C→r_in) → k×k (r_in→r_out) → 1×1
    spatial (k×k conv)  W[o,c,p,q] ≈ Σ_r H[o,r,q]·V[r,c,p]   k×1 (C→r) → 1×k (r→O)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DOUBLE_UP_TO = 2048  # larger eigenproblems run in float32: float64 costs minutes on a small CPU
TINY = 1e-6          # eigenvalues below this fraction of the largest are treated as this (scaling only)


def _work_dtype(*sides: int) -> torch.dtype:
    return torch.float64 if max(sides) <= DOUBLE_UP_TO else torch.float32


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """G + damping·mean(diag G)·I: positive definite even when the samples span few directions, and
    pulled towards the identity (plain SVD) in the directions the data never visited."""
    level = gram.diagonal().mean()
    if not torch.isfinite(level) or level <= 0:
        return torch.eye(gram.shape[0], dtype=gram.dtype)
    return gram + damping * level * torch.eye(gram.shape[0], dtype=gram.dtype)


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return values.flip(0).clamp(min=0), vectors.flip(1)


class Projection:
    """Best rank-r approximations W ≈ B·A of one matrix under one input Gram, for any r."""

    def __init__(self, matrix: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 0.01):
        m, n = matrix.shape
        self.dtype = matrix.dtype
        self.full_rank = min(m, n)
        dtype = _work_dtype(m, n)
        w = matrix.to(dtype)
        g = None if gram is None else damped(gram.to(dtype), damping)
        self._output_side = m <= n
        if self._output_side:  # eigenvectors of W·G·Wᵀ (m × m): project the outputs
            values, self._basis = _descending_eigh(w @ w.T if g is None else w @ g @ w.T)
            self._w = w
        else:  # eigenvectors of Lᵀ·Wᵀ·W·L (n × n): project the (whitened) inputs
            self._chol = None if g is None else torch.linalg.cholesky(g)
            self._wl = w if g is None else w @ self._chol
            values, self._basis = _descending_eigh(self._wl.T @ self._wl)
        values = values[:self.full_rank]
        self._values = values
        total = values.sum()
        self.energy = values.cumsum(0) / total if total > 0 else torch.ones_like(values)

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank whose kept (weighted) singular-value energy is at least `energy`."""
        return min(self.full_rank, int(torch.searchsorted(self.energy, energy - 1e-12)) + 1)

    def kept_energy(self, rank: int) -> float:
        return float(self.energy[rank - 1])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (rank × n), B (m × rank)) with B·A the best rank-`rank` approximation."""
        basis = self._basis[:, :rank]
        if self._output_side:
            # Scale the r intermediate channels to the same energy as the first one, so a per-tensor
            # activation quantizer between the factors does not starve the weak ones.
            top = self._values[0] if self._values[0] > 0 else torch.ones((), dtype=basis.dtype)
            scale = (self._values[:rank] / top).clamp(min=TINY).sqrt()
            a, b = (basis.T @ self._w) / scale[:, None], basis * scale
        else:
            a = basis.T if self._chol is None else \
                torch.linalg.solve_triangular(self._chol.T, basis, upper=True).T  # Vᵣᵀ·L⁻¹
            b = self._wl @ basis
        return a.to(self.dtype), b.to(self.dtype)


def round_rank(rank: int, full: int, round_to: int) -> int:
    """`rank` rounded up to a multiple of `round_to` (vector widths), at most `full`."""
    return max(1, min(full, math.ceil(rank / round_to) * round_to))


# ------------------------------------------------------------------ conv Gram reductions

def channel_gram(gram: torch.Tensor, channels: int, taps: int) -> torch.Tensor:
    """C × C Gram of the input channels, from the im2col Gram (C·taps square): the input a 1×1
    conv in front of the core sees, every pixel counted once per kernel tap."""
    return gram.view(channels, taps, channels, taps).diagonal(dim1=1, dim2=3).sum(-1)


def vertical_gram(gram: torch.Tensor, channels: int, kh: int, kw: int) -> torch.Tensor:
    """(C·kh)² Gram of vertical patches, summed over the kernel columns: what the k×1 factor of a
    spatial split reads. Cross terms between columns are dropped (exact when they are uncorrelated)."""
    g = gram.view(channels, kh, kw, channels, kh, kw)
    return torch.einsum("apqbrq->apbr", g).reshape(channels * kh, channels * kh)


# ------------------------------------------------------------------ the three factorisations

@dataclass
class Factors:
    """A factorised layer: the factor weights in chain order, and the dense weight they multiply to."""
    method: str                      # svd | tucker | spatial
    rank: int | tuple[int, int]      # tucker: (r_in, r_out)
    weights: list[torch.Tensor]
    approx: torch.Tensor             # same shape as the original weight
    energy: float                    # kept singular-value energy (tucker: the smaller of its two modes)
    convs: list[dict] = field(default_factory=list)  # per factor: stride/padding/dilation (convs only)


def svd_factors(weight: torch.Tensor, projection: Projection, rank: int) -> Factors:
    """Linear (out, in) or 1×1 conv (out, in, 1, 1): two layers through rank `rank`."""
    a, b = projection.factors(rank)
    shape = weight.shape
    tail = shape[2:]
    return Factors("svd", rank, [a.reshape(rank, shape[1], *tail), b.reshape(shape[0], rank, *[1] * len(tail))],
                   (b @ a).reshape(shape), projection.kept_energy(rank))


def tucker_input_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Rows (o, tap), columns input channels: the matrix whose column space the first 1×1 conv keeps."""
    out, channels = weight.shape[:2]
    return weight.permute(0, 2, 3, 1).reshape(-1, channels)


def tucker_core_gram(first: torch.Tensor, gram: torch.Tensor | None, taps: int) -> torch.Tensor | None:
    """The im2col Gram of the first factor's output, as the core conv sees it."""
    if gram is None:  # white inputs: (A·Aᵀ) ⊗ I
        inner = (first @ first.T).double()
        if torch.allclose(inner, torch.eye(inner.shape[0], dtype=inner.dtype), atol=1e-5):
            return None
        return torch.kron(inner, torch.eye(taps, dtype=inner.dtype))
    channels = first.shape[1]
    g = gram.to(first.dtype).view(channels, taps, channels, taps)
    reduced = torch.einsum("ac,cjdl,bd->ajbl", first, g, first)
    return reduced.reshape(first.shape[0] * taps, first.shape[0] * taps)


def tucker_core_projection(weight: torch.Tensor, in_projection: Projection, r_in: int,
                           gram: torch.Tensor | None, damping: float) -> tuple[torch.Tensor, Projection]:
    """Tucker-2 step one: the first 1×1 factor (r_in, C) and the projection that truncates the output
    mode of what is left (its energy picks r_out); sequentially truncated HOSVD."""
    out, channels, kh, kw = weight.shape
    first, reduced = in_projection.factors(r_in)                       # (r_in, C), (O·k², r_in)
    core_matrix = reduced.reshape(out, kh * kw, r_in).permute(0, 2, 1).reshape(out, r_in * kh * kw)
    return first, Projection(core_matrix, tucker_core_gram(first, gram, kh * kw), damping)


def tucker_factors(weight: torch.Tensor, first: torch.Tensor, in_energy: float, out_projection: Projection,
                   r_out: int) -> Factors:
    """k×k conv → 1×1 (C→r_in), k×k core (r_in→r_out), 1×1 (r_out→O)."""
    out, channels, kh, kw = weight.shape
    r_in = first.shape[0]
    core, last = out_projection.factors(r_out)                         # (r_out, r_in·k²), (O, r_out)
    core = core.reshape(r_out, r_in, kh, kw)
    approx = torch.einsum("ob,bapq,ac->ocpq", last, core, first)
    energy = min(in_energy, out_projection.kept_energy(r_out))
    return Factors("tucker", (r_in, r_out), [first.reshape(r_in, channels, 1, 1), core,
                                             last.reshape(out, r_out, 1, 1)], approx, energy)


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Rows (o, column q), columns (c, row p): W[o,c,p,q] as the matrix a k×1 → 1×k split factors."""
    out, channels, kh, kw = weight.shape
    return weight.permute(0, 3, 1, 2).reshape(out * kw, channels * kh)


def spatial_factors(weight: torch.Tensor, projection: Projection, rank: int) -> Factors:
    """k×k conv → kh×1 conv (C→rank) then 1×kw conv (rank→O)."""
    out, channels, kh, kw = weight.shape
    a, b = projection.factors(rank)                                    # (r, C·kh), (O·kw, r)
    vertical = a.reshape(rank, channels, kh, 1)
    horizontal = b.reshape(out, kw, rank).permute(0, 2, 1).reshape(out, rank, 1, kw)
    approx = torch.einsum("orq,rcp->ocpq", horizontal[:, :, 0, :], vertical[..., 0])
    return Factors("spatial", rank, [vertical, horizontal], approx, projection.kept_energy(rank))
