"""The `edge::` custom ops: what the `reference` target lowers quantized, 2:4-sparse and
low-rank layers to.

Each op is a `torch.library.custom_op` with a fake implementation, so graphs holding it
trace through `torch.export` and `torch.compile`. On CPU tensors it runs our C++ kernels
(`csrc/`, built on first use by `build.py`); on CUDA tensors the Triton kernels
(`triton_ops.py`: int8_linear and sparse24_linear; int8_conv2d has no CUDA kernel, and the
dispatcher says so). Weights arrive in the form the lowering prepared once: int8 codes with
their per-row sums (the zero-point correction), conv codes packed channels-last
(`pack_int8_conv2d_weight`), 2:4 weights as kept values plus 2-bit indices.

Every op checks its arguments (checks.py) before any kernel runs, in its CPU, CUDA and fake
implementations and in the `*_into` entry points, and refuses bad ones with a one-line
`KernelError` (a ValueError; `KernelTypeError`, also a TypeError, for wrong types and dtypes).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import abi, checks
from .build import last_error, library
from .checks import KernelError, KernelTypeError  # noqa: F401  (the ops' errors, raised by checks)


def _check(code: int, op: str) -> None:
    if code != 0:  # unreachable after the checks, except out of memory
        raise KernelError(f"edge::{op}: the C++ kernel refused the call (code {code}): {last_error()}")


def _float_rows(x: Tensor, k: int) -> Tensor:
    return x.reshape(-1, k).contiguous().float()


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous().float()


# ---- weight preparation (done once, when lowering) -------------------------------------------

def int8_weight_sum(codes: Tensor) -> Tensor:
    """Row sums of int8 weight codes over everything but the output channel (int32)."""
    return checks.row_stats(codes)[0]


def pack_int8_conv2d_weight(codes: Tensor) -> Tensor:
    """int8 conv weight codes [O, C/groups, KH, KW] (torch's layout) packed as edge::int8_conv2d
    reads them: [O, KH, KW, C/groups], the (kh, kw, c) order of the kernel's im2col rows."""
    checks.conv_weight_codes("pack_int8_conv2d_weight", codes)
    codes = codes.contiguous()
    o, per_group, kh, kw = codes.shape
    packed = codes.new_empty(o, kh, kw, per_group)
    code = library().edge_int8_conv2d_pack(*abi.buffer(codes), o, per_group, kh, kw, *abi.buffer(packed),
                                           torch.get_num_threads())
    _check(code, "pack_int8_conv2d_weight")
    return packed


def pack_sparse24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(values [N, K/2], indices u8 [N, ceil(K/8)]) of a 2:4-sparse weight [N, K].

    Per group of 4 along K the two kept positions i0 < i1 are stored as the nibble
    i0 | i1 << 2, group 2j in the low nibble of byte j. Groups with fewer than two
    non-zeros keep zeros; a group with more than two raises."""
    if weight.dim() != 2:
        raise KernelError(f"pack_sparse24: the weight must be 2-D [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    if k % 4:
        raise KernelError(f"2:4 sparsity needs the reduction dim to be a multiple of 4; got {k}")
    groups = weight.reshape(n, k // 4, 4)
    nonzero = groups != 0
    if (nonzero.sum(-1) > 2).any():
        raise KernelError("the weight is not 2:4 sparse: a group of 4 along K has more than 2 non-zeros")
    # Rank positions non-zeros first (stable), keep the first two, in ascending order.
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    kept = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, kept).reshape(n, k // 2).contiguous()
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(n, 1)], dim=1)
    indices = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    return values, indices


def unpack_sparse24(values: Tensor, indices: Tensor, k: int) -> Tensor:
    """The dense [N, K] weight that `pack_sparse24` compressed."""
    n = values.shape[0]
    nibbles = torch.stack([indices & 0xF, indices >> 4], dim=-1).reshape(n, -1)[:, : k // 4].long()
    kept = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(-1, kept, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


# ---- edge::int8_linear ------------------------------------------------------------------------

@custom_op("edge::int8_linear", mutates_args=(), device_types="cpu")
def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Tensor | None,
                x_scale: float | None, x_zero_point: int, weight_bits: int) -> Tensor:
    """y = dequant(quant(x) @ weightᵀ) + bias with int32 accumulation.

    x float [..., K]; weight int8 codes [N, K] with per-channel scales [N] and row sums [N];
    x_scale given: static per-tensor u8 quantization (x_zero_point); None: dynamic per-token
    symmetric scales. weight_bits=7 promises |weight| <= 64, which lets the AVX2 kernel add
    u8·s8 pairs in 16 bits exactly (the quantizer emits such weights on CPUs without VNNI)."""
    _check_int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    _run_int8_linear(out, x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    return out


def int8_linear_into(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Tensor | None, x_scale: float | None, x_zero_point: int, weight_bits: int,
                     threads: int | None = None) -> None:
    """edge::int8_linear writing into `out` (float32, contiguous, [..., N]): the entry point for a
    runtime that owns the buffers and the threads (the tvm target's packed function); `threads`
    defaults to torch's."""
    _check_int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    checks.out_buffer("int8_linear", out, (*x.shape[:-1], weight.shape[0]))
    checks.on_cpu("int8_linear", (x, out))
    _run_int8_linear(out, x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits, threads)


def _check_int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits) -> None:
    checks.int8_linear("int8_linear", x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    checks.int8_weight_values("int8_linear", weight, weight_sum, weight_bits)


def _run_int8_linear(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Tensor | None, x_scale: float | None, x_zero_point: int, weight_bits: int,
                     threads: int | None = None) -> None:
    """The C++ call on checked arguments (contiguous float32 copies held here while it runs)."""
    n, k = weight.shape
    rows, w, scale, sums, b = (_float_rows(x, k), weight.contiguous(), _float(weight_scale),
                               weight_sum.contiguous(), _float(bias))
    code = library().edge_int8_linear(
        *abi.buffer(rows), rows.shape[0], k, *abi.buffer(w), n, *abi.buffer(scale), *abi.buffer(sums), *abi.buffer(b),
        0.0 if x_scale is None else x_scale, x_zero_point, weight_bits, *abi.buffer(out),
        threads or torch.get_num_threads())
    _check(code, "int8_linear")


@int8_linear.register_fake
def _(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits):
    checks.int8_linear("int8_linear", x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)


@int8_linear.register_kernel("cuda")
def _(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits):
    from . import (
        triton_ops,  # imported on first CUDA call: triton is optional on CPU machines
    )

    _check_int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    return triton_ops.int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)


# ---- edge::int8_linear_packed -----------------------------------------------------------------

@custom_op("edge::int8_linear_packed", mutates_args=(), device_types="cpu")
def int8_linear_packed(x: Tensor, weight: Tensor, shuffle: Tensor | None, out_features: int, weight_scale: Tensor,
                       weight_sum: Tensor, bias: Tensor | None, x_scale: float | None, x_zero_point: int) -> Tensor:
    """int8_linear on 7-bit codes packed in panels (panels.py), which the AVX2 kernel multiplies as
    output vectors (no horizontal sums); with `shuffle`, the weight is 2:4 sparse and only its kept
    half is multiplied. The same result as int8_linear on the unpacked codes, bit for bit."""
    _check_int8_linear_packed(x, weight, shuffle, out_features, weight_scale, weight_sum, bias, x_scale, x_zero_point)
    rows = _float_rows(x, x.shape[-1])
    out = rows.new_empty(rows.shape[0], out_features)
    scale, sums, b = _float(weight_scale), weight_sum.contiguous(), _float(bias)
    code = library().edge_int8_linear_packed(
        *abi.buffer(rows), rows.shape[0], rows.shape[1], *abi.buffer(weight.contiguous()),
        *abi.buffer(None if shuffle is None else shuffle.contiguous()), out_features, *abi.buffer(scale),
        *abi.buffer(sums), *abi.buffer(b), 0.0 if x_scale is None else x_scale, x_zero_point, *abi.buffer(out),
        torch.get_num_threads())
    _check(code, "int8_linear_packed")
    return out.reshape(*x.shape[:-1], out_features)


def _check_int8_linear_packed(x, weight, shuffle, out_features, weight_scale, weight_sum, bias, x_scale,
                              x_zero_point) -> None:
    checks.int8_linear_packed("int8_linear_packed", x, weight, shuffle, out_features, weight_scale, weight_sum, bias,
                              x_scale, x_zero_point)
    checks.int8_packed_values("int8_linear_packed", weight, shuffle, weight_sum, x.shape[-1])


@int8_linear_packed.register_fake
def _(x, weight, shuffle, out_features, weight_scale, weight_sum, bias, x_scale, x_zero_point):
    checks.int8_linear_packed("int8_linear_packed", x, weight, shuffle, out_features, weight_scale, weight_sum, bias,
                              x_scale, x_zero_point)
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)


