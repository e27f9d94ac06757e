"""A model with one op no target converts (`edgetest::mystery`), between two every target can:
what target tests use to check partitioning, the one fallback WARNING and `strict=True`.
Importing this module registers the op."""
from __future__ import annotations

import torch
from torch import nn

torch.library.define("edgetest::mystery", "(Tensor x) -> Tensor")


@torch.library.impl("edgetest::mystery", "CompositeExplicitAutograd")
def _mystery(x):
    return x * 2 + 1


@torch.library.register_fake("edgetest::mystery")
def _mystery_fake(x):
    return torch.empty_like(x)


class WithMysteryOp(nn.Module):
    """conv → relu → edgetest::mystery → mean → linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.ops.edgetest.mystery(torch.relu(self.conv(x)))
        return self.fc(y.mean((2, 3)))
