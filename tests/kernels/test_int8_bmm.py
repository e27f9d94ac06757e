"""edge::int8_bmm (csrc/int8/bmm.cpp): a batched matmul of two quantized activations against an exact
integer reference.

The kernel quantizes both operands as torch's quantize_per_tensor does, sums Σ(qa − za)(qb − zb) in
int32 exactly and dequantizes as (float)sum · (float)(a_scale·b_scale); the reference computes the
same sums in int64 and applies the same float32 op, so outputs must be equal bit for bit. Every test
runs the AVX2 path (where the CPU has AVX2) and the portable C++ path (EDGE_KERNELS_PORTABLE=1)."""
from __future__ import annotations

import re

import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401
from edgepasses.kernels import ops
from edgepasses.kernels.ops import KernelError, KernelTypeError


def quantize_ref(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)


def assert_same(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    if not torch.equal(y, ref):
        diff = (y - ref).abs()
        raise AssertionError(f"{int((diff > 0).sum())} of {y.numel()} differ, max |diff| {diff.max().item():.3g}")


def bmm_ref(a, b, a_scale, a_zp, b_scale, b_zp, transpose_b):
    qa = quantize_ref(a, a_scale, a_zp).to(torch.int64) - a_zp
    qb = quantize_ref(b, b_scale, b_zp).to(torch.int64) - b_zp
    sums = qa @ (qb.transpose(-1, -2) if transpose_b else qb)
    return sums.float() * torch.tensor(a_scale * b_scale, dtype=torch.float32)


def operands(batch, m, k, n, transpose_b, seed, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    b_shape = (*batch, n, k) if transpose_b else (*batch, k, n)
    return torch.randn(*batch, m, k, generator=gen) * spread, torch.randn(*b_shape, generator=gen) * spread


SHAPES = [((1,), 1, 1, 1), ((1,), 5, 7, 9), ((3,), 17, 33, 31), ((2, 3), 4, 2, 16), ((), 9, 65, 18),
          ((2,), 1, 64, 130), ((96,), 64, 32, 64), ((12,), 128, 64, 128)]


@pytest.mark.parametrize("batch,m,k,n", SHAPES)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_bmm_exact(path, batch, m, k, n, transpose_b):
    a, b = operands(batch, m, k, n, transpose_b, seed=m * 1000 + k * 10 + n)
    args = (0.021, 131, 0.017, 122, transpose_b)
    assert_same(ops.int8_bmm(a, b, *args), bmm_ref(a, b, *args))


@pytest.mark.parametrize("zps", [(0, 0), (255, 255), (0, 255), (128, 3)])
def test_bmm_extreme_codes_exact(path, zps):
    """Every code at a range end: the largest centered products (±255·±255) summed over the longest K."""
    a_zp, b_zp = zps
    k = 300
    a = torch.full((2, 3, k), 1e4) * torch.tensor([1.0, -1.0]).repeat(k // 2)
    b = torch.full((2, k, 5), -1e4)
    args = (0.5, a_zp, 0.25, b_zp, False)
    assert_same(ops.int8_bmm(a, b, *args), bmm_ref(a, b, *args))


def test_bmm_saturating_inputs_exact(path):
    """Infinities and huge values clamp to the range ends, as torch's quantize_per_tensor does."""
    a, b = operands((2,), 5, 37, 19, True, seed=7)
    a[0, :, ::3] = float("inf")
    a[1, :, 1::4] = -float("inf")
    b[0, ::2, :] = 1e30
    b[1, 1::2, 5:] = -1e30
    args = (0.02, 7, 0.03, 250, True)
    assert_same(ops.int8_bmm(a, b, *args), bmm_ref(a, b, *args))


def test_bmm_longest_k_does_not_overflow(path):
    k = ops.checks.MAX_INT8_BMM_K
    a, b = torch.full((1, 1, k), 1e3), torch.full((1, 1, k), -1e3)
    out = ops.int8_bmm(a, b, 1.0, 0, 1.0, 255, True)  # every product 255·(−255)
    assert out.item() == float(torch.tensor(-255 * 255 * k, dtype=torch.float32))


def test_bmm_reads_strided_and_empty_inputs(path):
    a, b = operands((2,), 6, 10, 7, False, seed=1)
    args = (0.05, 128, 0.05, 128)
    assert_same(ops.int8_bmm(a, b.transpose(-1, -2).contiguous(), *args, True), ops.int8_bmm(a, b, *args, False))
    assert_same(ops.int8_bmm(a.transpose(-1, -2).contiguous().transpose(-1, -2), b, *args, False),
                ops.int8_bmm(a, b, *args, False))
    assert ops.int8_bmm(torch.randn(0, 3, 4), torch.randn(0, 4, 5), *args, False).shape == (0, 3, 5)
    assert ops.int8_bmm(torch.randn(2, 0, 4), torch.randn(2, 4, 5), *args, False).shape == (2, 0, 5)


@pytest.mark.parametrize("call,error,message", [
    (lambda a, b: ops.int8_bmm(a, b[..., :3, :], 0.1, 0, 0.1, 0, False), KernelError, "has K=3; a's K is 8"),
    (lambda a, b: ops.int8_bmm(a, b, 0.1, 0, 0.1, 0, True), KernelError, "read as [..., N, K]"),
    (lambda a, b: ops.int8_bmm(a, b[:1], 0.1, 0, 0.1, 0, False), KernelError, "same batch dims"),
    (lambda a, b: ops.int8_bmm(a[0, 0], b, 0.1, 0, 0.1, 0, False), KernelError, "a must have at least 2 dims"),
    (lambda a, b: ops.int8_bmm(a, b.int(), 0.1, 0, 0.1, 0, False), KernelTypeError, "b must be a floating-point"),
    (lambda a, b: ops.int8_bmm(a, b, 0.0, 0, 0.1, 0, False), KernelError, "a_scale must be finite and > 0"),
    (lambda a, b: ops.int8_bmm(a, b, 0.1, 0, float("nan"), 0, False), KernelError, "b_scale must be finite"),
    (lambda a, b: ops.int8_bmm(a, b, 0.1, 256, 0.1, 0, False), KernelError, "a_zero_point must be in [0, 255]"),
    (lambda a, b: ops.int8_bmm(a, b, 0.1, 0, 0.1, -1, False), KernelError, "b_zero_point must be in [0, 255]"),
    (lambda a, b: ops.int8_bmm(a, b[..., :0], 0.1, 0, 0.1, 0, False), KernelError, "N must be > 0"),
    (lambda a, b: ops.int8_bmm(a[..., :0], b[..., :0, :], 0.1, 0, 0.1, 0, False), KernelError,
     "K must be in [1, 33025]"),
])
def test_bmm_refuses_bad_arguments(call, error, message):
    a, b = torch.randn(2, 4, 8), torch.randn(2, 8, 5)
    with pytest.raises(error, match=r"^edge::int8_bmm: .*" + re.escape(message)):
        call(a, b)


def test_bmm_abi_refuses_short_buffers():
    """A direct C ABI call whose buffers are shorter than its shapes is refused before any read."""
    from edgepasses.kernels import abi
    from edgepasses.kernels.build import last_error, library

    a, b, out = torch.randn(2, 4, 8), torch.randn(2, 8, 5), torch.empty(2, 4, 4)
    code = library().edge_int8_bmm(*abi.buffer(a), *abi.buffer(b), 2, 4, 8, 5, 0, 0.1, 0, 0.1, 0,
                                   *abi.buffer(out), 1)
    assert code == 5 and "out" in last_error()
    code = library().edge_int8_bmm(*abi.buffer(a), *abi.buffer(b), 2, 4, 8, 5, 2, 0.1, 0, 0.1, 0,
                                   *abi.buffer(out), 1)
    assert code == 2 and "transpose_b" in last_error()


def test_bmm_traces_through_export_and_compile():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            p = ops.int8_bmm(q, k, 0.05, 128, 0.05, 128, True).softmax(-1)
            return ops.int8_bmm(p, v, 1 / 255, 0, 0.05, 128, False)

    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    exported = torch.export.export(Attention(), (q, k, v))
    assert sum(n.target == torch.ops.edge.int8_bmm.default for n in exported.graph.nodes) == 2
    assert exported.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"].shape == (2, 3, 6, 8)
    torch.testing.assert_close(exported.module()(q, k, v), Attention()(q, k, v))
    compiled = torch.compile(Attention(), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), Attention()(q, k, v))