# ---- edge::int8_conv2d ------------------------------------------------------------------------

@custom_op("edge::int8_conv2d", mutates_args=(), device_types="cpu")
def int8_conv2d(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                x_scale: float, x_zero_point: int, weight_bits: int) -> Tensor:
    """conv2d of u8-quantized x (static per-tensor scale and zero point; padding reads as the
    zero point) with int8 weight codes packed by `pack_int8_conv2d_weight` ([O, KH, KW, C/groups]),
    int32 accumulation, fused per-channel dequant and bias. NCHW float in, NCHW float out."""
    args = (x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale, x_zero_point,
            weight_bits)
    out = x.new_empty(_check_int8_conv2d(*args), dtype=torch.float32)
    _run_int8_conv2d(out, *args)
    return out


def int8_conv2d_into(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                     x_scale: float, x_zero_point: int, weight_bits: int, threads: int | None = None) -> None:
    """edge::int8_conv2d writing into `out` (float32, contiguous, NCHW): the entry point for a
    runtime that owns the buffers and the threads (the tvm target's packed function); `threads`
    defaults to torch's."""
    args = (x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale, x_zero_point,
            weight_bits)
    checks.out_buffer("int8_conv2d", out, _check_int8_conv2d(*args))
    checks.on_cpu("int8_conv2d", (x, out))
    _run_int8_conv2d(out, *args, threads=threads)


