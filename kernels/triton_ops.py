"""Triton kernels of the `edge::` ops on CUDA tensors: `int8_linear` and `sparse24_linear`.

The entry points take the arguments of the custom ops in `ops.py` (same names, order and
meaning) and return what those ops return, so they can be registered as the ops' CUDA kernels
directly (`ops.int8_linear.register_kernel("cuda")(triton_ops.int8_linear)`).

int8_linear runs two kernels:
  1. `_quantize_kernel`, one program per row of x: static per-tensor u8 quantization
     (q = clamp(round_half_even(x * float32(1/x_scale)) + zp, 0, 255), as
     `quantized_decomposed.quantize_per_tensor` computes it), or dynamic per-token symmetric
     quantization (s_m = max|x_m| / 127, 1 for a zero row; q = clamp(round(x / s_m), -127, 127)
     + 128, zero point 128). Codes are stored shifted to int8, c = q - 128, because tensor
     cores multiply s8 x s8 (not u8 x s8).
  2. `_int8_gemm_kernel`: acc = sum_k c[m, k] * w[n, k] in int32 on the int8 tensor cores, then
     out = (acc + (128 - zp) * w_sum[n]) * s * w_scale[n] + bias[n]. Since c = q - 128,
     acc + (128 - zp) * w_sum = sum_k (q - zp) * w exactly: the same integer the op defines.

sparse24_linear expands the 2:4-compressed weight tile (values [BLOCK_N, BLOCK_K/2] plus the
2-bit position nibbles) to the dense [BLOCK_N, BLOCK_K] tile in registers and multiplies it
with `tl.dot`. Triton has no sparse tensor-core MMA, so this does the dense FLOPs: the gain
over a dense GEMM is in weight memory traffic (half the values plus 4 bits of positions per
group of 4: 17/32 of the dense float32 bytes, 9/16 of float16), which is what bounds small-M
(decode-like) GEMMs; at large M it is a dense GEMM plus the expansion. float32 x and values multiply in float32 (`input_precision="ieee"` when
`torch.get_float32_matmul_precision()` is "highest", the default, else TF32); float16/bfloat16
x with values of the same dtype run on the half-precision tensor cores with float32
accumulation. The output is float32 either way, as the op's.

Under `TRITON_INTERPRET=1` (set before this module is imported) the same kernels run on CPU
tensors with one small fixed configuration; on a GPU they are autotuned.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import checks

# ---- activation quantization -----------------------------------------------------------------


@triton.jit
def _round_half_even(v):
    """v rounded to the nearest integer, ties to even, as int32 (torch.round's rounding).
    Built from floor, compares and integer ops (no libdevice: the interpreter has none).
    Exact for |v| < 2**22; callers clamp v to a small range first."""
    f = tl.floor(v)
    d = v - f  # exact: f and v are within 1 of each other
    fi = f.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))
    return fi + up.to(tl.int32)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, K, stride_xm, stride_cm, inv_scale, zero_point,
                     DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
    """Row `program_id(0)` of x -> int8 codes q - 128 (and, dynamic, the row's scale)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    c_row = codes_ptr + row * stride_cm
    if DYNAMIC:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        row_max = tl.max(amax, axis=0)
        scale = tl.math.div_rn(row_max, 127.0)
        scale = tl.where(row_max == 0.0, 1.0, scale)
        tl.store(scales_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -128.0), 128.0)
            q = tl.minimum(tl.maximum(_round_half_even(v), -127), 127)  # = q_u8 - 128
            tl.store(c_row + offs, q.to(tl.int8), mask=mask)
    else:
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            # The clamp keeps the rounding exact and stops x * inv_scale fusing into an FMA.
            v = tl.minimum(tl.maximum(x * inv_scale, -512.0), 512.0)
            q = tl.minimum(tl.maximum(_round_half_even(v) + zero_point, 0), 255)
            tl.store(c_row + offs, (q - 128).to(tl.int8), mask=mask)


# ---- int8 GEMM with fused dequantization -----------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped along M so neighbouring programs share tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, out_ptr, w_scale_ptr, w_sum_ptr, bias_ptr, x_scales_ptr,
                      M, N, K, stride_am, stride_wn, stride_om, x_scale, correction,
                      DYNAMIC: tl.constexpr, HAS_CORRECTION: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """out[m, n] = (sum_k a[m, k] w[n, k] + correction * w_sum[n]) * s_m * w_scale[n] + bias[n]
    with a, w int8 (row-major, unit stride along K) and an int32 accumulator."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_CORRECTION:
        w_sum = tl.load(w_sum_ptr + offs_n, mask=mask_n, other=0)
        acc += correction * w_sum[None, :]
    w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    if DYNAMIC:
        s = tl.load(x_scales_ptr + offs_m, mask=mask_m, other=0.0)
        out = acc.to(tl.float32) * (s[:, None] * w_scale[None, :])
    else:
        out = acc.to(tl.float32) * (x_scale * w_scale)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


# ---- 2:4-sparse GEMM --------------------------------------------------------------------------


@triton.jit
def _sparse24_gemm_kernel(x_ptr, v_ptr, i_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_vn, stride_in,
                          stride_om, HAS_BIAS: tl.constexpr, FP32: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """out = x @ W^T + bias, W [N, K] given as kept values [N, K/2] and position nibbles
    [N, ceil(K/8)] (pack_sparse24's format), expanded tile by tile in registers."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)  # kept values of a K tile
    offs_b = tl.arange(0, BLOCK_K // 8)  # index bytes of a K tile
    mask_m = offs_m < M
    mask_n = offs_n < N
    half_k = K // 2
    index_bytes = (K + 7) // 8
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    v_ptrs = v_ptr + offs_n.to(tl.int64)[:, None] * stride_vn + offs_v[None, :]
    i_ptrs = i_ptr + offs_n.to(tl.int64)[:, None] * stride_in + offs_b[None, :]
    pos = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        vals = tl.load(v_ptrs, mask=mask_n[:, None] & (offs_v < half_k - k0 // 2)[None, :], other=0.0)
        idx = tl.load(i_ptrs, mask=mask_n[:, None] & (offs_b < index_bytes - k0 // 8)[None, :], other=0)
        idx = idx.to(tl.int32)
        # group 2j sits in the low nibble of byte j, group 2j + 1 in the high nibble
        nib = tl.reshape(tl.join(idx & 15, idx >> 4), (BLOCK_N, BLOCK_K // 4))
        i0 = (nib & 3)[:, :, None]
        i1 = (nib >> 2)[:, :, None]
        v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
        w = tl.where(pos == i0, v0[:, :, None], tl.where(pos == i1, v1[:, :, None], 0.0))
        w = tl.reshape(w.to(vals.dtype), (BLOCK_N, BLOCK_K))
        if FP32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        v_ptrs += BLOCK_K // 2
        i_ptrs += BLOCK_K // 8
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


# ---- launch configuration ---------------------------------------------------------------------

def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_quantize_kernel, InterpretedFunction)


INTERPRETED = _interpreted()
"""True when TRITON_INTERPRET=1 was set when this module was imported: the kernels then run
on CPU tensors, one small fixed configuration each (the interpreter runs programs one by one)."""

_INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group), num_warps=warps, num_stages=stages)


_INT8_CONFIGS = [
    _cfg(16, 64, 256, 4, 4), _cfg(16, 128, 128, 4, 4), _cfg(32, 128, 128, 4, 4), _cfg(64, 128, 128, 4, 4),
    _cfg(128, 64, 128, 4, 4), _cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3),
]
_SPARSE_CONFIGS = [
    _cfg(16, 64, 64, 4, 4), _cfg(16, 128, 64, 4, 4), _cfg(32, 64, 64, 4, 4), _cfg(64, 64, 64, 4, 3),
    _cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(128, 128, 32, 8, 3), _cfg(128, 128, 64, 8, 3),
]
# Autotuned variants for GPUs (keyed on the shape; the autotuner adds the argument dtypes).
_int8_gemm_tuned = triton.autotune(configs=_INT8_CONFIGS, key=["M", "N", "K", "DYNAMIC"])(_int8_gemm_kernel)
_sparse24_gemm_tuned = triton.autotune(configs=_SPARSE_CONFIGS, key=["M", "N", "K", "PRECISION"])(
    _sparse24_gemm_kernel)


def _launch_gemm(kernel, tuned, M: int, N: int, *args, **kwargs) -> None:
    if INTERPRETED:
        grid = (triton.cdiv(M, _INTERPRETER_GEMM["BLOCK_M"]) * triton.cdiv(N, _INTERPRETER_GEMM["BLOCK_N"]),)
        kernel[grid](*args, **kwargs, **_INTERPRETER_GEMM)
    else:
        tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **kwargs)


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32 (as torch casts a Python scalar for a float32 op)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRETED:
            raise ValueError("the Triton kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
                             "set before triton_ops is imported)")


def _rows(x: Tensor, k: int, op: str) -> Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{op}: input's last dim is {x.shape[-1]}, the weight expects {k}")
    rows = x.reshape(-1, k)
    if rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        rows = rows.float()
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _float32_per_channel(t: Optional[Tensor], n: int, name: str) -> Optional[Tensor]:
    if t is None:
        return None
    t = t.reshape(-1).to(torch.float32).contiguous()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, the weight has {n} output channels")
    return t


# ---- entry points -----------------------------------------------------------------------------

def quantize_activations(rows: Tensor, x_scale: Optional[float], x_zero_point: int) -> tuple[Tensor, Optional[Tensor]]:
    """(codes, scales) of float rows [M, K]: int8 codes q - 128 of the u8 quantization that
    `int8_linear` applies, and the per-row float32 scales when dynamic (x_scale None)."""
    _check_device(rows)
    m, k = rows.shape
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    codes = torch.empty(m, k, dtype=torch.int8, device=rows.device)
    dynamic = x_scale is None
    scales = torch.empty(m, dtype=torch.float32, device=rows.device) if dynamic else None
    if m == 0:
        return codes, scales
    # float32(1 / x_scale): quantize_per_tensor multiplies the float32 input by the Python
    # float 1/scale, which torch rounds to the tensor's dtype first.
    inv_scale = 0.0 if dynamic else _float32(1.0 / x_scale)
    block = min(triton.next_power_of_2(max(k, 1)), 64 if INTERPRETED else 2048)
    extra = {} if INTERPRETED else dict(num_warps=4 if block <= 1024 else 8)
    _quantize_kernel[(m,)](rows, codes, scales if dynamic else codes, k, rows.stride(0), codes.stride(0),
                           inv_scale, 0 if dynamic else int(x_zero_point), DYNAMIC=dynamic, BLOCK=block, **extra)
    return codes, scales


def int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_sum: Tensor, bias: Optional[Tensor],
                x_scale: Optional[float], x_zero_point: int, weight_bits: int = 8) -> Tensor:
    """edge::int8_linear: dequant(quant(x) @ weightᵀ) + bias with int32 accumulation.

    x float [..., K] (float32, float16 or bfloat16; quantized from its float32 value);
    weight int8 codes [N, K]; weight_scale [N]; weight_sum int [N] (row sums of the codes);
    bias [N] or None. x_scale a float: static per-tensor u8 quantization with x_zero_point;
    None: dynamic per-token symmetric quantization (zero point 128). weight_bits is accepted
    for the op's signature and unused (the int32 tensor-core dot is exact for 8-bit codes).
    Returns float32 [..., N]."""
    checks.int8_linear("int8_linear", x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, weight_bits)
    n, k = weight.shape
    rows = _rows(x, k, "int8_linear")
    _check_device(rows, weight)
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=rows.device)
    if m and n:
        dynamic = x_scale is None
        codes, scales = quantize_activations(rows, x_scale, x_zero_point)
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        w_scale = _float32_per_channel(weight_scale, n, "weight_scale")
        w_sum = weight_sum.reshape(-1).to(torch.int32).contiguous()
        b = _float32_per_channel(bias, n, "bias")
        correction = 0 if dynamic else 128 - int(x_zero_point)
        _launch_gemm(_int8_gemm_kernel, _int8_gemm_tuned, m, n,
                     codes, w, out, w_scale, w_sum, out if b is None else b, out if scales is None else scales,
                     m, n, k, codes.stride(0), w.stride(0), out.stride(0), 1.0 if dynamic else float(x_scale),
                     correction, DYNAMIC=dynamic, HAS_CORRECTION=correction != 0, HAS_BIAS=b is not None)
    return out.reshape(*x.shape[:-1], n)


def _fp32_dot_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def sparse24_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor],
                    weight_scale: Optional[Tensor] = None, x_scale: Optional[float] = None, x_zero_point: int = 0,
                    *, precision: Optional[str] = None) -> Tensor:
    """edge::sparse24_linear: x @ Wᵀ + bias, W [N, K] 2:4-sparse as `ops.pack_sparse24` packs it
    (values [N, K/2], indices u8 [N, ceil(K/8)]).

    Float values: the kernel expands each [BLOCK_N, BLOCK_K] weight tile from its kept values
    and 2-bit positions in registers and runs a dense `tl.dot`. There is no sparse tensor-core
    MMA in Triton, so the FLOPs are the dense ones; what the 2:4 format saves is weight memory
    traffic (17/32 of the dense float32 bytes, 9/16 of float16), which is the cost at small M.
    float16/bfloat16 x with values of the same dtype use the half-precision tensor cores
    (float32 accumulation); anything else runs in float32, with `precision` ("ieee", "tf32",
    "tf32x3"; default from torch.get_float32_matmul_precision(): "highest" -> "ieee").
    int8 values (with weight_scale, x quantized as in int8_linear): decompressed to dense codes
    and run by `int8_linear`, as the op defines. Returns float32 [..., N]."""
    checks.sparse24_linear("sparse24_linear", x, values, indices, bias, weight_scale, x_scale, x_zero_point)
    n, k = values.shape[0], checks.sparse24_k(values)
    if values.dtype == torch.int8:
        from .ops import int8_weight_sum, unpack_sparse24  # lazily: ops registers these kernels
        dense = unpack_sparse24(values, indices, k)
        return int8_linear(x, dense, weight_scale, int8_weight_sum(dense), bias, x_scale, x_zero_point)
    rows = _rows(x, k, "sparse24_linear")
    _check_device(rows, values, indices)
    half = rows.dtype in (torch.float16, torch.bfloat16) and values.dtype == rows.dtype
    if not half:
        rows = rows.float() if rows.dtype != torch.float32 else rows
        values = values.float()
    values = values.contiguous()
    indices = indices.to(torch.uint8).contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=rows.device)
    if m and n:
        b = _float32_per_channel(bias, n, "bias")
        _launch_gemm(_sparse24_gemm_kernel, _sparse24_gemm_tuned, m, n,
                     rows, values, indices, out if b is None else b, out, m, n, k, rows.stride(0), values.stride(0),
                     indices.stride(0), out.stride(0), HAS_BIAS=b is not None, FP32=not half,
                     PRECISION=precision or _fp32_dot_precision())
    return out.reshape(*x.shape[:-1], n)
