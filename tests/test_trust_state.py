"""State and staleness: buffers a model writes carry across calls on every target,
calibration leaves them as it found them, and weights replaced after compiling are an error, not
stale results."""
import logging

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.errors import StaleWeightsError, UnsupportedOpError

TARGETS = ["reference", "openvino", "tvm", "openvino,reference"]


class Counter(nn.Module):
    """`self.cnt += 1` before a Linear: eager gives 1, 2, 3 on zeros."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("cnt", torch.zeros(()))

    def forward(self, x):
        self.cnt += 1
        return self.l(x) + self.cnt


class Steps(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps.add_(1)
        return x * self.steps


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.sub = Steps()

    def forward(self, x):
        return self.sub(self.l(x))


def _skip_unavailable(target: str) -> None:
    for name in target.split(","):
        if name != "reference":
            pytest.importorskip({"tvm": "tvm", "openvino": "openvino"}[name])


def _counts(model: Counter, run, x: torch.Tensor, calls: int = 3, digits: int = 4) -> list[float]:
    return [round((run(x) - model.l(x)).mean().item(), digits) for _ in range(calls)]


@pytest.mark.parametrize("target", [*TARGETS, "reference compiled by Inductor"])
def test_buffer_mutation_carries_state_across_calls_on_every_target(target, caplog):
    target, _, inductor = target.partition(" compiled by ")
    _skip_unavailable(target)
    x = torch.zeros(1, 4)
    model = Counter().eval()
    options = {"target": target, "target_options": {"reference": {"compile": True}} if inductor else None}
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="edgepasses"):
        compiled = torch.compile(model, backend="edge", options=options)
        assert _counts(model, compiled, x) == [1.0, 2.0, 3.0]
    assert model.cnt.item() == 3  # the model's own buffer, as in eager
    if target != "reference":  # a stateless runtime: the write runs in PyTorch, named in the one warning
        message = caplog.records[-1].getMessage()
        assert "writes buffer 'cnt' in place (state kept across calls)" in message
        assert "test_trust_state.py\", line" in message  # the line of `self.cnt += 1`


@pytest.mark.parametrize("target", ["openvino", "tvm"])
def test_buffer_mutation_under_strict_is_refused_naming_the_buffer(target):
    _skip_unavailable(target)
    compiled = torch.compile(Nested().eval(), backend="edge", options={"target": target, "strict": True})
    with pytest.raises(UnsupportedOpError, match=rf"writes buffer 'sub.steps' in place .* which the {target} program "
                                                 "cannot do"), torch.no_grad():
        compiled(torch.ones(1, 4))


@pytest.mark.parametrize("target", ["openvino", "tvm"])
def test_nested_buffer_and_input_mutation_match_eager(target):
    _skip_unavailable(target)

    class AddsToInput(nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    with torch.no_grad():
        model, x = Nested().eval(), torch.ones(1, 4)
        compiled = torch.compile(model, backend="edge", options={"target": target})
        got = [compiled(x) for _ in range(3)]
        model.sub.steps.zero_()
        torch.testing.assert_close(got, [model(x) for _ in range(3)])
        eager_x, compiled_x = torch.zeros(2), torch.zeros(2)
        compiled_add = torch.compile(AddsToInput(), backend="edge", options={"target": target})
        assert [compiled_add(compiled_x).tolist() for _ in range(2)] == [AddsToInput()(eager_x).tolist()
                                                                         for _ in range(2)]
        assert compiled_x.tolist() == eager_x.tolist() == [2.0, 2.0]


def test_calibration_leaves_written_buffers_as_they_were():
    """Calibration runs the model (whole, then each graph in the passes) many times: a step counter
    must not count those runs."""
    torch.manual_seed(0)
    calibration = [(torch.randn(1, 4),) for _ in range(5)]
    x = torch.zeros(1, 4)
    with torch.no_grad():
        model = Counter().eval()
        compiled = torch.compile(model, backend="edge", options={"target": "reference", "pipeline": "sparsify_24",
                                                                  "calibration": calibration})
        assert _counts(model, compiled, x, digits=1) == [1.0, 2.0, 3.0]  # 2:4 weights: not exact
        model = Counter().eval()
        edgepasses.compress(model, (x,), pipeline="sparsify_24", calibration=calibration)
        assert model.cnt.item() == 0
        nested = Nested().eval()  # a buffer of a submodule: the graph's constant is `sub.steps`
        edgepasses.compress(nested, (x,), pipeline="sparsify_24", calibration=calibration)
        assert nested.sub.steps.item() == 0


@pytest.mark.parametrize("replace", ["parameter", "module"])
def test_weights_replaced_after_compiling_are_an_error_naming_them(replace):
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.ones(1, 4)
    with torch.no_grad():
        compiled = torch.compile(model, backend="edge", options={"target": "reference"})
        torch.testing.assert_close(compiled(x), model(x))
        if replace == "parameter":
            model[0].weight = nn.Parameter(torch.zeros(4, 4))
            named = "0.weight"
        else:
            model[0] = nn.Linear(4, 4)
            named = "0.weight, 0.bias"
        with pytest.raises(StaleWeightsError, match=rf"^{named} replaced by another tensor after torch.compile"
                                                    r"\(backend='edge'\) froze the model's weights and buffers: "
                                                    r"compile again \(torch._dynamo.reset\(\), then torch.compile\)"):
            compiled(x)
        torch._dynamo.reset()
        recompiled = torch.compile(model, backend="edge", options={"target": "reference"})
        torch.testing.assert_close(recompiled(x), model(x))


def test_a_written_buffer_replaced_by_the_user_is_an_error_but_dynamos_own_replay_is_not():
    """Dynamo replays `self.cnt += 1` by setting `cnt` to an alias of the buffer (a new object on the
    same memory) every call: that is the frozen buffer still; a tensor the user assigns is not."""
    model, x = Counter().eval(), torch.zeros(1, 4)
    with torch.no_grad():
        compiled = torch.compile(model, backend="edge", options={"target": "reference"})
        assert _counts(model, compiled, x, calls=2) == [1.0, 2.0]
        model.cnt.zero_()  # in place: the compiled program sees it
        assert _counts(model, compiled, x, calls=1) == [1.0]
        model.cnt = torch.full((), 10.0)
        with pytest.raises(StaleWeightsError, match=r"^cnt replaced by another tensor"):
            compiled(x)
