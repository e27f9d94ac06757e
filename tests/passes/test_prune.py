"""prune: dependency-aware structured pruning gives a smaller dense graph with true shapes.

Exactness tests zero the channels the criterion should drop (weights and bias 0, so they
carry exactly 0 downstream): removing them must then leave the outputs unchanged, which
only holds when every consumer, follower and shape argument was sliced consistently.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgepasses
from edgepasses.analysis.flops import count_cost
from edgepasses.analysis.shape_prop import verify_graph
from edgepasses.zoo.bert import BertConfig, BertEncoder
from edgepasses.errors import OptionError
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.testing import run_pass_case
from edgepasses.testing.strategies import models


def _zero_out(layer: nn.Module, channels) -> None:
    with torch.no_grad():
        layer.weight[list(channels)] = 0
        if layer.bias is not None:
            layer.bias[list(channels)] = 0


def _prune(model, inputs, pipeline, calibration=None):
    with torch.no_grad():
        expected = model(*inputs)
        gm = edgepasses.compress(model, inputs, pipeline, calibration=calibration, verify=True)
        actual = gm(*inputs)
    verify_graph(gm, inputs)
    return gm, gm.edge_report.records[-1].stats, expected, actual


def _assert_smaller(stats):
    assert stats["params_after"] < stats["params_before"]
    assert stats["macs_after"] < stats["macs_before"]


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.body(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def test_ratio_zero_leaves_the_graph_and_numerics_as_they_were():
    case = run_pass_case("prune(ratio=0)", ResidualCNN().eval(), (torch.randn(2, 3, 8, 8),))
    assert not case.report.records[0].modified
    assert case.report.records[0].stats["channels_removed"] == {}


def _random_batches(like: tuple, n: int = 2) -> list[tuple]:
    return [tuple(torch.randn_like(x) for x in like) for _ in range(n)]


# Zeroed channels carry exactly 0, so the data-aware criterion measures E[x²] = 0 for them too and
# must drop the same channels: this holds its reader-to-channel mapping (flatten, residual, groups).
@pytest.mark.parametrize("criterion", ["l1", "activation"])
def test_residual_members_are_pruned_together_and_flatten_maps_to_linear_columns(criterion):
    model = ResidualCNN().eval()
    _zero_out(model.body[0], range(8))                 # the block's hidden channels 0..7
    _zero_out(model.stem, range(4, 12))                 # the residual stream's channels 4..11 in every member
    _zero_out(model.body[2], range(4, 12))
    x = (torch.randn(2, 3, 8, 8),)
    gm, stats, expected, actual = _prune(model, x, f"prune(ratio=0.5,criterion={criterion})", _random_batches(x))
    assert stats["channels_removed"] == {"stem+body.2": "8 of 16 removed", "body.0": "8 of 16 removed"}
    assert stats["left_whole"] == {"head": "model output (linear)"}
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    _assert_smaller(stats)


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(18).eval()
        self.out = nn.Conv2d(18, 5, 1)

    def forward(self, x):  # the model input sits between the two producers; a slice drops a's first two
        return self.out(self.bn(torch.cat([torch.relu(self.a(x)), x, torch.relu(self.b(x))], 1)[:, 2:]))


def test_concat_ranges_map_to_their_producers_and_unfolded_batch_norms_follow():
    model = ConcatNet().eval()
    with torch.no_grad():  # a batch norm that maps 0 to 0, so zeroed channels stay zero through it
        model.bn.running_mean.zero_()
        model.bn.bias.zero_()
    _zero_out(model.a, [1, 3, 5, 7])
    _zero_out(model.b, [0, 1, 2, 3])
    gm, stats, expected, actual = _prune(model, (torch.randn(2, 4, 6, 6),), "prune(ratio=0.5)")
    assert stats["channels_removed"] == {"a": "4 of 8 removed", "b": "4 of 8 removed"}
    out = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default][-1]
    assert tuple(out.args[1].meta["val"].shape[:2]) == (5, 3 + 4 + 4)  # a's 2, 4, 6 after the slice; x; b's 4
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    _assert_smaller(stats)


class DepthwiseGroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.expand = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        return self.out(torch.relu(self.grouped(torch.relu(self.dw(torch.relu(self.expand(x)))))))


@pytest.mark.parametrize("criterion", ["l1", "activation"])
def test_depthwise_follows_its_input_and_grouped_convs_keep_equal_groups(criterion):
    model = DepthwiseGroupedNet().eval()
    _zero_out(model.expand, [j + 4 * g for g in range(4) for j in (0, 1)])  # the same 2 of 4 in each group
    _zero_out(model.grouped, [j + 4 * g for g in range(4) for j in (2, 3)])
    x = (torch.randn(1, 3, 8, 8),)
    gm, stats, expected, actual = _prune(model, x, f"prune(ratio=0.5,criterion={criterion})", _random_batches(x))
    assert stats["channels_removed"] == {"expand": "8 of 16 removed", "grouped": "8 of 16 removed"}
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert [tuple(n.args[1].meta["val"].shape[:2]) for n in convs] == [(8, 3), (8, 1), (8, 2), (6, 8)]
    assert [n.args[6] for n in convs if len(n.args) > 6] == [8, 4]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    _assert_smaller(stats)


def test_linear_mlp_hidden_units_and_ignore():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    _zero_out(model[0], range(0, 32, 2))
    x = (torch.randn(5, 12),)
    gm, stats, expected, actual = _prune(model, x, "prune(ratio=0.5,round_to=8)")
    assert stats["channels_removed"] == {"0": "16 of 32 removed", "2": "8 of 24 removed"}  # 12 kept -> 16
    assert actual.shape == expected.shape
    _assert_smaller(stats)
    _, kept, _, _ = _prune(model, x, "prune(ratio=0.5,ignore=['2'])")
    assert kept["channels_removed"] == {"0": "16 of 32 removed"}
    assert kept["left_whole"]["2"] == "ignored layer 2"


@pytest.mark.parametrize("criterion", ["l1", "activation"])
def test_bert_drops_whole_heads_and_mlp_units_and_keeps_the_residual_stream(criterion):
    config = BertConfig(vocab_size=200, hidden=64, layers=2, heads=4, seq_len=16)
    model = BertEncoder(config).eval()
    for layer in model.layers:  # heads 2 and 3 and half the MLP units contribute exactly 0
        for proj in (layer.attention.query, layer.attention.key, layer.attention.value):
            _zero_out(proj, range(32, 64))
        _zero_out(layer.mlp[0], range(128, 256))
    tokens = (torch.randint(0, 200, (2, 16)),)
    calibration = [(torch.randint(0, 200, (2, 16)),) for _ in range(2)]
    gm, stats, expected, actual = _prune(model, tokens, f"prune(ratio=0.5,round_to=8,criterion={criterion})",
                                         calibration)
    heads = "layers.0.attention.query+layers.0.attention.key+layers.0.attention.value"
    assert stats["channels_removed"][heads] == "32 of 64 removed"
    assert stats["channels_removed"]["layers.0.mlp.0"] == "128 of 256 removed"
    assert "aten.layer_norm.default" in stats["left_whole"]["layers.0.mlp.2"]
    views = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
    assert [2, 16, 2, 16] in views  # (batch, seq, heads, head_dim): two heads left
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    _assert_smaller(stats)


class TwoBatchNorms(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn_a = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 2, 1)
        with torch.no_grad():
            self.bn_a.weight[:8] = 0.01   # a's channels 0..7 barely matter
            self.bn_b.weight[:] = 0.01    # every channel of b matters equally little

    def forward(self, x):
        return self.out(torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))))


def test_bn_gamma_ranks_by_the_batch_norm_and_global_ranking_compares_across_groups():
    model = TwoBatchNorms().eval()
    x = (torch.randn(1, 3, 6, 6),)
    gm, stats, _, _ = _prune(model, x, "prune(ratio=0.5,criterion=bn_gamma)")
    first = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    torch.testing.assert_close(getattr(gm, first.args[1].target), model.a.weight[8:])
    # globally, a's weak half is what goes first: relative to its group, b has no weak channels
    _, ranked, _, _ = _prune(model, x, "prune(ratio=0.25,criterion=bn_gamma,global_ranking=true)")
    assert ranked["channels_removed"] == {"a": "8 of 16 removed"}


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.roll(self.b(torch.relu(self.a(x))), 1, dims=1))


def test_an_unknown_op_leaves_its_group_whole_and_says_why():
    gm, stats, expected, actual = _prune(Rolled().eval(), (torch.randn(1, 3, 4, 4),), "prune(ratio=0.5)")
    assert stats["left_whole"]["b"] == "aten.roll.default at roll"
    assert stats["channels_removed"] == {"a": "4 of 8 removed"}
    assert actual.shape == expected.shape


class ScaledInputsMLP(nn.Module):
    """Inputs 0..7 are 400x larger than inputs 8..15, and the hidden units reading them have 20x
    smaller weights: weight norms rank the units backwards, their outputs do not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)
        with torch.no_grad():
            reads = torch.arange(32) % 16
            self.fc1.weight.mul_(0.001)[torch.arange(32), reads] = torch.where(reads < 8, 0.05, 1.0)
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    @staticmethod
    def batches(n: int, seed: int) -> list[tuple]:
        scale = torch.cat([torch.full((8,), 20.0), torch.full((8,), 0.05)])
        generator = torch.Generator().manual_seed(seed)
        return [(torch.randn(8, 16, generator=generator) * scale,) for _ in range(n)]


