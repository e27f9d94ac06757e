"""Calibration under torch.compile when Dynamo splits the model into several graphs."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.analysis.sqnr import sqnr_db
from edgepasses.bench.graph_breaks import BrokenCNN
from edgepasses.errors import OptionError

pytest.importorskip("torchao")


class CachedBias(nn.Module):
    """timm EfficientFormer's pattern: a tensor derived from a parameter, cached in a dict on the first
    eval call. The second call recompiles, and that graph takes the cached tensor as an extra input."""

    def __init__(self):
        super().__init__()
        self.proj, self.bias = nn.Linear(16, 16), nn.Parameter(torch.randn(16))
        self.cache = {}

    def forward(self, x):
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.bias * 2
        return self.proj(x) + self.cache["cpu"]


def _trained_like(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2)
            module.running_mean.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    return torch.randn(2, 3, 12, 12), [(torch.randn(2, 3, 12, 12),) for _ in range(6)]


@pytest.mark.parametrize("target", ["reference", "openvino"])
def test_each_graph_is_calibrated_on_its_own_inputs_as_compress_is_without_the_break(target, data):
    if target == "openvino":
        pytest.importorskip("openvino")
    x, calibration = data
    model = _trained_like(BrokenCNN(graph_break=True))
    compilations = []
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "fold_bn,quantize", "target": target, "calibration": calibration,
        "on_compile": compilations.append})
    with torch.no_grad():
        reference, output = model(x), compiled(x)
        model.graph_break = False
        whole = edgepasses.lower(edgepasses.compress(model, (x,), "fold_bn,quantize", calibration=calibration,
                                                     target=target), (x,), target)(x)
    assert [c.graph.index for c in compilations] == [1, 2]
    first, second = (c.graph.graph_break for c in compilations)
    assert "print" in first and f'graph_breaks.py", line {BrokenCNN.forward.__code__.co_firstlineno + 3}' \
        in first and second is None
    for compilation in compilations:  # every graph got all the calibration batches, as its own inputs
        stats = compilation.report.records[-1].stats
        assert stats["layers_quantized"] == 2 and stats["calibration_batches"] == len(calibration)
    assert abs(sqnr_db(reference, output) - sqnr_db(reference, whole)) < 0.1, (sqnr_db(reference, output),
                                                                          sqnr_db(reference, whole))


def test_a_recompile_with_a_cached_module_tensor_as_input_is_calibrated():
    torch.manual_seed(0)
    model, x = CachedBias().eval(), torch.randn(4, 16)
    calibration = [(torch.randn(4, 16),) for _ in range(4)]
    compilations = []
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "quantize", "target": "reference", "calibration": calibration, "on_compile": compilations.append})
    with torch.no_grad():
        outputs = [compiled(x) for _ in range(3)]
        reference = model(x)
    assert len(compilations) == 2  # the first call fills the cache; the second graph reads it as an input
    assert all(c.report.records[-1].stats["layers_quantized"] == 1 for c in compilations)
    assert all(sqnr_db(reference, out) > 25 for out in outputs)


def test_calibration_batches_given_as_dicts_are_keyword_arguments():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, scale=None):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model, x, scale = Scaled().eval(), torch.randn(2, 8), torch.full((1,), 2.0)
    calibration = [{"x": torch.randn(2, 8), "scale": scale} for _ in range(8)]
    compilations = []
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "quantize", "target": "reference", "calibration": calibration, "on_compile": compilations.append})
    with torch.no_grad():
        assert sqnr_db(model(x, scale=scale), compiled(x, scale=scale)) > 15
    assert compilations[0].report.records[-1].stats["calibration_batches"] == len(calibration)


def test_a_graph_no_calibration_batch_reaches_is_a_clear_error(data):
    x, calibration = data
    model = _trained_like(BrokenCNN(graph_break=False))
    compiled = torch.compile(model, backend="edge", dynamic=False, options={
        "pipeline": "fold_bn,quantize", "target": "reference", "calibration": calibration})
    with torch.no_grad():
        compiled(x)
        for _ in range(2):  # and again on the next call, the same way
            with pytest.raises(OptionError, match="graph 2 of the model was not reached by any calibration batch"):
                compiled(torch.randn(1, 3, 12, 12))  # another shape: a new graph the calibration set never takes


def test_graphs_are_numbered_and_breaks_quoted_without_calibration_too(data):
    x, _ = data
    model = _trained_like(BrokenCNN(graph_break=True))
    compilations = []
    compiled = torch.compile(model, backend="edge", options={"target": "reference", "on_compile": compilations.append})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert [(c.graph.index, bool(c.graph.graph_break)) for c in compilations] == [(1, True), (2, False)]


def test_calibration_runs_in_the_grad_mode_of_the_first_call(data):
    # Dynamo guards on grad mode: calibrating under another would reach a recompiled graph, not this one
    x, calibration = data
    model = _trained_like(BrokenCNN(graph_break=False))
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "fold_bn,quantize", "target": "reference", "calibration": calibration})
    assert torch.is_grad_enabled() and compiled(x).shape == (2, 10)
