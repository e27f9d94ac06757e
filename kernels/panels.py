"""The panel layout `edge::int8_linear_packed` reads (csrc/int8/panel.cpp), made once when lowering.

Output channels go in panels of `PANEL` (the last one narrower, padded with zero channels to a
multiple of 8); inside a panel, step by step along K, each channel's `STEP_CODES` codes side by side,
so one 32-byte load holds 8 channels' codes of one step.

- dense: a step is 4 values of K (K padded with zeros to a multiple of 4);
- 2:4 sparse: a step is 8 values of K, two groups of 4 with two weights kept in each; the codes are
  the 4 kept weights, and `shuffle` holds, at the same offsets, the position (0..7) in the step of
  the activation each one multiplies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PANEL = 24
STEP_CODES = 4


def _padded(codes: Tensor, k_multiple: int) -> Tensor:
    n, k = codes.shape
    return F.pad(codes, (0, -k % k_multiple, 0, -n % 8))


def _interleave(rows: Tensor) -> Tensor:
    """[N8, steps, 4] per channel → panels of [steps, width, 4], flattened."""
    return torch.cat([panel.transpose(0, 1).reshape(-1) for panel in rows.split(PANEL)])


def _deinterleave(flat: Tensor, n: int, steps: int) -> Tensor:
    """The inverse of `_interleave`: [N8, steps, 4]."""
    widths = [min(PANEL, n - start) for start in range(0, n, PANEL)]
    sizes = [w * steps * STEP_CODES for w in widths]
    return torch.cat([part.reshape(steps, w, STEP_CODES).transpose(0, 1)
                      for part, w in zip(flat.split(sizes), widths)])


def packed_size(n: int, k: int, sparse: bool) -> int:
    """Bytes of the packed codes (and of `shuffle`) for an [n, k] weight."""
    n8 = -(-n // 8) * 8
    return n8 * (-(-k // 8) * 4 if sparse else -(-k // 4) * 4)


def pack_int8_panels(codes: Tensor) -> Tensor:
    """int8 weight codes [N, K] → the dense panel layout (1-D int8)."""
    padded = _padded(codes, STEP_CODES)
    return _interleave(padded.reshape(padded.shape[0], -1, STEP_CODES)).contiguous()


def at_most_2_of_4(weight: Tensor) -> bool:
    """Every group of 4 along K (zero-padded) of an [N, K] weight (codes or floats) holds at most 2
    non-zeros: 2:4 sparse."""
    padded = F.pad(weight, (0, -weight.shape[1] % 4))
    return bool(((padded.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def pack_int8_panels_24(codes: Tensor) -> tuple[Tensor, Tensor]:
    """2:4-sparse int8 codes [N, K] → (kept codes, shuffle), both 1-D in the panel layout. A group
    with fewer than two non-zeros keeps zeros to fill its two places."""
    padded = _padded(codes, 8)
    groups = padded.reshape(padded.shape[0], -1, 4)
    # the two largest |codes| of each group (the non-zeros), in position order
    kept = groups.abs().to(torch.int16).topk(2, dim=-1, sorted=False).indices.sort(dim=-1).values
    values = groups.gather(-1, kept)
    position = kept + 4 * (torch.arange(groups.shape[1]) % 2).reshape(1, -1, 1)  # the second group of a step: 4..7
    steps = groups.shape[1] // 2
    as_steps = (lambda t: t.reshape(padded.shape[0], steps, STEP_CODES))
    return (_interleave(as_steps(values)).contiguous(),
            _interleave(as_steps(position.to(torch.uint8))).contiguous())


def unpack_int8_panels(packed: Tensor, shuffle: Tensor | None, n: int, k: int) -> Tensor:
    """The [n, k] int8 codes a packed weight holds (the inverse of the two packers)."""
    n8 = -(-n // 8) * 8
    if shuffle is None:
        steps = -(-k // 4)
        return _deinterleave(packed, n8, steps).reshape(n8, -1)[:n, :k]
    steps = -(-k // 8)
    values, positions = _deinterleave(packed, n8, steps), _deinterleave(shuffle, n8, steps).long()
    dense = packed.new_zeros(n8, steps, 8)
    dense.scatter_add_(-1, positions, values)  # add: positions may repeat where a check should refuse
    return dense.reshape(n8, -1)[:n, :k]
