"""fold_bn: exact, leaves no batch norm, skips what it cannot fold and says why."""
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from edgepasses import compress
from edgepasses.errors import GradientsNeededError
from edgepasses.testing import count_ops, run_pass_case
from edgepasses.testing.strategies import models


def _randomise_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(models(batch_norm=True, residual=True, concat=True, grouped=True, depthwise=True, linear_head=True))
def test_fold_bn_on_generated_models_is_exact_and_leaves_no_batch_norm(m):
    case = run_pass_case("fold_bn,dce", m.module, m.example_inputs, check_not=["batch_norm"])
    assert case.report.records[0].stats["skipped"] == 0


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(models(conv=False, mlp=True, batch_norm=True))
def test_fold_bn_on_generated_mlps(m):
    run_pass_case("fold_bn,dce", m.module, m.example_inputs, check_not=["batch_norm"])


class ConvBN(nn.Module):  # Before
    def __init__(self, bias: bool, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=bias)
        self.bn = nn.BatchNorm2d(8, affine=affine)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class ConvFolded(nn.Module):  # Expected: what fold_bn must produce, written by hand
    def __init__(self, before: ConvBN):
        super().__init__()
        bn, conv = before.bn, before.conv
        scale = (bn.weight if bn.affine else 1) / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros(8)
        self.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
        self.bias = nn.Parameter((bias - bn.running_mean) * scale + (bn.bias if bn.affine else 0))

    def forward(self, x):
        return torch.relu(nn.functional.conv2d(x, self.weight, self.bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_before_expected(bias, affine):
    before = ConvBN(bias, affine).eval()
    _randomise_bn(before.bn)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected_module = ConvFolded(before).eval()
        gm = compress(before, (x,), "fold_bn,dce")
        expected_gm = compress(expected_module, (x,), "dce")
    assert count_ops(gm) == count_ops(expected_gm)
    torch.testing.assert_close(gm(x), expected_module(x), rtol=1e-5, atol=1e-5)
    assert len(list(gm.buffers())) + len(list(gm.parameters())) == 2  # folded weight and bias only


def test_linear_batchnorm1d_folds():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()).eval()
    _randomise_bn(model[1])
    run_pass_case("fold_bn,dce", model, (torch.randn(4, 6),), check_not=["batch_norm"],
                  op_counts={"aten.linear": 1})


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # y is needed un-normalised too


def test_conv_with_other_users_is_skipped_with_reason():
    model = SharedConv().eval()
    _randomise_bn(model.bn)
    case = run_pass_case("fold_bn", model, (torch.randn(1, 3, 5, 5),))
    stats = case.report.records[0].stats
    assert stats["folded"] == 0 and stats["skipped"] == 1
    assert "other users" in next(iter(stats["skipped_nodes"].values()))
    assert case.report.records[0].modified is False


def test_training_mode_is_refused():
    with pytest.raises(GradientsNeededError, match="model.eval()"):
        compress(ConvBN(True).train(), (torch.randn(1, 3, 8, 8),), "fold_bn")
