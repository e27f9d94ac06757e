"""sparsify_24: 2 zeros in every group of 4 along the reduction dim, exactly the masked model, skips
with reasons, Wanda beats magnitude, and masks that survive quantize, lowrank and fine-tuning."""
import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import edgepasses
from edgepasses.errors import OptionError
from edgepasses.graph_utils import CONV_OPS, LINEAR_OPS, constant_value, layer_name
from edgepasses.passes.sparsify_24 import keep_2_of_4
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.testing.strategies import models


def _stats(gm):
    return next(r.stats for r in gm.edge_report.records if r.step.startswith("sparsify_24"))


def _layers(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS | CONV_OPS]


def _groups(weight: torch.Tensor) -> torch.Tensor:
    """Groups of 4 along the reduction dim (conv: input channels per tap)."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    return w.reshape(*w.shape[:-1], -1, 4)


def _masked_copy(model: nn.Module, gm) -> nn.Module:
    """The original model with each sparsified layer's weight replaced by the graph's masked one."""
    masked = copy.deepcopy(model)
    for node in _layers(gm):
        if node.meta.get("sparse24"):
            masked.get_submodule(layer_name(node)).weight.data.copy_(constant_value(gm, node.args[1]))
    return masked


@settings(max_examples=12, deadline=None, derandomize=True)
@given(models(grouped=True, depthwise=True, linear_head=True, residual=True) | models(conv=False, mlp=True))
def test_every_group_of_4_has_two_zeros_and_the_graph_is_the_masked_model(m):
    gm = edgepasses.compress(m.module, m.example_inputs, "sparsify_24")
    stats = _stats(gm)
    for node in _layers(gm):
        weight = constant_value(gm, node.args[1])
        if node.meta.get("sparse24"):
            assert ((_groups(weight) == 0).sum(-1) >= 2).all()
        else:
            assert layer_name(node) in stats["skipped"]
    assert stats["layers_sparsified"] == sum(bool(n.meta.get("sparse24")) for n in _layers(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(*m.example_inputs), _masked_copy(m.module, gm)(*m.example_inputs))


def test_keep_2_of_4_keeps_the_two_largest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 0.5]])
    assert keep_2_of_4(scores).tolist() == [[True, False, True, False, False, True, True, False]]


class Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fits = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.odd = nn.Linear(8 * 4 * 4, 6)
        self.tail = nn.Linear(6, 4)       # 6 input features: not a multiple of 4

    def forward(self, x):
        return self.tail(self.odd(self.depthwise(self.fits(x)).flatten(1)))


def test_layers_that_do_not_fit_are_skipped_with_reasons():
    x = torch.randn(2, 8, 4, 4)
    gm = edgepasses.compress(Shapes().eval(), (x,), "sparsify_24(ignore=[odd])")
    stats = _stats(gm)
    assert set(stats["layers"]) == {"fits"}
    assert stats["layers"]["fits"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "depthwise" in stats["skipped"]["depthwise"]
    assert "ignore" in stats["skipped"]["odd"]
    assert "not a multiple of 4" in stats["skipped"]["tail"]


def test_activation_criterion_needs_calibration_and_unknown_options_fail():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(OptionError, match="calibration"):
        edgepasses.compress(Shapes().eval(), (x,), "sparsify_24(criterion=activation)")
    with pytest.raises(OptionError, match="criterion"):
        edgepasses.compress(Shapes().eval(), (x,), "sparsify_24(criterion=random)")


def test_activation_aware_masks_keep_more_of_the_output_than_magnitude(tiny_bert):
    model, example, calibration, evaluation = tiny_bert
    magnitude = edgepasses.compress(model, example, "sparsify_24(criterion=magnitude)")
    wanda = edgepasses.compress(model, example, "sparsify_24", calibration=calibration)
    assert _stats(wanda)["criterion"] == "activation"
    assert output_sqnr(model, wanda, evaluation) > output_sqnr(model, magnitude, evaluation) + 1.0


def test_masks_survive_quantize_and_lowrank_runs_first(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(8, 64)
    calibration = [(torch.randn(8, 64),) for _ in range(4)]
    quantized = edgepasses.compress(model, (x,), "sparsify_24,quantize", calibration=calibration)
    assert all(n.meta.get("sparse24") for n in _layers(quantized))
    weight_quant = [n for n in quantized.graph.nodes if "quantize_per_channel" in str(n.target)
                    and "dequantize" not in str(n.target)]
    for node in weight_quant:
        assert ((_groups(constant_value(quantized, node.args[0])) == 0).sum(-1) >= 2).all()
    factored = edgepasses.compress(model, (x,), "lowrank(rank=16,min_saving=0),sparsify_24")
    assert _stats(factored)["layers_sparsified"] == 3  # both factors of the first layer, and the second
    with pytest.raises(OptionError, match="pass 'lowrank' must run before 'sparsify_24'"):
        edgepasses.compress(model, (x,), "sparsify_24,lowrank(rank=16,min_saving=0)")


def test_finetuning_keeps_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    gm = edgepasses.compress(model, (x,), "sparsify_24")
    zeros = {n.name: constant_value(gm, n.args[1]) == 0 for n in _layers(gm)}
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    edgepasses.finetune(gm, data, steps=20, lr=1e-2)
    for node in _layers(gm):
        weight = constant_value(gm, node.args[1])
        assert (weight[zeros[node.name]] == 0).all()
        assert not torch.equal(weight == 0, torch.ones_like(weight, dtype=torch.bool))


def test_openvino_says_2_4_brings_no_speed_there(caplog):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    x = torch.randn(2, 16)
    gm = edgepasses.compress(model, (x,), "sparsify_24")
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="openvino")
    assert any("2:4-sparse" in r.getMessage() and "dense" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(torch.as_tensor(lowered(x)), gm(x), rtol=1e-4, atol=1e-4)


def test_with_data_the_removed_weights_mean_contribution_moves_into_the_bias():
    torch.manual_seed(0)
    model = nn.Linear(32, 8).eval()
    batches = [(torch.rand(64, 32) + 1.0,) for _ in range(4)]  # inputs with a large mean, like post-ReLU
    plain_gm = edgepasses.compress(model, batches[0], "sparsify_24(criterion=magnitude)")
    aware_gm = edgepasses.compress(model, batches[0], "sparsify_24", calibration=batches)
    with torch.no_grad():  # errors over the calibration data (graphs are specialised to batches of 64)
        plain = torch.cat([plain_gm(x) - model(x) for x, in batches])
        aware = torch.cat([aware_gm(x) - model(x) for x, in batches])
    assert plain.mean(0).abs().max() > 0.05
    assert aware.mean(0).abs().max() < 1e-5
    assert aware.square().mean() < plain.square().mean()
