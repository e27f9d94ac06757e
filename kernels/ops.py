"""The `edge::` custom ops: what the `reference` target lowers quantized, 2:4-sparse and
low-rank layers to.

Each op is a `torch.library.custom_op` with a fake implementation, so graphs holding it
trace through `torch.export` and `torch.compile`. On CPU tensors it runs our C++ kernels
(`csrc/`, built on first use by `build.py`); on CUDA tensors the Triton kernels
(`triton_ops.py`: int8_linear and sparse24_linear; int8_conv2d has no CUDA kernel, and the
dispatcher says so). Weights arrive in the form the lowering prepared once: int8 codes with
their per-row sums (the zero-point correction), 2:4 weights as kept values plus 2-bit indices.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .build import library


class KernelError(ValueError):
    """An `edge::` op was called with arguments its kernels do not take."""


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(code: int, op: str) -> None:
    if code != 0:
        raise KernelError(f"edge::{op}: the C++ kernel rejected its arguments (code {code})")


def _float_rows(x: Tensor, k: int, op: str) -> Tensor:
    if x.shape[-1] != k:
        raise KernelError(f"edge::{op}: input's last dim is {x.shape[-1]}, the weight expects {k}")
    return x.reshape(-1, k).contiguous().float()


def _bias(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.contiguous().float()


def _check_int8_weight(op: str, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Tensor | None,
                       weight_bits: int) -> None:
    """The C++ kernels trust their pointers: every per-channel tensor must hold one value per output channel."""
    n = weight.shape[0]
    problems = []
    if weight.dtype != torch.int8:
        problems.append(f"weight must be int8 codes, got {weight.dtype}")
    if weight_sum.dtype != torch.int32:
        problems.append(f"weight_sum must be int32 (ops.int8_weight_sum), got {weight_sum.dtype}")
    for name, t in (("weight_scale", weight_scale), ("weight_sum", weight_sum), ("bias", bias)):
        if t is not None and t.numel() != n:
            problems.append(f"{name} has {t.numel()} values for {n} output channels")
    if weight_bits not in (7, 8):
        problems.append(f"weight_bits must be 7 or 8, got {weight_bits}")
    if problems:
        raise KernelError(f"edge::{op}: " + "; ".join(problems))


def _check_out(op: str, out: Tensor, shape: tuple) -> None:
    """The kernels write `out` through a raw pointer: it must be exactly what they write."""
    if out.dtype != torch.float32 or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise KernelError(f"edge::{op}: out must be a contiguous float32 tensor of shape {tuple(shape)}; got "
                          f"{out.dtype} {tuple(out.shape)}")


# ---- weight preparation (done once, when lowering) -------------------------------------------

def int8_weight_sum(codes: Tensor) -> Tensor:
    """Row sums of int8 weight codes over everything but the output channel (int32)."""
    return codes.reshape(codes.shape[0], -1).sum(1, dtype=torch.int32)


def pack_sparse24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(values [N, K/2], indices u8 [N, ceil(K/8)]) of a 2:4-sparse weight [N, K].

    Per group of 4 along K the two kept positions i0 < i1 are stored as the nibble
    i0 | i1 << 2, group 2j in the low nibble of byte j. Groups with fewer than two
    non-zeros keep zeros; a group with more than two raises."""
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
def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Optional[Tensor],
                x_scale: Optional[float], x_zero_point: int, weight_bits: int) -> Tensor:
    """y = dequant(quant(x) @ weightᵀ) + bias with int32 accumulation.

    x float [..., K]; weight int8 codes [N, K] with per-channel scales [N] and row sums [N];
    x_scale given: static per-tensor u8 quantization (x_zero_point); None: dynamic per-token
    symmetric scales. weight_bits=7 promises |weight| <= 64, which lets the AVX2 kernel add
    u8·s8 pairs in 16 bits exactly (the quantizer emits such weights on CPUs without VNNI)."""
    out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
    int8_linear_into(out, x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    return out


def int8_linear_into(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Optional[Tensor], x_scale: Optional[float], x_zero_point: int, weight_bits: int,
                     threads: Optional[int] = None) -> None:
    """edge::int8_linear writing into `out` (float32, contiguous, [..., N]): the entry point for a
    runtime that owns the buffers and the threads (the tvm target's packed function); `threads`
    defaults to torch's."""
    n, k = weight.shape
    _check_int8_weight("int8_linear", weight, weight_scale, weight_sum, bias, weight_bits)
    rows = _float_rows(x, k, "int8_linear")
    _check_out("int8_linear", out, (*x.shape[:-1], n))
    code = library().edge_int8_linear(
        _ptr(rows), rows.shape[0], k, _ptr(weight.contiguous()), n, _ptr(weight_scale.contiguous().float()),
        _ptr(weight_sum.contiguous()), _ptr(_bias(bias)), 0.0 if x_scale is None else x_scale, x_zero_point,
        weight_bits, _ptr(out), threads or torch.get_num_threads())
    _check(code, "int8_linear")


@int8_linear.register_fake
def _(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)


@int8_linear.register_kernel("cuda")
def _(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits):
    from . import triton_ops  # imported on first CUDA call: triton is optional on CPU machines

    return triton_ops.int8_linear(x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)


# ---- edge::int8_conv2d ------------------------------------------------------------------------

def _conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@custom_op("edge::int8_conv2d", mutates_args=(), device_types="cpu")
def int8_conv2d(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                x_scale: float, x_zero_point: int, weight_bits: int) -> Tensor:
    """conv2d of u8-quantized x (static per-tensor scale and zero point; padding reads as the
    zero point) with int8 weight codes [O, C/groups, KH, KW], int32 accumulation, fused
    per-channel dequant and bias. NCHW float in, NCHW float out."""
    out = x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation, groups), dtype=torch.float32)
    int8_conv2d_into(out, x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale,
                     x_zero_point, weight_bits)
    return out


