"""GPTQ rounding on PT2E's per-channel grid: the algorithm alone, and on a quantized graph."""
import dataclasses

import pytest
import torch

from edgepasses.errors import OptionError
from edgepasses.passes.quantize import QuantizeOptions, resolve_setup
from edgepasses.quant import QuantCaps
from edgepasses.quant.bias_correction import quantized_layers
from edgepasses.quant.gptq import apply_gptq, gptq_round
from edgepasses.quant.quantizer import quantize_graph
from edgepasses.quant.sensitivity import output_sqnr


def _correlated(n: int, features: int, generator) -> torch.Tensor:
    """Inputs whose features mix a few strong directions: what lets GPTQ cancel errors."""
    mix = torch.randn(features, features, generator=generator) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(n, features, generator=generator) @ mix


def _nearest(weight, scale, qmax):
    return torch.clamp(torch.round(weight / scale[:, None]), -qmax, qmax)


def _problem(qmax):
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(16, 32, generator=g), _correlated(512, 32, g)
    return weight, x, 2 / len(x) * x.T @ x, weight.abs().amax(1) / qmax


@pytest.mark.parametrize("qmax", [7, 127])
def test_gptq_output_error_is_clearly_below_nearest_rounding(qmax):
    weight, x, hessian, scale = _problem(qmax)
    codes = gptq_round(weight, hessian, scale, qmax)

    def error(c):
        return (x @ weight.T - x @ (c * scale[:, None]).T).norm()

    assert torch.equal(codes, codes.round()) and codes.abs().max() <= qmax
    assert error(codes) < 0.9 * error(_nearest(weight, scale, qmax))


def test_gptq_with_an_identity_hessian_is_nearest_rounding():
    weight, _, _, scale = _problem(15)
    assert torch.equal(gptq_round(weight, torch.eye(32), scale, 15), _nearest(weight, scale, 15))


def test_lazy_block_updates_give_the_codes_of_one_block():
    weight, _, hessian, scale = _problem(15)
    small_blocks = gptq_round(weight, hessian, scale, 15, block_size=5)
    assert (small_blocks == gptq_round(weight, hessian, scale, 15, block_size=32)).float().mean() > 0.99


def test_inputs_that_are_always_zero_get_code_zero():
    weight, x, _, scale = _problem(15)
    x[:, 3] = 0
    codes = gptq_round(weight, 2 / len(x) * x.T @ x, scale, 15)
    assert not codes[:, 3].any()


def _quantized(model, batches, weight_qmax):
    setup = dataclasses.replace(resolve_setup(QuantizeOptions(bias_correction="off"), QuantCaps(), "reference"),
                                weight_qmax=weight_qmax)
    return quantize_graph(torch.export.export(model, batches[0]).module(), setup, batches, batches[0]).graph


def test_apply_gptq_raises_held_out_sqnr_with_codes_the_graph_reproduces():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(0)
    mix = _correlated(32, 32, g)  # one input distribution for calibration and evaluation
    calibration, evaluation = ([(torch.randn(64, 32, generator=g) @ mix,) for _ in range(4)] for _ in range(2))
    plain, rounded = _quantized(model, calibration, 15), _quantized(model, calibration, 15)

    assert apply_gptq(rounded, calibration) == 3

    assert output_sqnr(model, rounded, evaluation) > output_sqnr(model, plain, evaluation) + 2.0
    for layer in quantized_layers(rounded):  # the graph's quantize gives back GPTQ's codes exactly
        weight = layer.float_weight(rounded)
        codes = layer.quantize.target(weight, layer.scale, layer.zero_point, 0, -15, 15, torch.int8)
        assert torch.equal(codes.float() * layer.scale[:, None], weight)
        assert torch.equal(layer.dequantized_weight(rounded), weight)


def test_apply_gptq_leaves_convolutions_and_the_callers_weights_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 5)).eval()
    batches = [(torch.rand(8, 3, 6, 6),)]
    gm = _quantized(model, batches, 127)
    conv_weight = next(m.weight for m in quantized_layers(gm) if m.layer.target is torch.ops.aten.conv2d.default)
    before = [p.clone() for p in model.parameters()]

    assert apply_gptq(gm, batches) == 1

    conv = next(m for m in quantized_layers(gm) if m.layer.target is torch.ops.aten.conv2d.default)
    assert conv.weight is conv_weight
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_no_batches_is_an_option_error():
    gm = _quantized(torch.nn.Sequential(torch.nn.Linear(6, 5)).eval(), [(torch.randn(4, 6),)], 127)
    with pytest.raises(OptionError, match="calibration"):
        apply_gptq(gm, [])
