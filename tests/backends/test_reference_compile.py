"""The reference target with `compile`: Inductor compiles the rewritten graph around our kernels."""
import logging

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.backends import get_target
from edgepasses.backends.reference import ReferenceTarget
from edgepasses.backends.reference.compile import InductorProgram
from edgepasses.errors import OptionError


def _op_calls(program, inputs) -> dict[str, int]:
    """How many times each op ran in one call of `program` (after one untimed call), by profiler name
    ("edge::int8_linear", "aten::layer_norm")."""
    with torch.no_grad():
        program(*inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            program(*inputs)
    return {event.key: event.count for event in profile.key_averages()}


def _kernel_calls(calls: dict[str, int]) -> dict[str, int]:
    return {name: count for name, count in calls.items() if name.startswith("edge::")}


def _both_ways(gm, inputs):
    interpreted = ReferenceTarget(compile=False).lower(gm, inputs)
    compiled = ReferenceTarget(compile=True).lower(gm, inputs)
    assert isinstance(interpreted, torch.fx.GraphModule) and isinstance(compiled, InductorProgram)
    assert compiled.edge_lowering == interpreted.edge_lowering
    return interpreted, compiled


def test_compiled_transformer_matches_the_interpreted_program_and_runs_our_kernels():
    from edgepasses.zoo.bert import BertConfig, BertEncoder, example_token_ids

    config = BertConfig(vocab_size=100, hidden=32, layers=1, heads=2, seq_len=8)
    batches = [(example_token_ids(config, seed=s),) for s in range(1, 7)]
    example, calibration, evaluation = batches[0], batches[:4], batches[4:]
    gm = edgepasses.compress(BertEncoder(config).eval(), example, "quantize", calibration=calibration)
    interpreted, compiled = _both_ways(gm, example)
    with torch.no_grad():
        for batch in evaluation:
            expected = interpreted(*batch)
            # Float association differs in the fused glue (LayerNorm, softmax): a value on a quantization
            # step's edge may round to the next code, one step of that layer's scale.
            torch.testing.assert_close(compiled(*batch), expected, rtol=0, atol=1e-2 * float(expected.abs().max()))
    eager_calls, compiled_calls = _op_calls(interpreted, example), _op_calls(compiled, example)
    assert _kernel_calls(compiled_calls) == _kernel_calls(eager_calls)
    linears = compiled_calls.get("edge::int8_linear", 0) + compiled_calls.get("edge::int8_linear_packed", 0)
    assert linears == 6  # q, k, v, output, two MLP layers (7-bit codes packed in panels, 8-bit as they are)
    # The glue is compiled: no LayerNorm runs as an eager ATen op any more.
    assert "aten::layer_norm" in eager_calls and "aten::layer_norm" not in compiled_calls


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        y = self.body(x)
        return self.head(y + y.relu())  # a residual-style add between quantized layers


def test_compiled_cnn_matches_the_interpreted_program_on_our_kernels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    calibration = [(torch.randn_like(x),) for _ in range(4)]
    gm = edgepasses.compress(ConvNet().eval(), (x,), "fold_bn,quantize", calibration=calibration)
    interpreted, compiled = _both_ways(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), interpreted(x), rtol=1e-5, atol=1e-5)
    calls = _kernel_calls(_op_calls(compiled, (x,)))
    assert calls == _kernel_calls(_op_calls(interpreted, (x,))) == {"edge::int8_conv2d": 2, "edge::int8_linear": 1}


def test_compile_is_a_target_option_and_off_keeps_the_graph():
    assert get_target("reference", {"reference": {"compile": True}}).compile is True
    off = get_target("reference", {"reference": {"compile": False}})
    x = torch.randn(3, 4)
    lowered = off.lower(edgepasses.compress(nn.Linear(4, 2).eval(), (x,), "dce"), (x,))
    assert isinstance(lowered, torch.fx.GraphModule) and lowered.edge_lowering.target == "reference"
    with pytest.raises(OptionError, match="compile"):
        get_target("reference", {"reference": {"compile": "yes"}})


def test_compile_is_on_by_default_outside_the_test_suite(monkeypatch):
    from edgepasses.backends import reference

    monkeypatch.setattr(reference, "COMPILE_DEFAULT", True)  # the suite's conftest turns it off
    assert get_target("reference").compile is True
    assert get_target("reference", {"reference": {"compile": False}}).compile is False


def test_a_graph_inductor_cannot_compile_warns_and_runs_op_by_op(monkeypatch, caplog):
    from edgepasses.backends.reference import compile as reference_compile

    def fails(gm, example_inputs):
        raise RuntimeError("no C++ compiler for this graph\nmore detail")

    monkeypatch.setattr(reference_compile, "compile_graph", fails)
    x = torch.randn(3, 4)
    model = nn.Linear(4, 2).eval()
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = ReferenceTarget(compile=True).lower(edgepasses.compress(model, (x,), "dce"), (x,))
    assert isinstance(lowered, torch.fx.GraphModule)
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "Inductor could not compile" in warning and "RuntimeError: no C++ compiler for this graph" in warning
    assert "more detail" not in warning
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x))
