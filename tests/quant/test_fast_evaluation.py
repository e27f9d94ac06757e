"""quantize's calibration-time evaluations (bias correction's layer inputs, bias_correction=auto's SQNR
comparison, GPTQ's Hessians) run a copy of the quantized graph with each weight's quantize-dequantize
computed once: the same values as the Q/DQ graph, which re-quantizes every weight on every call."""
import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from edgepasses.analysis.observe import NodeObserver
from edgepasses.graph_utils import constant_value
from edgepasses.passes.quantize import QuantizeOptions, resolve_setup
from edgepasses.quant import QuantCaps, bias_correction, quantizer
from edgepasses.quant.bias_correction import observe_layer_inputs, quantized_layers, weights_dequantized
from edgepasses.quant.patterns import find_patterns
from edgepasses.quant.quantizer import quantize_graph

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallCNN(nn.Module):
    """Convs with and without bias, strided and dilated, a residual add and a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.wide = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.down(self.stem(x).relu()).relu()
        y = (self.wide(y) + y).relu()
        return self.head(y.mean((2, 3)))


def _batches(n: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(2, 3, 12, 12, generator=g),) for _ in range(n)]


def _setup(gm, **options):
    options = {"calib": "auto", "bias_correction": "auto", **options}
    setup = resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference", gm)
    return dataclasses.replace(setup, overflow_check=True, weight_qmax=127)


def _quantize(batches, **options):
    gm = torch.export.export(SmallCNN().eval(), batches[0]).module()
    return quantize_graph(gm, _setup(gm, **options), batches, batches[0])


def _the_qdq_graph_itself(gm):
    """What the evaluations ran before: the quantized graph as it is, its weights quantized on every call."""
    return gm, {node.name: node for node in gm.graph.nodes}


def _constants(gm) -> dict[str, torch.Tensor]:
    return {node.name: constant_value(gm, node) for node in gm.graph.nodes if node.op == "get_attr"}


@pytest.mark.parametrize("options", [{}, {"bias_correction": "on"}, {"calib": "minmax"}])
def test_quantize_gives_what_evaluating_the_qdq_graph_gave(monkeypatch, options):
    batches = _batches()
    fast = _quantize(batches, **options)
    monkeypatch.setattr(quantizer, "weights_dequantized", _the_qdq_graph_itself)
    monkeypatch.setattr(bias_correction, "weights_dequantized", _the_qdq_graph_itself)
    slow = _quantize(batches, **options)

    assert fast.steps == slow.steps and isinstance(fast.steps["biases_corrected"], (int, str))
    assert fast.graph.code == slow.graph.code
    fast_constants, slow_constants = _constants(fast.graph), _constants(slow.graph)
    assert fast_constants.keys() == slow_constants.keys()
    for name, value in fast_constants.items():  # weights, scales, zero points, corrected biases
        torch.testing.assert_close(value, slow_constants[name], rtol=0, atol=0, msg=name)


def test_the_returned_graph_keeps_its_weight_qdq_pairs():
    result = _quantize(_batches())
    layers = quantized_layers(result.graph)
    assert len(layers) == 4 and all(layer.quantize is not None for layer in layers)
    assert all(pattern.mismatch is None for pattern in find_patterns(result.graph))


def test_the_evaluation_copy_computes_the_same_outputs_without_weight_qdq():
    batches = _batches()
    gm = _quantize(batches, bias_correction="off").graph
    before = gm.code
    evaluation, node_of = weights_dequantized(gm)

    assert gm.code == before  # the graph itself is left as it is
    per_channel = [n for n in evaluation.graph.nodes if n.op == "call_function" and "per_channel" in str(n.target)]
    assert per_channel == [] and len(quantized_layers(gm)) == 4
    assert all(node_of[layer.layer.name].args[1].op == "get_attr" for layer in quantized_layers(gm))
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(evaluation(*batch), gm(*batch), rtol=0, atol=0)


def test_layer_inputs_observed_on_the_copy_are_those_of_the_qdq_graph():
    batches = _batches(2)
    gm = _quantize(batches, bias_correction="off").graph
    layers = quantized_layers(gm)
    seen = []
    observe_layer_inputs(gm, layers, batches, lambda layer, x: seen.append((layer.layer.name, x)),
                         needed_by="test")
    expected = []
    watch = {layer.layer.args[0]: (lambda name: lambda x: expected.append((name, x)))(layer.layer.name)
             for layer in layers}
    with torch.no_grad():
        for batch in batches:
            NodeObserver(gm, watch).run(*batch)
    assert [name for name, _ in seen] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
