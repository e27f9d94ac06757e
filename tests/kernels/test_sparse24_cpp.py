"""edge::sparse24_linear on float32 values (csrc/sparse24.cpp) and the 2:4 packing it reads.

The kernel multiplies only the kept weights, in its own summation order, so outputs are compared
with the dense masked matmul in float64 within a float32 tolerance relative to Σ|x||w|. Every
kernel test runs both the AVX2 path (where the CPU has AVX2) and the portable C++ path
(EDGE_KERNELS_PORTABLE=1). Shapes cover both AVX2 kernels (M < 3: dot products; M >= 3: the
weight-stationary kernel with M-blocks of 32 rows and their tails), odd N, and K = 4, 12, ...
(a trailing index byte with only its low nibble)."""
from __future__ import annotations

import ctypes

import pytest
import torch
from edgepasses.kernels import ops
from edgepasses.kernels.build import library
from edgepasses.kernels.ops import KernelError
from hypothesis import given, settings
from hypothesis import strategies as st

PATHS = ["avx2", "portable"]


def set_path(mp: pytest.MonkeyPatch, path: str) -> None:
    if path == "portable":
        mp.setenv("EDGE_KERNELS_PORTABLE", "1")
    else:
        mp.delenv("EDGE_KERNELS_PORTABLE", raising=False)


def random_24(n: int, k: int, gen: torch.Generator, max_kept: int = 2) -> torch.Tensor:
    """A [n, k] weight with at most 2 non-zeros per group of 4 along k (some groups fewer)."""
    w = torch.randn(n, k // 4, 4, generator=gen)
    ranks = torch.rand(n, k // 4, 4, generator=gen).argsort(-1).argsort(-1)
    kept = torch.randint(0, max_kept + 1, (n, k // 4, 1), generator=gen)
    kept = torch.where(torch.rand(n, k // 4, 1, generator=gen) < 0.8, torch.full_like(kept, max_kept), kept)
    return torch.where(ranks < kept, w, torch.zeros_like(w)).reshape(n, k)


def assert_close_to_dense(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    x2 = x.reshape(-1, w.shape[1]).double()
    ref = x2 @ w.double().T
    scale = x2.abs() @ w.double().abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.shape[0])
    err = (y.reshape(ref.shape).double() - ref).abs()
    bad = err > 1e-5 * scale + 1e-30
    assert not bad.any(), f"max error {err.max().item():.3g} at {bad.nonzero()[0].tolist()}"


shapes = st.tuples(
    st.one_of(st.sampled_from([1, 2, 3, 5, 8, 17, 33, 71]), st.integers(1, 80)),  # M
    st.one_of(st.sampled_from([4, 8, 12, 20, 36]), st.integers(1, 48).map(lambda g: 4 * g)),  # K
    st.one_of(st.sampled_from([1, 3, 7, 9, 33]), st.integers(1, 70)),  # N
)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes, with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_dense_masked_matmul(path, shape, with_bias, seed):
    m, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    w = random_24(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    with pytest.MonkeyPatch.context() as mp:
        set_path(mp, path)
        y = ops.sparse24_linear(x, *ops.pack_sparse24(w), bias, None, None, 0)
    assert_close_to_dense(y, x, w, bias)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,k,n", [(1, 4096, 96), (2, 1028, 40), (16, 1024, 72), (40, 516, 33), (128, 512, 64),
                                   (97, 4, 5), (65, 12, 300)])
def test_larger_shapes(path, m, k, n, monkeypatch):
    set_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    w = random_24(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    assert_close_to_dense(ops.sparse24_linear(x, *ops.pack_sparse24(w), bias, None, None, 0), x, w, bias)


@pytest.mark.parametrize("path", PATHS)
def test_batched_input_and_no_bias(path, monkeypatch):
    set_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(3)
    w = random_24(24, 64, gen)
    x = torch.randn(2, 5, 64, generator=gen)
    assert_close_to_dense(ops.sparse24_linear(x, *ops.pack_sparse24(w), None, None, None, 0), x, w, None)


def call_kernel(x, values, indices, bias, threads: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], values.shape[0])
    buf = lambda t: (None, 0) if t is None else (ctypes.c_void_p(t.data_ptr()), t.numel() * t.element_size())
    code = library().edge_sparse24_linear_f32(*buf(x), x.shape[0], x.shape[1], *buf(values), *buf(indices),
                                              values.shape[0], *buf(bias), *buf(out), threads)
    assert code == 0
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,n", [(1, 37), (5, 3), (40, 2), (70, 130)])
def test_thread_count_does_not_change_the_result(path, m, n, monkeypatch):
    """Each output element is summed by one thread in a fixed order, whatever the split."""
    set_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(m + n)
    w = random_24(n, 92, gen)
    values, indices = ops.pack_sparse24(w)
    x, bias = torch.randn(m, 92, generator=gen), torch.randn(n, generator=gen)
    outs = [call_kernel(x, values, indices, bias, t) for t in (1, 2, 3)]
    assert_close_to_dense(outs[0], x, w, bias)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 9), groups=st.integers(1, 13), max_kept=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(n, groups, max_kept, seed):
    k = 4 * groups
    w = random_24(n, k, torch.Generator().manual_seed(seed), max_kept)
    values, indices = ops.pack_sparse24(w)
    assert values.shape == (n, k // 2) and values.dtype == w.dtype
    assert indices.shape == (n, (groups + 1) // 2) and indices.dtype == torch.uint8
    nibbles = torch.stack([indices & 0xF, indices >> 4], -1).reshape(n, -1)[:, :groups]
    assert ((nibbles & 3) < (nibbles >> 2)).all()  # i0 < i1
    dense = ops.unpack_sparse24(values, indices, k)
    assert torch.equal(dense, w)
    assert ((dense.reshape(n, groups, 4) == 0).sum(-1) >= 2).all()


def test_reduction_dim_not_a_multiple_of_4_raises():
    with pytest.raises(KernelError):
        ops.pack_sparse24(torch.zeros(3, 6))
    # values [N, 3] mean K = 6: the kernel itself rejects it.
    with pytest.raises(KernelError):
        ops.sparse24_linear(torch.randn(2, 6), torch.randn(3, 3), torch.zeros(3, 1, dtype=torch.uint8), None,
                            None, None, 0)
    with pytest.raises(KernelError):  # x's last dim does not match the weight's K
        ops.sparse24_linear(torch.randn(2, 12), *ops.pack_sparse24(torch.zeros(3, 8)), None, None, None, 0)


def test_more_than_two_nonzeros_per_group_raises():
    with pytest.raises(KernelError):
        ops.pack_sparse24(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
