"""lowrank: exact at full rank for every method, rank rules, skips with reasons, data-aware beats plain."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.analysis.sqnr import sqnr_db
from edgepasses.errors import OptionError
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.testing import count_ops, run_pass_case

ALWAYS = "min_saving=-10"  # split even where MACs grow: full rank is for exactness checks


def _stats(gm):
    return gm.edge_report.records[-1].stats


class Mlp(nn.Module):
    def __init__(self, sizes=(32, 48, 16)):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Convs(nn.Module):
    """A strided, padded, dilated 3x3 conv and a strided 1x1 conv with padding."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.k3 = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2)
        self.k1 = nn.Conv2d(24, 32, 1, stride=2, padding=1)

    def forward(self, x):
        return self.k1(torch.relu(self.k3(x)))


def test_full_rank_svd_reproduces_linears():
    case = run_pass_case(f"lowrank(ratio=1.0,{ALWAYS})", Mlp().eval(), (torch.randn(4, 32),),
                         op_counts={"aten.linear": 4})
    layers = _stats(case.gm)["layers"]
    assert {name: (s["method"], s["rank"]) for name, s in layers.items()} == {"a": ("svd", 32), "b": ("svd", 16)}
    assert all(s["sqnr_db"] > 100 for s in layers.values())


@pytest.mark.parametrize("method, convs", [("tucker", 3 + 2), ("spatial", 2 + 2)])
def test_full_rank_conv_methods_reproduce_the_layer(method, convs):
    case = run_pass_case(f"lowrank(ratio=1.0,method={method},{ALWAYS})", Convs().eval(),
                         (torch.randn(2, 16, 11, 11),), op_counts={"aten.conv2d": convs}, rtol=1e-4, atol=1e-4)
    layers = _stats(case.gm)["layers"]
    assert layers["k3"]["method"] == method and layers["k1"]["method"] == "svd"
    assert layers["k3"]["rank"] == ([16, 24] if method == "tucker" else 48)


def test_full_rank_data_aware_reproduces_the_layers():
    x = (torch.randn(2, 16, 11, 11),)
    calibration = [(torch.randn(2, 16, 11, 11),) for _ in range(2)]
    case = run_pass_case(f"lowrank(ratio=1.0,{ALWAYS})", Convs().eval(), x, calibration=calibration,
                         rtol=1e-3, atol=1e-3)
    assert _stats(case.gm)["data_aware"] is True and _stats(case.gm)["layers_split"] == 2


def _decaying_linear(size=128, decay=0.95):
    torch.manual_seed(0)
    layer = nn.Linear(size, size)
    u, _, v = torch.linalg.svd(torch.randn(size, size))
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(decay ** torch.arange(size, dtype=torch.float32)) @ v.T)
    return layer.eval()


@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_energy_picks_the_smallest_multiple_of_8_keeping_that_energy(energy):
    layer = _decaying_linear()
    gm = edgepasses.compress(layer, (torch.randn(4, 128),), f"lowrank(energy={energy},min_saving=0)")
    (layer_stats,) = _stats(gm)["layers"].values()
    rank = layer_stats["rank"]
    kept = torch.linalg.svdvals(layer.weight.detach().double()).pow(2).cumsum(0)
    kept = kept / kept[-1]
    assert rank % 8 == 0 and layer_stats["energy"] == pytest.approx(float(kept[rank - 1]), abs=1e-4)
    assert kept[rank - 1] >= energy and (rank == 8 or kept[rank - 9] < energy)  # rounded up from the minimum


def test_a_split_that_saves_too_little_is_skipped_with_the_reason():
    model = Mlp((64, 64, 64)).eval()
    gm = edgepasses.compress(model, (torch.randn(4, 64),), "lowrank(rank=32)")  # 32·(64+64) = 64·64 MACs
    stats = _stats(gm)
    assert stats["layers_split"] == 0 and count_ops(gm)["aten.linear"] == 2
    assert stats["skipped"]["a"] == "best split (svd, rank 32) saves 0% of its MACs, below min_saving=0.25"


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, groups=4)
        self.dense = nn.Conv2d(32, 64, 3)

    def forward(self, x):
        return self.dense(self.grouped(self.depthwise(x)))


def test_grouped_and_depthwise_convs_are_skipped_with_reasons():
    gm = edgepasses.compress(Grouped().eval(), (torch.randn(1, 16, 12, 12),), f"lowrank(method=svd,{ALWAYS})")
    skipped = _stats(gm)["skipped"]
    assert skipped["depthwise"].startswith("depthwise convolution (groups=16)")
    assert skipped["grouped"].startswith("grouped convolution (groups=4)")
    assert "method=svd" in skipped["dense"]


class WeightInput(nn.Module):
    def forward(self, x, w):
        return nn.functional.linear(x, w)


def test_a_layer_whose_weight_is_no_constant_is_skipped_with_the_reason():
    gm = edgepasses.compress(WeightInput().eval(), (torch.randn(4, 32), torch.randn(64, 32)), "lowrank")
    (reason,) = _stats(gm)["skipped"].values()
    assert reason.startswith("weight is not a constant")