def _conv_out_shape(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                    groups: int) -> tuple[int, int, int, int]:
    b, c, h, w = x.shape
    o, per_group, kh, kw = weight.shape
    if groups < 1 or per_group * groups != c or o % groups or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise KernelError(f"edge::int8_conv2d: input has {c} channels, weight {tuple(weight.shape)} with groups="
                          f"{groups}, stride {stride}, padding {padding}, dilation {dilation}: these do not fit")
    return (b, o, _conv_out_size(h, kh, stride[0], padding[0], dilation[0]),
            _conv_out_size(w, kw, stride[1], padding[1], dilation[1]))


def int8_conv2d_into(out: Tensor, x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                     bias: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int], groups: int,
                     x_scale: float, x_zero_point: int, weight_bits: int, threads: Optional[int] = None) -> None:
    """edge::int8_conv2d writing into `out` (float32, contiguous, NCHW): the entry point for a
    runtime that owns the buffers and the threads (the tvm target's packed function); `threads`
    defaults to torch's."""
    _check_int8_weight("int8_conv2d", weight, weight_scale, weight_sum, bias, weight_bits)
    shape = _conv_out_shape(x, weight, stride, padding, dilation, groups)
    _check_out("int8_conv2d", out, shape)
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xc = x.contiguous().float()
    code = library().edge_int8_conv2d(
        _ptr(xc), b, c, h, w, _ptr(weight.contiguous()), o, kh, kw, _ptr(weight_scale.contiguous().float()),
        _ptr(weight_sum.contiguous()), _ptr(_bias(bias)), stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], groups, x_scale, x_zero_point, weight_bits, _ptr(out),
        threads or torch.get_num_threads())
    _check(code, "int8_conv2d")


@int8_conv2d.register_fake
def _(x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale, x_zero_point,
      weight_bits):
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh = _conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    return x.new_empty(b, o, oh, ow, dtype=torch.float32)


# ---- edge::sparse24_linear --------------------------------------------------------------------

@custom_op("edge::sparse24_linear", mutates_args=(), device_types="cpu")
def sparse24_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                    weight_scale: Optional[Tensor], x_scale: Optional[float], x_zero_point: int) -> Tensor:
    """x @ Wᵀ + bias for a 2:4-sparse W stored as `pack_sparse24` makes it.

    float32 values: the C++ kernel multiplies only the kept weights (half the FLOPs).
    int8 values (with weight_scale, x quantized as in int8_linear): decompressed to dense codes
    and run by the int8 GEMM — exact, but no faster than dense int8."""
    n, k = values.shape[0], values.shape[1] * 2
    rows = _float_rows(x, k, "sparse24_linear")
    if values.dtype == torch.int8:
        if weight_scale is None:
            raise KernelError("edge::sparse24_linear: int8 values need weight_scale")
        dense = unpack_sparse24(values, indices, k)
        out = int8_linear(rows, dense, weight_scale, int8_weight_sum(dense), bias, x_scale, x_zero_point, 8)
        return out.reshape(*x.shape[:-1], n)
    out = rows.new_empty(rows.shape[0], n)
    code = library().edge_sparse24_linear_f32(
        _ptr(rows), rows.shape[0], k, _ptr(values.contiguous().float()), _ptr(indices.contiguous()), n,
        _ptr(_bias(bias)), _ptr(out), torch.get_num_threads())
    _check(code, "sparse24_linear")
    return out.reshape(*x.shape[:-1], n)


@sparse24_linear.register_fake
def _(x, values, indices, bias, weight_scale, x_scale, x_zero_point):
    return x.new_empty(*x.shape[:-1], values.shape[0], dtype=torch.float32)


@sparse24_linear.register_kernel("cuda")
def _(x, values, indices, bias, weight_scale, x_scale, x_zero_point):
    from . import triton_ops

    return triton_ops.sparse24_linear(x, values, indices, bias, weight_scale, x_scale, x_zero_point)


# ---- edge::lowrank_linear ---------------------------------------------------------------------

@custom_op("edge::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, first: Tensor, second: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(x @ firstᵀ) @ secondᵀ + bias in one op: first [r, K], second [N, r]. The [M, r]
    intermediate never leaves the op; both products run on torch's BLAS (MKL/oneDNN), which
    no hand-written GEMM here would beat."""
    rows = x.reshape(-1, first.shape[1])
    inner = rows @ first.t()
    out = inner @ second.t() if bias is None else torch.addmm(bias, inner, second.t())
    return out.reshape(*x.shape[:-1], second.shape[0])


@lowrank_linear.register_fake
def _(x, first, second, bias):
    return x.new_empty(*x.shape[:-1], second.shape[0])
