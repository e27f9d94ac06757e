"""Fast bias correction after PT2E, and the weight quantize-dequantize matcher it shares with GPTQ."""
import dataclasses

import pytest
import torch

from edgepasses.errors import OptionError
from edgepasses.graph_utils import constant_value
from edgepasses.passes.quantize import QuantizeOptions, resolve_setup
from edgepasses.quant import QuantCaps
from edgepasses.quant.bias_correction import correct_biases, quantized_layers
from edgepasses.quant.quantizer import quantize_graph
from edgepasses.quant.sensitivity import output_sqnr


def _quantized(model, batches, weight_qmax=127, **options):
    setup = dataclasses.replace(resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference"),
                                weight_qmax=weight_qmax)
    return quantize_graph(torch.export.export(model, batches[0]).module(), setup, batches, batches[0]).graph


def _cnn():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, bias=False),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10)).eval()


def _output_shift(model, gm, batches) -> float:
    """Norm of the per-channel mean of the quantized graph's output error."""
    with torch.no_grad():
        return torch.cat([gm(*b) - model(*b) for b in batches]).mean(0).norm().item()


def test_bias_correction_removes_most_of_the_output_shift_of_coarse_weights():
    model = _cnn()
    # Inputs of non-zero mean, and 4-bit weights ([-7, 7]): the rounding errors shift the outputs.
    batches = [(torch.rand(16, 3, 8, 8),) for _ in range(4)]
    plain, corrected = (_quantized(model, batches, weight_qmax=7, bias_correction="off") for _ in range(2))
    biases = {name: p.clone() for name, p in model.named_parameters()}
    no_bias = next(m for m in quantized_layers(corrected) if len(m.layer.args) < 3 or m.layer.args[2] is None)
    args_before = no_bias.layer.args

    assert correct_biases(corrected, batches) == 3  # every layer but the conv without a bias

    assert _output_shift(model, corrected, batches) < _output_shift(model, plain, batches) / 2
    assert output_sqnr(model, corrected, batches) >= output_sqnr(model, plain, batches)
    assert no_bias.layer.args == args_before and len(args_before) == 2  # no bias added, same weight
    for name, value in model.named_parameters():  # the new biases are new tensors
        torch.testing.assert_close(value, biases[name], rtol=0, atol=0)
    assert sum(n.op == "get_attr" and n.target.endswith("_corrected") for n in corrected.graph.nodes) == 3


def test_matcher_finds_per_channel_and_per_tensor_pairs_and_nothing_in_a_float_graph():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    batches = [(torch.randn(4, 6),)]
    per_channel = quantized_layers(_quantized(model, batches))
    per_tensor = quantized_layers(_quantized(model, batches, per_channel=False, symmetric=True))
    assert [m.axis for m in per_channel] == [0, 0] and all(m.per_channel_symmetric for m in per_channel)
    assert [m.scale.shape for m in per_channel] == [torch.Size([5]), torch.Size([3])]
    assert [(m.axis, m.scale.dim(), m.qmin, m.qmax) for m in per_tensor] == [(None, 0, -127, 127)] * 2
    assert quantized_layers(torch.export.export(model, batches[0]).module()) == []


def test_dequantized_weight_is_what_the_graph_computes():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5)).eval()
    batches = [(torch.randn(4, 6),)]
    gm = _quantized(model, batches, weight_qmax=7)
    (layer,) = quantized_layers(gm)
    with torch.no_grad():
        expected = torch.nn.functional.linear(batches[0][0], layer.dequantized_weight(gm),
                                              constant_value(gm, layer.layer.args[2]))
        torch.testing.assert_close(gm(*batches[0]), expected, rtol=0.05, atol=0.05)  # activations quantized too
    assert layer.dequantized_weight(gm).sub(model[0].weight).abs().max() <= layer.scale.max() / 2 + 1e-6


def test_no_batches_is_an_option_error():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5)).eval()
    gm = _quantized(model, [(torch.randn(4, 6),)])
    with pytest.raises(OptionError, match="calibration"):
        correct_biases(gm, [])
