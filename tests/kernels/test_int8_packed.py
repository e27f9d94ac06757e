"""edge::int8_linear_packed (csrc/int8/panel.cpp): 7-bit codes in panels, dense and 2:4 sparse.

It must give int8_linear's result on the unpacked codes bit for bit (the same integer sums, the same
float32 dequant ops), on both CPU paths, for any shape (panel and step tails) and quantization."""
from __future__ import annotations

import pytest
import torch
from edgepasses.kernels import ops, panels
from edgepasses.kernels.ops import KernelError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_int8_cpp import assert_same, linear_ref, random_weight


def keep_2_of_4(codes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`codes` with two of every four along K zeroed at random (some groups keep fewer: zeros)."""
    n, k = codes.shape
    groups = torch.nn.functional.pad(codes, (0, -k % 4)).reshape(n, -1, 4)
    drop = torch.rand(groups.shape, generator=gen).argsort(-1)[..., :2]
    return groups.scatter(-1, drop, 0).reshape(n, -1)[:, :k].contiguous()


def packed_call(x, codes, bias, x_scale, zp, sparse, gen):
    w_scale = torch.rand(codes.shape[0], generator=gen) * 0.02 + 1e-3
    sums = ops.int8_weight_sum(codes)
    values, shuffle = panels.pack_int8_panels_24(codes) if sparse else (panels.pack_int8_panels(codes), None)
    y = ops.int8_linear_packed(x, values, shuffle, codes.shape[0], w_scale, sums, bias, x_scale, zp)
    return y, ops.int8_linear(x, codes, w_scale, sums, bias, x_scale, zp, 7), linear_ref(x, codes, w_scale, bias,
                                                                                        x_scale, zp)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the env var holds for every example
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 60), sparse=st.booleans(), dynamic=st.booleans(),
       with_bias=st.booleans(), zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_packed_small_shapes_exact(path, m, k, n, sparse, dynamic, with_bias, zp, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = random_weight(n, k, 7, gen)
    codes = keep_2_of_4(codes, gen) if sparse else codes
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen) if with_bias else None
    y, unpacked, ref = packed_call(x, codes, bias, None if dynamic else 0.05, zp, sparse, gen)
    assert_same(y, unpacked)
    assert_same(y, ref)


@pytest.mark.parametrize("m,k,n", [(130, 384, 100), (4, 1030, 17), (33, 96, 48), (1, 768, 24), (9, 8, 25)])
@pytest.mark.parametrize("sparse", [False, True])
def test_packed_larger_shapes_exact(path, m, k, n, sparse):
    gen = torch.Generator().manual_seed(m * k + n)
    codes = random_weight(n, k, 7, gen)
    codes = keep_2_of_4(codes, gen) if sparse else codes
    y, unpacked, _ = packed_call(torch.randn(2, m, k, generator=gen), codes, torch.randn(n, generator=gen), 0.04,
                                 131, sparse, gen)
    assert y.shape == (2, m, n)
    assert_same(y, unpacked)


@pytest.mark.parametrize("sparse", [False, True])
def test_extreme_codes_exact(path, sparse):
    """|w| = 64 and activations at 0 and 255: the largest 16-bit pair sums stay exact."""
    codes = torch.full((16, 64), 64, dtype=torch.int8)
    codes[::2] = -64
    gen = torch.Generator().manual_seed(0)
    codes = keep_2_of_4(codes, gen) if sparse else codes
    x = torch.full((5, 64), 100.0)
    x[1] = -100.0
    y, unpacked, _ = packed_call(x, codes, None, 0.1, 0, sparse, gen)
    assert_same(y, unpacked)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 9), (24, 8), (25, 33), (49, 130)])
def test_packing_round_trips(n, k):
    gen = torch.Generator().manual_seed(n + k)
    codes = random_weight(n, k, 7, gen)
    packed = panels.pack_int8_panels(codes)
    assert packed.numel() == panels.packed_size(n, k, False)
    assert torch.equal(panels.unpack_int8_panels(packed, None, n, k), codes)
    sparse = keep_2_of_4(codes, gen)
    assert panels.at_most_2_of_4(sparse) and (n * k < 8 or not panels.at_most_2_of_4(codes))
    values, shuffle = panels.pack_int8_panels_24(sparse)
    assert values.numel() == shuffle.numel() == panels.packed_size(n, k, True)
    assert int(shuffle.max()) <= 7
    assert torch.equal(panels.unpack_int8_panels(values, shuffle, n, k), sparse)


def _args(sparse=False, n=10, k=24):
    codes = torch.randint(-64, 65, (n, k), dtype=torch.int8)
    values, shuffle = panels.pack_int8_panels_24(keep_2_of_4(codes, torch.Generator())) if sparse else \
        (panels.pack_int8_panels(codes), None)
    sums = ops.int8_weight_sum(panels.unpack_int8_panels(values, shuffle, n, k))
    return [torch.randn(3, k), values, shuffle, n, torch.ones(n), sums, None, 0.1, 0]


@pytest.mark.parametrize("change, message", [
    ({1: torch.zeros(7, dtype=torch.int8)}, "weight must hold 384 packed codes for a dense [10, 24]"),
    ({0: torch.randn(3, 20)}, "weight must hold 320 packed codes for a dense [10, 20] weight"),
    ({3: 0}, "out_features must be"),
    ({5: torch.zeros(10, dtype=torch.int32)}, "weight_sum must hold the sums"),
    ({1: torch.full((384,), 65, dtype=torch.int8)}, "packed weight codes must lie in [-64, 64]"),
    ({7: -1.0}, "x_scale must be finite and > 0"),
])
def test_bad_arguments_are_refused(change, message):
    args = _args()
    for i, value in change.items():
        args[i] = value
    with pytest.raises(KernelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.int8_linear_packed(*args)


def test_bad_shuffle_is_refused():
    args = _args(sparse=True)
    with pytest.raises(KernelError, match="shuffle must hold 192 positions"):
        ops.int8_linear_packed(*args[:2], args[2][:-1], *args[3:])
    args[2] = args[2].clone()
    args[2][5] = 9
    with pytest.raises(KernelError, match=r"shuffle positions must lie in \[0, 7\]"):
        ops.int8_linear_packed(*args)
