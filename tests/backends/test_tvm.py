"""The tvm target: numerics vs eager, fallbacks and strict mode, tuning records reused from the cache."""
import logging

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.errors import UnsupportedOpError

pytest.importorskip("tvm", reason="TVM is not installed: pip install apache-tvm")

from edgepasses.backends.tvm import TVMTarget, unsupported_ops  # noqa: E402
from edgepasses.backends.tvm.build import tuning_unavailable_reason  # noqa: E402
from edgepasses.testing.unconvertible import WithMysteryOp  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tuning_from_environment(monkeypatch):
    monkeypatch.delenv("EDGEPASSES_TVM_TRIALS", raising=False)


class SmallCNN(nn.Module):
    """conv, relu, a residual add, max-pool, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        y = nn.functional.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def _graph(model, x, pipeline="dce"):
    return edgepasses.compress(model.eval(), (x,), pipeline)


def test_small_cnn_matches_eager():
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 16, 16)
    lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lowered(x + 1), model(x + 1), rtol=1e-4, atol=1e-5)  # buffers reused safely
    lowering = lowered.edge_lowering
    assert (lowering.target, lowering.precision, lowering.partitions, lowering.fallbacks) == ("tvm", "f32", 1, [])
    assert lowering.weights_mb == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 1e6)


def test_mlp_with_two_outputs_matches_eager():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(4, 12)
    lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)


def test_unconvertible_op_runs_in_pytorch_with_one_warning(caplog):
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
    warnings = [r for r in caplog.records if r.name == "edgepasses" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "edgetest.mystery.default" in message and "node mystery" in message and "has no converter" in message
    lowering = lowered.edge_lowering
    assert lowering.partitions == 2 and [f.op for f in lowering.fallbacks] == ["edgetest.mystery.default"]


def test_strict_raises_naming_the_op():
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    with pytest.raises(UnsupportedOpError, match=r"edgetest.mystery.default \(node mystery"):
        edgepasses.lower(_graph(model, x), (x,), target="tvm", strict=True)


def test_importer_message_is_parsed():
    assert unsupported_ops("Unsupported function types ['mystery.default', 'foo.Tensor']") == {
        "mystery.default", "foo.Tensor"}
    assert unsupported_ops("something else") is None


@pytest.mark.skipif(tuning_unavailable_reason() is not None, reason=str(tuning_unavailable_reason()))
def test_second_compile_reuses_tuning_records(tmp_path, caplog):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(), torch.randn(1, 16)
    gm = _graph(model, x)
    first = TVMTarget(trials=2).lower(gm, (x,), cache_dir=str(tmp_path))
    assert first.info["tuned"] and not first.info["cache_hit"]
    assert list(tmp_path.glob("*/database_tuning_record.json"))
    with caplog.at_level(logging.INFO, logger="edgepasses"):
        second = TVMTarget(trials=2).lower(gm, (x,), cache_dir=str(tmp_path))
    assert second.info["cache_hit"] and second.info["records"] == first.info["records"]
    assert any("reusing tuning records" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), rtol=1e-4, atol=1e-5)
