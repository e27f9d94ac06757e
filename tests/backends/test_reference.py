"""The reference target runs the canonical graph in PyTorch."""
import pytest
import torch
from torch import nn

from edgepasses.errors import OptionError


def test_reference_target_matches_eager_and_says_what_ran():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    seen = []
    compiled = torch.compile(model, backend="edge", options={"target": "reference", "on_compile": seen.append})
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert seen[0].lowering.target == "reference" and seen[0].lowering.fallbacks == []
    assert [r.step for r in seen[0].report.records] == ["fold_bn", "dce"]


def test_reference_target_refuses_bf16():
    compiled = torch.compile(nn.Linear(2, 2).eval(), backend="edge", options={"target": "reference", "precision": "bf16"})
    with pytest.raises(OptionError, match="precision 'f32' only"):
        compiled(torch.randn(1, 2))