@pytest.mark.parametrize("pipeline, calibration, message", [
    ("lowrank(rank=20)", None, r"rank=20 is larger than layer 'b' \(weight \(16, 48\)\) allows \(svd at most 16\)"),
    ("lowrank(energy=0)", None, r"'energy' must be in \(0, 1\]; got 0"),
    ("lowrank(energy=1.5)", None, r"'energy' must be in \(0, 1\]; got 1.5"),
    ("lowrank(ratio=0)", None, r"'ratio' must be in \(0, 1\]"),
    ("lowrank(rank=8,energy=0.5)", None, "lowrank takes one of rank, ratio or energy; got rank and energy"),
    ("lowrank(data_aware=true)", None, r"lowrank\(data_aware=true\) needs calibration data"),
    ("lowrank(ignore=[nosuch])", None, "'nosuch' matched no Linear or conv"),
])
def test_bad_lowrank_input_gets_a_clear_error(pipeline, calibration, message):
    with pytest.raises(OptionError, match=message):
        edgepasses.compress(Mlp().eval(), (torch.randn(4, 32),), pipeline, calibration=calibration)


def test_stats_sqnr_is_the_layers_output_sqnr_on_the_inputs():
    layer = _decaying_linear(64)
    x = (torch.randn(16, 64),)
    gm = edgepasses.compress(layer, x, "lowrank(rank=16)")
    (stats,) = _stats(gm)["layers"].values()
    assert stats["sqnr_db"] == pytest.approx(output_sqnr(layer, gm, [x]), abs=0.05)
    assert stats["macs_before"] == 16 * 64 * 64 and stats["macs_after"] == 16 * 16 * 128


def _anisotropic(generator, rows=32, size=64):
    """Inputs with a few strong directions (as LayerNorm outliers and trained features have)."""
    basis = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(7)))[0]
    scales = 0.8 ** torch.arange(size, dtype=torch.float32)
    return (torch.randn(rows, size, generator=generator) * scales) @ basis.T


def test_data_aware_beats_plain_svd_at_equal_rank_on_anisotropic_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [(_anisotropic(g),) for _ in range(4)]
    held_out = [(_anisotropic(g),) for _ in range(4)]
    plain = edgepasses.compress(layer, calibration[0], "lowrank(rank=16,data_aware=false)")
    aware = edgepasses.compress(layer, calibration[0], "lowrank(rank=16)", calibration=calibration)
    assert _stats(aware)["data_aware"] and not _stats(plain)["data_aware"]
    assert output_sqnr(layer, aware, held_out) > output_sqnr(layer, plain, held_out) + 10.0


def test_data_aware_beats_plain_svd_on_a_bert_encoder(tiny_bert):
    model, example, calibration, evaluation = tiny_bert
    plain = edgepasses.compress(model, example, "lowrank(ratio=0.25,data_aware=false)")
    aware = edgepasses.compress(model, example, "lowrank(ratio=0.25)", calibration=calibration)
    assert _stats(aware)["layers_split"] == _stats(plain)["layers_split"] > 0
    assert output_sqnr(model, aware, evaluation) > output_sqnr(model, plain, evaluation) + 10.0


def test_factors_quantize_like_any_linear():
    pytest.importorskip("torchao")
    model = _decaying_linear(64, decay=0.8)  # rank 16 keeps all but 0.08% of the energy
    calibration = [(torch.randn(8, 64),) for _ in range(4)]
    gm = edgepasses.compress(model, calibration[0], "lowrank(rank=16),quantize", calibration=calibration)
    ops = count_ops(gm)
    assert ops["aten.linear"] == 2 and ops["quantized_decomposed.quantize_per_tensor"] >= 2
    assert output_sqnr(model, gm, calibration) > 20.0


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def test_composes_after_fold_bn_and_prune():
    x = (torch.randn(1, 3, 16, 16),)
    gm = edgepasses.compress(ConvNet().eval(), x, "fold_bn,prune(ratio=0.3),lowrank(ratio=0.25)", verify=True)
    stats = _stats(gm)
    assert stats["layers_split"] >= 1 and stats["macs_after"] < stats["macs_before"]
    assert gm(*x).shape == (1, 10)


def test_lowrank_under_torch_compile():
    model = _decaying_linear(64, decay=0.8)
    x = torch.randn(8, 64)
    seen = []
    compiled = torch.compile(model, backend="edge", options={"pipeline": "lowrank(rank=16)", "target": "reference",
                                                             "on_compile": seen.append})
    with torch.no_grad():
        assert sqnr_db(model(x), compiled(x)) > 25.0
    (stats,) = seen[0].report.records[0].stats["layers"].values()
    assert stats["rank"] == 16


def test_tucker_on_a_wide_conv_caps_the_output_rank_at_the_cores():
    # Conv2d(16, 256, 3): ratio 0.5 asks 128 output components of a core that has at most 8·9 = 72
    model, x = nn.Sequential(nn.Conv2d(16, 256, 3)).eval(), torch.randn(1, 16, 12, 12)
    gm = edgepasses.compress(model, (x,), "lowrank(ratio=0.5,method=tucker)")
    assert gm.edge_report.records[0].stats["layers_split"] == 1
    assert gm(x).shape == model(x).shape