def test_activation_criterion_beats_weight_norms_where_input_scales_differ():
    model = ScaledInputsMLP().eval()
    calibration, held_out = model.batches(4, seed=1), model.batches(8, seed=2)
    sqnr = {}
    for criterion in ("l1", "activation"):
        gm, stats, _, _ = _prune(model, calibration[0], f"prune(ratio=0.5,criterion={criterion})", calibration)
        assert stats["channels_removed"] == {"fc1": "16 of 32 removed"}
        assert stats["criterion"] == criterion
        assert stats["calibration_batches"] == (4 if criterion == "activation" else 0)
        sqnr[criterion] = output_sqnr(model, gm, held_out)
    assert sqnr["activation"] > 20 and sqnr["activation"] > sqnr["l1"] + 20, sqnr  # measured 25.6 vs 0.7 dB


@pytest.mark.parametrize("pipeline, message", [
    ("prune(ratio=1.0)", r"'ratio' must be in \[0, 1\); got 1.0"),
    ("prune(ratio=-0.1)", r"'ratio' must be in \[0, 1\)"),
    ("prune(criterion=l3)", "must be one of 'l1', 'l2', 'bn_gamma', 'activation'"),
    ("prune(criterion=activation)", r"prune\(criterion=activation\) needs calibration data: pass calibration="),
    ("prune(round_to=0)", "'round_to' must be >= 1"),
    ("prune(ignore=[nothing])", "matched no conv or linear"),
    ("prune(ratio=0.95)", "would leave 0 of 8 channel units in group 'a'"),
])
def test_bad_options_say_what_is_wrong(pipeline, message):
    with pytest.raises(OptionError, match=message):
        edgepasses.compress(Rolled().eval(), (torch.randn(1, 3, 4, 4),), pipeline)


def _dangling(gm):
    """Computations nobody reads, and constants the pass added but nothing reads."""
    return [n.name for n in gm.graph.nodes if not n.users and
            (n.op == "call_function" or (n.op == "get_attr" and n.target.endswith("_pruned")))]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(models(batch_norm=True, residual=True, concat=True, grouped=True, depthwise=True, linear_head=True)
       | models(conv=False, mlp=True, batch_norm=True),
       st.sampled_from([0.0, 0.25, 0.5, 0.75]), st.sampled_from(["", "fold_bn,"]))
def test_any_ratio_keeps_output_shapes_and_never_adds_flops(m, ratio, fold):
    with torch.no_grad():
        expected = m.module(*m.example_inputs)
        gm = edgepasses.compress(m.module, m.example_inputs, f"{fold}prune(ratio={ratio},round_to=2)", verify=True)
        actual = gm(*m.example_inputs)
    stats = gm.edge_report.records[-1].stats
    assert actual.shape == expected.shape
    assert not _dangling(gm)
    assert stats["macs_after"] <= stats["macs_before"] and stats["macs_after"] == count_cost(gm).macs
    if ratio == 0.0:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
