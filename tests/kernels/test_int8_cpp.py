"""edge::int8_linear / edge::int8_conv2d (csrc/int8/) against exact integer references.

The kernels accumulate in int32 exactly and dequantize as (float)(acc − zp·w_sum)·scale·w_scale + bias
in float32, op by op; the references compute the same integer sums in int64 and apply the same float32
ops in the same order, so outputs must be equal bit for bit. Every test runs both the AVX2 path (where
the CPU has AVX2) and the portable C++ path (EDGE_KERNELS_PORTABLE=1)."""
from __future__ import annotations

import pytest
import torch
import torch.ao.quantization.fx._decomposed
import torch.nn.functional as F
from edgepasses.kernels import ops
from edgepasses.kernels.ops import KernelError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def quantize_ref(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)


def linear_ref(x, w, w_scale, bias, x_scale, zp):
    """Static (x_scale given) or dynamic per-token (None) reference, exact integer sums in int64."""
    if x_scale is None:
        s = x.abs().amax(1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = torch.clamp(torch.round(x / s), -127, 127).to(torch.int64)
        out = (codes @ w.to(torch.int64).T).float() * s * w_scale
    else:
        codes = quantize_ref(x, x_scale, zp).to(torch.int64) - zp
        out = (codes @ w.to(torch.int64).T).float() * torch.tensor(x_scale, dtype=torch.float32) * w_scale
    return out if bias is None else out + bias


def random_weight(n, k, bits, gen):
    lim = 64 if bits == 7 else 128
    return torch.randint(-lim, lim + (1 if bits == 7 else 0), (n, k), dtype=torch.int8, generator=gen)


def run_linear(x, w, bits, bias, x_scale, zp, gen):
    w_scale = torch.rand(w.shape[0], generator=gen) * 0.02 + 1e-3
    y = ops.int8_linear(x, w, w_scale, ops.int8_weight_sum(w), bias, x_scale, zp, bits)
    return y, linear_ref(x, w, w_scale, bias, x_scale, zp)


def assert_same(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    if not torch.equal(y, ref):
        diff = (y - ref).abs()
        raise AssertionError(f"{int((diff > 0).sum())} of {y.numel()} differ, max |diff| {diff.max().item():.3g}")


# ---- linear ---------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the env var holds for every example
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 70), bits=st.sampled_from([7, 8]),
       dynamic=st.booleans(), with_bias=st.booleans(), zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_linear_small_shapes_exact(path, m, k, n, bits, dynamic, with_bias, zp, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 4
    w = random_weight(n, k, bits, gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y, ref = run_linear(x, w, bits, bias, None if dynamic else 0.05, zp, gen)
    assert_same(y, ref)


@pytest.mark.parametrize("m,k,n", [(1, 4096, 40), (33, 300, 50), (4, 1030, 17), (130, 64, 9), (17, 96, 131),
                                   (9, 4133, 29)])
@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("dynamic", [False, True])
def test_linear_larger_shapes_exact(path, m, k, n, bits, dynamic):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen) * 2
    w = random_weight(n, k, bits, gen)
    bias = torch.randn(n, generator=gen)
    y, ref = run_linear(x, w, bits, bias, None if dynamic else 0.02, 131, gen)
    assert_same(y, ref)


@pytest.mark.parametrize("bits,wval", [(7, 64), (7, -64), (8, 127), (8, -128)])
def test_linear_extreme_codes_exact(path, bits, wval):
    """Codes at 255 against the largest weights: the 16-bit pair sums (7-bit path) must not saturate."""
    k = 2053
    x = torch.full((3, k), 1e6)
    x[1] = -1e6                       # code 0
    x[2, ::2] = -1e6
    w = torch.full((5, k), wval, dtype=torch.int8)
    w[1, ::3] = -wval if wval != -128 else 127
    y, ref = run_linear(x, w, bits, None, 0.5, 7, torch.Generator().manual_seed(0))
    assert_same(y, ref)


def test_linear_batched_input_shape(path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 37, generator=gen)
    w = random_weight(11, 37, 8, gen)
    w_scale = torch.rand(11, generator=gen)
    y = ops.int8_linear(x, w, w_scale, ops.int8_weight_sum(w), None, 0.03, 128, 8)
    assert y.shape == (2, 5, 11)
    assert_same(y.reshape(10, 11), linear_ref(x.reshape(10, 37), w, w_scale, None, 0.03, 128))


def test_dynamic_zero_row(path):
    x = torch.zeros(2, 40)
    x[1, 3] = -2.5
    w = random_weight(6, 40, 7, torch.Generator().manual_seed(1))
    y, ref = run_linear(x, w, 7, None, None, 0, torch.Generator().manual_seed(1))
    assert_same(y, ref)
    assert torch.equal(y[0], torch.zeros(6))


# ---- static quantization matches torch's quantize_per_tensor bit for bit ---------------------------

@pytest.mark.parametrize("scale,zp", [(0.5, 0), (0.5, 128), (0.1, 3), (0.0371, 255), (1.0, 77), (3e-3, 128)])
def test_quantization_matches_torch(path, scale, zp):
    """With identity weights and unit weight scales, out = (float)(q − zp)·scale: equal iff the codes are."""
    k = 67  # vector body and scalar tail
    ks = torch.arange(-300, 300, dtype=torch.float32)
    halves = (ks + 0.5) * scale                                   # .5 boundaries (exact when 1/scale is)
    near = torch.cat([halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    specials = torch.tensor([0.0, -0.0, 1e30, -1e30, 255.5 * scale, -0.5 * scale, 0.5 * scale, 1e-40])
    gen = torch.Generator().manual_seed(zp)
    values = torch.cat([near, specials, torch.randn(500, generator=gen) * 100 * scale])
    values = torch.cat([values, values[: (-len(values)) % k]]).reshape(-1, k)
    w = torch.eye(k, dtype=torch.int8)
    ones = torch.ones(k)
    for bits in (7, 8):
        y = ops.int8_linear(values, w, ones, ops.int8_weight_sum(w), None, scale, zp, bits)
        codes = quantize_ref(values, scale, zp).to(torch.int64)
        expected = (codes - zp).float() * torch.tensor(scale, dtype=torch.float32)
        assert_same(y, expected)


# ---- conv2d --------------------------------------------------------------------------------------

def conv_ref(x, w, w_scale, bias, stride, padding, dilation, groups, x_scale, zp):
    """Integer conv of the codes minus zp (zero padding = zp code), in float64 (exact), then float32 dequant."""
    codes = quantize_ref(x, x_scale, zp).double() - zp
    acc = F.conv2d(codes, w.double(), None, stride, padding, dilation, groups)
    out = acc.float() * torch.tensor(x_scale, dtype=torch.float32) * w_scale.view(1, -1, 1, 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def run_conv(b, c, h, wd, o, kh, kw, stride, padding, dilation, groups, bits, with_bias, seed, zp=100):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, wd, generator=gen) * 2
    w = random_weight(o, c // groups * kh * kw, bits, gen).reshape(o, c // groups, kh, kw)
    w_scale = torch.rand(o, generator=gen) * 0.02 + 1e-3
    bias = torch.randn(o, generator=gen) if with_bias else None
    y = ops.int8_conv2d(x, ops.pack_int8_conv2d_weight(w), w_scale, ops.int8_weight_sum(w), bias, list(stride),
                        list(padding), list(dilation), groups, 0.04, zp, bits)
    assert_same(y, conv_ref(x, w, w_scale, bias, stride, padding, dilation, groups, 0.04, zp))


CONV_CASES = [  # b, c, h, w, o, kh, kw, stride, padding, dilation, groups
    (1, 3, 9, 11, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (2, 4, 8, 7, 6, 3, 2, (2, 1), (0, 2), (1, 2), 2),
    (1, 6, 10, 10, 6, 3, 3, (1, 1), (1, 1), (1, 1), 6),      # depthwise
    (2, 5, 13, 9, 10, 3, 3, (2, 2), (1, 1), (1, 1), 5),      # depthwise, channel multiplier 2
    (1, 3, 11, 11, 3, 5, 3, (3, 2), (2, 0), (2, 3), 3),      # depthwise, strided and dilated
    (2, 4, 9, 9, 8, 5, 3, (2, 3), (2, 1), (2, 1), 4),
    (1, 1, 5, 5, 3, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (3, 32, 14, 14, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1),   # K = 288, several threads' worth
    (1, 40, 15, 15, 24, 1, 1, (1, 1), (0, 0), (1, 1), 1),   # 1x1
    (4, 8, 7, 7, 16, 3, 3, (1, 1), (1, 1), (1, 1), 2),      # many (image, group) jobs
    (1, 7, 3, 4, 9, 3, 3, (1, 1), (3, 3), (1, 1), 1),       # padding larger than the image
    (2, 64, 9, 7, 40, 1, 1, (1, 1), (0, 0), (1, 1), 1),     # 1x1 on 32k channels: channels-last codes used directly
    (1, 13, 6, 11, 7, 3, 3, (1, 2), (1, 1), (1, 1), 1),     # channels-last transpose: 8-channel blocks and a rest
    (1, 4, 30, 31, 4, 3, 3, (1, 1), (1, 1), (1, 1), 4),     # depthwise rows of 16 + 8 + rest
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bits", [7, 8])
def test_conv2d_exact(path, case, bits):
    run_conv(*case, bits=bits, with_bias=bits == 8, seed=len(case) + case[1] * 7 + case[4])


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the env var holds for every example
@given(b=st.integers(1, 2), cg=st.integers(1, 4), og=st.integers(1, 4), groups=st.integers(1, 3),
       h=st.integers(1, 9), wd=st.integers(1, 9), kh=st.integers(1, 3), kw=st.integers(1, 3),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 2), dw=st.integers(1, 2), bits=st.sampled_from([7, 8]), with_bias=st.booleans(),
       zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_conv2d_random_exact(path, b, cg, og, groups, h, wd, kh, kw, sh, sw, ph, pw, dh, dw, bits, with_bias, zp,
                             seed):
    if h + 2 * ph - dh * (kh - 1) - 1 < 0 or wd + 2 * pw - dw * (kw - 1) - 1 < 0:
        return
    run_conv(b, cg * groups, h, wd, og * groups, kh, kw, (sh, sw), (ph, pw), (dh, dw), groups, bits, with_bias,
             seed, zp)


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 1, 3, 3), (7, 13, 1, 1), (6, 2, 5, 3), (300, 70, 3, 3)])
def test_conv_weight_packing_is_channels_last(shape):
    codes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(len(shape)))
    packed = ops.pack_int8_conv2d_weight(codes)
    assert packed.dtype == torch.int8 and packed.is_contiguous()
    assert torch.equal(packed, codes.permute(0, 2, 3, 1))
    assert torch.equal(ops.pack_int8_conv2d_weight(codes.transpose(2, 3).contiguous().transpose(2, 3)), packed)


@pytest.mark.parametrize("codes, message", [
    (torch.zeros(4, 2, 3, dtype=torch.int8), "codes must be 4-D"),
    (torch.zeros(4, 2, 3, 3), "codes must be torch.int8"),
    (torch.zeros(4, 0, 3, 3, dtype=torch.int8), "no empty dims"),
])
def test_conv_weight_packing_refuses_what_is_not_conv_codes(codes, message):
    with pytest.raises(KernelError, match=message):
        ops.pack_int8_conv2d_weight(codes)


# ---- bad arguments -------------------------------------------------------------------------------

def _linear_args(k=16, n=4):
    w = torch.ones(n, k, dtype=torch.int8)
    return w, torch.ones(n), ops.int8_weight_sum(w)


def test_linear_k_mismatch_raises():
    w, ws, wsum = _linear_args()
    with pytest.raises(KernelError):
        ops.int8_linear(torch.randn(2, 15), w, ws, wsum, None, 0.1, 0, 8)


@pytest.mark.parametrize("bits,x_scale,zp", [(6, 0.1, 0), (9, 0.1, 0), (8, 0.1, 256), (8, 0.1, -1),
                                             (8, float("nan"), 0), (7, float("inf"), 0)])
def test_linear_bad_quant_args_raise(bits, x_scale, zp):
    w, ws, wsum = _linear_args()
    with pytest.raises(KernelError):
        ops.int8_linear(torch.randn(2, 16), w, ws, wsum, None, x_scale, zp, bits)


def _conv(x, w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, x_scale=0.1, zp=0, bits=8):
    return ops.int8_conv2d(x, ops.pack_int8_conv2d_weight(w), torch.ones(w.shape[0]), ops.int8_weight_sum(w), None,
                           list(stride), list(padding), list(dilation), groups, x_scale, zp, bits)


def test_conv2d_bad_args_raise():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(KernelError):     # groups do not divide the channels
        _conv(x, torch.ones(3, 1, 3, 3, dtype=torch.int8), groups=3)
    with pytest.raises(KernelError):     # kernel larger than the padded input
        _conv(torch.randn(1, 4, 2, 6), torch.ones(2, 4, 3, 3, dtype=torch.int8))
    with pytest.raises(KernelError):     # conv is static-only
        _conv(x, torch.ones(2, 4, 3, 3, dtype=torch.int8), x_scale=0.0)
    with pytest.raises(KernelError):
        _conv(x, torch.ones(2, 4, 3, 3, dtype=torch.int8), bits=4)
    with pytest.raises(KernelError):
        _conv(x, torch.ones(2, 4, 3, 3, dtype=torch.int8), zp=300)
    with pytest.raises(KernelError):
        _conv(x, torch.ones(2, 4, 3, 3, dtype=torch.int8), dilation=(0, 1))


def test_per_channel_tensors_and_conv_geometry_that_do_not_fit_are_refused():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    sums = ops.int8_weight_sum(codes)
    with pytest.raises(ops.KernelError, match=r"weight_scale must have shape \(4,\).*got \(3,\)"):
        ops.int8_linear(torch.randn(2, 8), codes, torch.ones(3), sums, None, 0.1, 0, 8)
    with pytest.raises(ops.KernelError, match="weight_sum must be torch.int32, got torch.int64"):
        ops.int8_linear(torch.randn(2, 8), codes, torch.ones(4), sums.long(), None, 0.1, 0, 8)
    conv = ops.pack_int8_conv2d_weight(torch.zeros(4, 2, 3, 3, dtype=torch.int8))
    with pytest.raises(ops.KernelError, match="do not fit"):  # 2 channels per group x 1 group != 4 channels
        ops.int8_conv2d(torch.randn(1, 4, 5, 5), conv, torch.ones(4), ops.int8_weight_sum(conv), None,
                        [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 8)
    with pytest.raises(ops.KernelError, match="stride must be >= 1, got 0"):
        ops.int8_conv2d(torch.randn(1, 4, 5, 5), conv, torch.ones(4), ops.int8_weight_sum(conv), None,
                        [0, 1], [0, 0], [1, 1], 2, 0.1, 0, 8)


def test_conv2d_refuses_an_unpacked_weight_that_does_not_fit():
    """A weight in torch's layout [O, C, KH, KW] reads as packed [O, KH, KW, C]: 3 channels, not 2."""
    unpacked = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    with pytest.raises(ops.KernelError, match="do not fit"):
        ops.int8_conv2d(torch.randn(1, 2, 5, 5), unpacked, torch.ones(4), ops.int8_weight_sum(unpacked), None,
                        [1, 1], [0, 0], [1, 1], 1, 0.1, 0, 8)
