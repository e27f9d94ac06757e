"""A BatchNorm that fold_bn cannot fold reaches torchao's convert_pt2e, whose QAT conv-bn step
strict-exports pattern graphs: quantize skips that step (same result) and keeps Dynamo's caches."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

import edgepasses  # noqa: E402
from edgepasses.quant import quantizer  # noqa: E402


class PreActivation(nn.Module):
    """A BatchNorm after a ReLU, as in DenseNet's layers: fold_bn has no conv to fold it into, so it is
    left for torchao's convert_pt2e, which strict-exports its conv-bn patterns."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.bn(torch.relu(self.conv(x)))
        return self.fc(h.mean((2, 3)))


def test_quantizing_a_graph_with_a_batchnorm_left_keeps_every_compiled_model():
    first_compiles, compiles = [], []
    other = torch.compile(nn.Linear(4, 2).eval(), backend="edge",
                          options={"target": "reference", "on_compile": first_compiles.append})
    quantized = torch.compile(PreActivation().eval(), backend="edge",
                              options={"pipeline": "fold_bn,quantize", "target": "reference",
                                       "calibration": [(torch.randn(2, 3, 8, 8),) for _ in range(3)],
                                       "on_compile": compiles.append})
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4)
    with torch.no_grad():
        other(y)
        for _ in range(3):
            quantized(x)
        other(y)
    assert [len(first_compiles), len(compiles)] == [1, 1]  # neither recompiled (nor recalibrated)


def test_convert_without_the_qat_step_is_bit_exact(monkeypatch):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model, x = PreActivation().eval(), torch.randn(2, 3, 8, 8)
    calibration = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]

    def quantized_output():
        with torch.no_grad():
            return edgepasses.compress(model, (x,), "fold_bn,quantize", calibration=calibration)(x)

    ours = quantized_output()
    monkeypatch.setattr(quantizer, "convert", lambda prepared: convert_pt2e(prepared, fold_quantize=False))
    assert torch.equal(ours, quantized_output())
