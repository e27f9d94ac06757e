"""The reference target runs the canonical graph in PyTorch."""
import pytest
import torch
from torch import nn

from edgepasses.errors import OptionError


def test_reference_target_matches_eager_and_says_what_ran():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    seen = []
    compiled = torch.compile(model, backend="edge", options={"target": "reference", "on_compile": seen.append})
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert seen[0].lowering.target == "reference" and seen[0].lowering.fallbacks == []
    assert [r.step for r in seen[0].report.records] == ["fold_bn", "dce"]


def test_reference_target_refuses_bf16():
    compiled = torch.compile(nn.Linear(2, 2).eval(), backend="edge", options={"target": "reference", "precision": "bf16"})
    with pytest.raises(OptionError, match="precision 'f32' only"):
        compiled(torch.randn(1, 2))


# ---- our kernels: what the reference target lowers to -------------------------------------------

import logging  # noqa: E402

import edgepasses  # noqa: E402
from edgepasses.errors import UnsupportedOpError  # noqa: E402
from edgepasses.kernels import ops  # noqa: E402


def _count(gm, op) -> int:
    return sum(n.target == op for n in gm.graph.nodes)


def _int8_linears(gm) -> int:
    """Linears on an int8 kernel: 7-bit codes run packed in panels (int8_linear_packed), 8-bit ones as they are."""
    return _count(gm, torch.ops.edge.int8_linear.default) + _count(gm, torch.ops.edge.int8_linear_packed.default)


def _calibration(shape, n=4):
    return [(torch.randn(*shape),) for _ in range(n)]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):  # the head reads the quantized average through a flatten, as ResNet's does
        return self.head(self.features(x))


def _close_to_fake_quant(out, reference):
    # Same integer math; only the float association of the dequantization differs.
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_graph_runs_on_int8_kernels_matching_the_fake_quant_graph(symmetric):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    pipeline = f"fold_bn,quantize(symmetric={str(symmetric).lower()})"
    gm = edgepasses.compress(ConvNet().eval(), (x,), pipeline, calibration=_calibration(x.shape))
    lowered = edgepasses.lower(gm, (x,), target="reference", strict=True)
    assert _count(lowered, torch.ops.edge.int8_conv2d.default) == 3
    assert _int8_linears(lowered) == 1
    # The conv weights are constants packed once, channels-last [O, KH, KW, C/groups], as the kernel reads them.
    conv_codes = [getattr(lowered, n.args[1].target) for n in lowered.graph.nodes
                  if n.target == torch.ops.edge.int8_conv2d.default]
    assert sorted(tuple(c.shape) for c in conv_codes) == [(8, 3, 3, 1), (8, 3, 3, 3), (16, 1, 1, 8)]
    assert lowered.edge_lowering.int8_ops == 4 and lowered.edge_lowering.fallbacks == []
    assert not any("quantize_per_channel" in str(n.target) for n in lowered.graph.nodes)
    assert any("quantize_per_channel" in str(n.target) for n in gm.graph.nodes), "the caller's graph is kept"
    with torch.no_grad():
        _close_to_fake_quant(lowered(x), gm(x))


def test_quantized_attention_matmuls_run_on_the_int8_bmm_kernel(tiny_bert):
    model, example, calibration, _ = tiny_bert
    gm = edgepasses.compress(model, example, "quantize", calibration=calibration)
    lowered = edgepasses.lower(gm, example, target="reference", strict=True)
    bmms = [n for n in lowered.graph.nodes if n.target == torch.ops.edge.int8_bmm.default]
    assert [n.args[-1] for n in bmms] == [True, False] * 2  # Q·Kᵀ reads K in place (transpose_b); P·V as it is
    assert _count(lowered, torch.ops.aten.matmul.default) == 0 and lowered.edge_lowering.fallbacks == []
    assert lowered.edge_lowering.int8_ops == len(bmms) + _int8_linears(lowered)
    with torch.no_grad():
        _close_to_fake_quant(lowered(*example), gm(*example))


class Attention(nn.Module):
    """Hand-written attention: Q·Kᵀ and P·V as torch.bmm over (batch·heads), odd sizes."""

    def __init__(self, dim=30, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4).reshape(3, b * self.heads, t, hd)
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / hd ** 0.5, -1)
        return self.out(torch.bmm(p, v).reshape(b, self.heads, t, hd).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("symmetric", [False, True])  # u8 activations, and s8 ones (their codes + 128 as u8)
def test_hand_written_attention_runs_its_bmms_on_the_int8_kernel(symmetric):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 30)
    pipeline = f"quantize(symmetric={str(symmetric).lower()})"
    gm = edgepasses.compress(Attention().eval(), (x,), pipeline, calibration=_calibration(x.shape))
    lowered = edgepasses.lower(gm, (x,), target="reference", strict=True)
    assert _count(lowered, torch.ops.edge.int8_bmm.default) == 2 and _count(lowered, torch.ops.aten.bmm.default) == 0
    assert lowered.edge_lowering.int8_ops == 4
    with torch.no_grad():
        _close_to_fake_quant(lowered(x), gm(x))


class BroadcastMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 5)

    def forward(self, x):  # [2, 8, 8] @ [8, 5]: a broadcast the bmm kernel does not take
        return torch.matmul(self.a(x), self.b(x[0]))


def test_quantized_matmul_without_an_int8_kernel_is_reported(caplog):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8)
    gm = edgepasses.compress(BroadcastMatmul().eval(), (x,), "quantize", calibration=_calibration(x.shape))
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="reference")
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "aten.matmul" in warning and "same batch dims" in warning and "float fake-quant" in warning
    assert lowered.edge_lowering.int8_ops == _int8_linears(lowered) == 2
    with torch.no_grad():
        _close_to_fake_quant(lowered(x), gm(x))
    with pytest.raises(UnsupportedOpError, match="aten.matmul"):
        edgepasses.lower(gm, (x,), target="reference", strict=True)


def test_lowrank_pairs_become_one_fused_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    gm = edgepasses.compress(model, (x,), "lowrank(rank=16,min_saving=0.1)")
    lowered = edgepasses.lower(gm, (x,), target="reference", strict=True)
    assert _count(lowered, torch.ops.edge.lowrank_linear.default) == 2
    assert _count(lowered, torch.ops.aten.linear.default) == 0
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x))


def test_24_sparse_weights_run_on_the_sparse_kernel_and_dense_ones_do_not():
    from edgepasses.bench.kernels import magnitude_24

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    with torch.no_grad():
        model[0].weight.copy_(magnitude_24(model[0].weight))
    x = torch.randn(5, 32)
    gm = edgepasses.compress(model, (x,), "dce")
    lowered = edgepasses.lower(gm, (x,), target="reference", strict=True)
    assert _count(lowered, torch.ops.edge.sparse24_linear.default) == 1
    assert _count(lowered, torch.ops.aten.linear.default) == 1
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)


def test_int8_24_sparse_linears_run_on_the_packed_sparse_kernel(caplog):
    """sparsify_24 then quantize with 7-bit weights: each Linear on int8_linear_packed with its shuffle
    (the kept half alone), matching the fake-quant graph, and no warning that 2:4 runs dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    x = torch.randn(5, 32)
    gm = edgepasses.compress(model, (x,), "sparsify_24,quantize(overflow_fix=all)", calibration=_calibration(x.shape))
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="reference", strict=True)
    packed = [n for n in lowered.graph.nodes if n.target == torch.ops.edge.int8_linear_packed.default]
    assert len(packed) == 2 and all(n.args[2] is not None for n in packed)
    assert lowered.edge_lowering.sparse24_ops == 2 and "dense" not in caplog.text
    form = "int8_linear_packed, 7-bit weights, 2:4 (kept half), u8 activations"
    assert lowered.edge_lowering.kernels == {"0": form, "2": form}
    assert lowered.edge_lowering.kernel_summary() == f"2 x {form}"
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(lowered(x), expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_int8_pipeline_compiles_end_to_end_on_the_reference_target():
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(2, 3, 12, 12)
    seen = []
    compiled = torch.compile(model, backend="edge", options={
        "target": "reference", "pipeline": "fold_bn,quantize", "calibration": _calibration(x.shape),
        "strict": True, "on_compile": seen.append})
    with torch.no_grad():
        out = compiled(x)
    assert seen[0].lowering.int8_ops == 4
    assert (out - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_edge_ops_trace_through_export_and_compile():
    codes = torch.randint(-127, 128, (6, 16), dtype=torch.int8)
    scale, sums, bias = torch.rand(6) / 100, ops.int8_weight_sum(codes), torch.randn(6)

    class UsesKernel(nn.Module):
        def forward(self, x):
            return ops.int8_linear(x, codes, scale, sums, bias, 0.05, 3, 8)

    x = torch.randn(3, 16)
    exported = torch.export.export(UsesKernel(), (x,))
    assert any(n.target == torch.ops.edge.int8_linear.default for n in exported.graph.nodes)
    compiled = torch.compile(UsesKernel(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), UsesKernel()(x))
    torch.testing.assert_close(exported.module()(x), UsesKernel()(x))