def _check_int8_conv2d(x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale,
                       x_zero_point, weight_bits) -> tuple[int, int, int, int]:
    """Checks the arguments; returns the output shape."""
    shape = checks.int8_conv2d("int8_conv2d", x, weight, weight_scale, weight_sum, bias, stride, padding, dilation,
                               groups, x_scale, x_zero_point, weight_bits)
    checks.int8_weight_values("int8_conv2d", weight, weight_sum, weight_bits)
    return shape


def _run_int8_conv2d(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                     x_scale: float, x_zero_point: int, weight_bits: int, threads: int | None = None) -> None:
    """The C++ call on checked arguments (contiguous float32 copies held here while it runs)."""
    b, c, h, w = x.shape
    o, kh, kw, _ = weight.shape
    xc, wc, scale, sums, bc = (x.contiguous().float(), weight.contiguous(), _float(weight_scale),
                               weight_sum.contiguous(), _float(bias))
    code = library().edge_int8_conv2d(
        *abi.buffer(xc), b, c, h, w, *abi.buffer(wc), o, kh, kw, *abi.buffer(scale), *abi.buffer(sums), *abi.buffer(bc),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, x_scale, x_zero_point,
        weight_bits, *abi.buffer(out), threads or torch.get_num_threads())
    _check(code, "int8_conv2d")


@int8_conv2d.register_fake
def _(x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale, x_zero_point,
      weight_bits):
    shape = checks.int8_conv2d("int8_conv2d", x, weight, weight_scale, weight_sum, bias, stride, padding, dilation,
                               groups, x_scale, x_zero_point, weight_bits)
    return x.new_empty(shape, dtype=torch.float32)


# ---- edge::int8_bmm ---------------------------------------------------------------------------

@custom_op("edge::int8_bmm", mutates_args=(), device_types="cpu")
def int8_bmm(a: Tensor, b: Tensor, a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int,
             transpose_b: bool) -> Tensor:
    """dequant(quant(a) @ quant(b)) of two activations (attention's Q·Kᵀ and P·V) with int32
    accumulation.

    a float [..., M, K]; b float [..., K, N], or [..., N, K] with transpose_b (Q·Kᵀ reads K as it
    is, no transpose copy); the same batch dims. Each is quantized static per tensor to u8 codes
    (scale, zero point in [0, 255]: s8 codes are u8 codes with the zero point + 128); the output is
    float32 Σ(qa − za)(qb − zb) · (a_scale·b_scale)."""
    args = (a, b, a_scale, a_zero_point, b_scale, b_zero_point, transpose_b)
    shape = checks.int8_bmm("int8_bmm", *args)
    out = a.new_empty(shape, dtype=torch.float32)
    _run_int8_bmm(out, *args)
    return out


def _run_int8_bmm(out: Tensor, a: Tensor, b: Tensor, a_scale: float, a_zero_point: int, b_scale: float,
                  b_zero_point: int, transpose_b: bool) -> None:
    """The C++ call on checked arguments (contiguous float32 copies held here while it runs)."""
    m, k = a.shape[-2:]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = out.numel() // (m * n) if m * n else 0
    ac, bc = a.contiguous().float(), b.contiguous().float()
    code = library().edge_int8_bmm(*abi.buffer(ac), *abi.buffer(bc), batch, m, k, n, int(transpose_b), a_scale,
                                   a_zero_point, b_scale, b_zero_point, *abi.buffer(out), torch.get_num_threads())
    _check(code, "int8_bmm")


@int8_bmm.register_fake
def _(a, b, a_scale, a_zero_point, b_scale, b_zero_point, transpose_b):
    return a.new_empty(checks.int8_bmm("int8_bmm", a, b, a_scale, a_zero_point, b_scale, b_zero_point, transpose_b),
                       dtype=torch.float32)


# ---- edge::sparse24_linear --------------------------------------------------------------------

@custom_op("edge::sparse24_linear", mutates_args=(), device_types="cpu")
def sparse24_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None,
                    weight_scale: Tensor | None, x_scale: float | None, x_zero_point: int) -> Tensor:
    """x @ Wᵀ + bias for a 2:4-sparse W stored as `pack_sparse24` makes it.

    float values: the C++ kernel multiplies only the kept weights (half the FLOPs), in float32;
    weight_scale and x_scale must be None. int8 values (with weight_scale, x quantized as in
    int8_linear): decompressed to dense codes and run by the int8 GEMM — exact, but no faster
    than dense int8."""
    _check_sparse24_linear(x, values, indices, bias, weight_scale, x_scale, x_zero_point)
    n, k = values.shape[0], checks.sparse24_k(values)
    rows = _float_rows(x, k)
    out = rows.new_empty(rows.shape[0], n)
    if values.dtype == torch.int8:
        dense = unpack_sparse24(values, indices, k)
        _run_int8_linear(out, rows, dense, weight_scale, int8_weight_sum(dense), bias, x_scale, x_zero_point, 8)
    else:
        vals, idx, b = values.contiguous().float(), indices.contiguous(), _float(bias)
        code = library().edge_sparse24_linear_f32(
            *abi.buffer(rows), rows.shape[0], k, *abi.buffer(vals), *abi.buffer(idx), n, *abi.buffer(b), *abi.buffer(out),
            torch.get_num_threads())
        _check(code, "sparse24_linear")
    return out.reshape(*x.shape[:-1], n)


def _check_sparse24_linear(x, values, indices, bias, weight_scale, x_scale, x_zero_point) -> None:
    checks.sparse24_linear("sparse24_linear", x, values, indices, bias, weight_scale, x_scale, x_zero_point)
    checks.sparse24_index_values("sparse24_linear", indices, checks.sparse24_k(values))


@sparse24_linear.register_fake
def _(x, values, indices, bias, weight_scale, x_scale, x_zero_point):
    checks.sparse24_linear("sparse24_linear", x, values, indices, bias, weight_scale, x_scale, x_zero_point)
    return x.new_empty(*x.shape[:-1], values.shape[0], dtype=torch.float32)


@sparse24_linear.register_kernel("cuda")
def _(x, values, indices, bias, weight_scale, x_scale, x_zero_point):
    from . import triton_ops

    _check_sparse24_linear(x, values, indices, bias, weight_scale, x_scale, x_zero_point)
    return triton_ops.sparse24_linear(x, values, indices, bias, weight_scale, x_scale, x_zero_point)


# ---- edge::lowrank_linear ---------------------------------------------------------------------

@custom_op("edge::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, first: Tensor, second: Tensor, bias: Tensor | None) -> Tensor:
    """(x @ firstᵀ) @ secondᵀ + bias in one op: first [r, K], second [N, r]. The [M, r]
    intermediate never leaves the op; both products run on torch's BLAS (MKL/oneDNN), which
    no hand-written GEMM here would beat."""
    checks.lowrank_linear("lowrank_linear", x, first, second, bias)
    rows = x.reshape(-1, first.shape[1])
    inner = rows @ first.t()
    out = inner @ second.t() if bias is None else torch.addmm(bias, inner, second.t())
    return out.reshape(*x.shape[:-1], second.shape[0])


@lowrank_linear.register_fake
def _(x, first, second, bias):
    checks.lowrank_linear("lowrank_linear", x, first, second, bias)
    return x.new_empty(*x.shape[:-1], second.shape[0])
