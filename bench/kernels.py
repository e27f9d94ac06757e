"""Per-op kernel benchmark: `edgepasses bench kernels`.

For each op and shape, every implementation that exists here is timed in one interleaved run
(`timing.measure_side_by_side`): our C++ kernel, our Triton kernel (CUDA only), OpenVINO
(the same layer lowered through `edgepasses.lower`), torch fp32 and, for int8, torch's own
int8 CPU kernel (FBGEMM dynamic quantized linear). Ratios are against torch fp32 of the same
shape. TVM is not timed per op: its target builds whole graphs (its int8 convs are timed by
`python -m edgepasses.bench.tvm_bench --int8`).

The linear ops take M×K×N shapes; int8_conv2d runs its own layers (`CONV_LAYERS`: ResNet-style
3×3 and 1×1 convs, batch 1), with weights prepared as the lowering prepares them; int8_bmm runs
attention's matmuls (`BMM_SHAPES`: Q·Kᵀ and P·V of a MiniLM and of BERT-base) against torch's
fp32 matmul, and against the fake-quant matmul the reference target ran before it had the kernel.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import edgepasses
from edgepasses.kernels import ops
from edgepasses.measure.timing import measure_side_by_side

OPS = ("int8_linear", "sparse24_linear", "lowrank_linear", "int8_conv2d", "int8_bmm")
DEFAULT_SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096))
BASELINE = "torch fp32"


@dataclass(frozen=True)
class ConvLayer:
    channels: int
    size: int           # height = width
    out_channels: int
    kernel: int
    stride: int = 1
    groups: int = 1

    def __str__(self) -> str:
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return (f"{self.channels}x{self.size}x{self.size}→{self.out_channels} "
                f"k{self.kernel} s{self.stride}{groups}")


CONV_LAYERS = (ConvLayer(64, 56, 64, 3), ConvLayer(256, 14, 256, 3), ConvLayer(512, 7, 512, 3),
               ConvLayer(256, 14, 1024, 1))


@dataclass(frozen=True)
class BmmShape:
    name: str
    batch: int          # batch · heads
    m: int
    k: int
    n: int
    transpose_b: bool   # Q·Kᵀ: b is K [batch, N, K], read in place

    def __str__(self) -> str:
        return f"{self.name} {self.batch}x{self.m}x{self.k}x{self.n}"


BMM_SHAPES = (BmmShape("MiniLM Q·Kᵀ", 8 * 12, 64, 32, 64, True), BmmShape("MiniLM P·V", 8 * 12, 64, 64, 32, False),
              BmmShape("BERT-base Q·Kᵀ", 12, 128, 64, 128, True),
              BmmShape("BERT-base P·V", 12, 128, 128, 64, False))


@dataclass(frozen=True)
class KernelRow:
    op: str
    shape: str              # M×K×N, or the conv layer
    candidate: str
    median_ms: float
    min_ms: float
    max_ms: float
    speedup: float          # torch fp32 median / this median


def _openvino(model: nn.Module, x: torch.Tensor, pipeline: str, calibration=None) -> Callable:
    gm = edgepasses.compress(model, (x,), pipeline, calibration=calibration)
    return edgepasses.lower(gm, (x,), target="openvino")


def _int8_codes(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(1) / qmax
    return torch.round(weight / scale[:, None]).clamp(-qmax, qmax).to(torch.int8), scale


def int8_linear_candidates(x: torch.Tensor, linear: nn.Linear) -> dict[str, Callable]:
    w, b = linear.weight.detach(), linear.bias.detach()
    x_scale, x_zp = float((x.max() - x.min()) / 255), int(torch.round(-x.min() / ((x.max() - x.min()) / 255)))
    codes7, scale7 = _int8_codes(w, 63)     # the range our quantizer emits on CPUs without VNNI
    codes8, scale8 = _int8_codes(w, 127)
    sum7, sum8 = ops.int8_weight_sum(codes7), ops.int8_weight_sum(codes8)
    packed = torch.ops.quantized.linear_prepack(torch.quantize_per_channel(w, scale8, torch.zeros_like(scale8, dtype=torch.long), 0, torch.qint8), b)
    calibration = [(x,)]
    candidates = {
        BASELINE: lambda: F.linear(x, w, b),
        "torch int8 dynamic (FBGEMM)": lambda: torch.ops.quantized.linear_dynamic(x, packed),
        "openvino int8": (lambda fn=_openvino(linear, x, "quantize", calibration): fn(x)),
        "edge C++ int8, 7-bit weights": lambda: ops.int8_linear(x, codes7, scale7, sum7, b, x_scale, x_zp, 7),
        "edge C++ int8, 8-bit weights": lambda: ops.int8_linear(x, codes8, scale8, sum8, b, x_scale, x_zp, 8),
        "edge C++ int8, per-token dynamic": lambda: ops.int8_linear(x, codes7, scale7, sum7, b, None, 0, 7),
    }
    if torch.cuda.is_available():
        xc, cc, sc, sm, bc = (t.cuda() for t in (x, codes8, scale8, sum8, b))
        candidates["edge Triton int8 (CUDA)"] = lambda: ops.int8_linear(xc, cc, sc, sm, bc, x_scale, x_zp, 8)
    return candidates


def magnitude_24(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the 2 smallest-magnitude entries of every group of 4 along K set to zero."""
    from edgepasses.passes.sparsify_24 import keep_2_of_4  # the passes load only for the ops that use them

    return weight * keep_2_of_4(weight.abs())


def sparse24_linear_candidates(x: torch.Tensor, linear: nn.Linear) -> dict[str, Callable]:
    with torch.no_grad():
        linear.weight.copy_(magnitude_24(linear.weight))
    w, b = linear.weight.detach(), linear.bias.detach()
    values, indices = ops.pack_sparse24(w)
    candidates = {
        BASELINE: lambda: F.linear(x, w, b),
        "openvino fp32 (dense, masked weight)": (lambda fn=_openvino(linear, x, "dce"): fn(x)),
        "edge C++ sparse24 fp32": lambda: ops.sparse24_linear(x, values, indices, b, None, None, 0),
    }
    if torch.cuda.is_available():
        xc, vc, ic, bc = (t.cuda() for t in (x, values, indices, b))
        candidates["edge Triton sparse24 (CUDA)"] = lambda: ops.sparse24_linear(xc, vc, ic, bc, None, None, 0)
    return candidates


def lowrank_linear_candidates(x: torch.Tensor, linear: nn.Linear) -> dict[str, Callable]:
    rank = min(linear.weight.shape) // 4
    w, b = linear.weight.detach(), linear.bias.detach()
    u, s, vh = torch.svd_lowrank(w, q=rank, niter=2)
    first, second = (vh.T * s.sqrt()[:, None]).contiguous(), (u * s.sqrt()).contiguous()
    pair = nn.Sequential(nn.Linear(w.shape[1], rank, bias=False), nn.Linear(rank, w.shape[0])).eval()
    with torch.no_grad():
        pair[0].weight.copy_(first), pair[1].weight.copy_(second), pair[1].bias.copy_(b)
    return {
        BASELINE: lambda: F.linear(x, w, b),
        f"torch fp32, rank {rank} pair": lambda: F.linear(F.linear(x, first), second, b),
        f"openvino fp32, rank {rank} pair": (lambda fn=_openvino(pair, x, "dce"): fn(x)),
        f"edge lowrank_linear, rank {rank}": lambda: ops.lowrank_linear(x, first, second, b),
    }


def int8_conv2d_candidates(x: torch.Tensor, conv: nn.Conv2d) -> dict[str, Callable]:
    w, b = conv.weight.detach(), conv.bias.detach()
    x_scale, x_zp = float((x.max() - x.min()) / 255), int(torch.round(-x.min() / ((x.max() - x.min()) / 255)))
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    candidates = {BASELINE: lambda: F.conv2d(x, w, b, *geometry)}
    for bits, qmax in ((7, 63), (8, 127)):
        codes, scale = _int8_codes(w.flatten(1), qmax)
        codes = codes.reshape(w.shape)
        packed, sums = ops.pack_int8_conv2d_weight(codes), ops.int8_weight_sum(codes)
        candidates[f"edge C++ int8, {bits}-bit weights"] = (
            lambda p=packed, s=scale, sm=sums, bits=bits: ops.int8_conv2d(x, p, s, sm, b, *geometry, x_scale, x_zp, bits))
        if bits == 7:  # the packing's own cost, as if it still ran on every call
            candidates["edge C++ int8, 7-bit + packing per call"] = (
                lambda c=codes, p=packed, s=scale, sm=sums: (ops.pack_int8_conv2d_weight(c), ops.int8_conv2d(
                    x, p, s, sm, b, *geometry, x_scale, x_zp, 7)))
    return candidates


def _u8_qparams(t: torch.Tensor) -> tuple[float, int]:
    """Min-max static u8 scale and zero point of `t` (as calibration would give them)."""
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(round(-lo / scale))


def int8_bmm_candidates(a: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> dict[str, Callable]:
    (sa, za), (sb, zb) = _u8_qparams(a), _u8_qparams(b)
    qd = torch.ops.quantized_decomposed

    def fake_quant(t, scale, zp):
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(t, scale, zp, 0, 255, torch.uint8), scale, zp, 0, 255,
                                        torch.uint8)

    def right(t):
        return t.transpose(-1, -2) if transpose_b else t

    return {
        BASELINE: lambda: torch.matmul(a, right(b)),
        "torch fp32 on fake-quant operands (reference before)":
            lambda: torch.matmul(fake_quant(a, sa, za), right(fake_quant(b, sb, zb))),
        "edge C++ int8_bmm": lambda: ops.int8_bmm(a, b, sa, za, sb, zb, transpose_b),
    }


def bench_bmm(shape: BmmShape, warmup: int, rounds: int) -> list[KernelRow]:
    torch.manual_seed(0)
    a = torch.randn(shape.batch, shape.m, shape.k)
    b = torch.randn(shape.batch, *((shape.n, shape.k) if shape.transpose_b else (shape.k, shape.n)))
    if not shape.transpose_b:  # P·V: a holds probabilities
        a = a.softmax(-1)
    with torch.no_grad():
        timings = measure_side_by_side(int8_bmm_candidates(a, b, shape.transpose_b), warmup, rounds)
    return _rows("int8_bmm", str(shape), timings)


def bench_conv(layer: ConvLayer, warmup: int, rounds: int) -> list[KernelRow]:
    torch.manual_seed(0)
    conv = nn.Conv2d(layer.channels, layer.out_channels, layer.kernel, layer.stride, layer.kernel // 2,
                     groups=layer.groups).eval()
    x = torch.randn(1, layer.channels, layer.size, layer.size)
    with torch.no_grad():
        timings = measure_side_by_side(int8_conv2d_candidates(x, conv), warmup, rounds)
    return _rows("int8_conv2d", str(layer), timings)


def _rows(op: str, shape: str, timings) -> list[KernelRow]:
    base = timings[BASELINE].median_ms
    return [KernelRow(op, shape, name, t.median_ms, t.min_ms, t.max_ms, base / t.median_ms)
            for name, t in timings.items()]


CANDIDATES = {"int8_linear": int8_linear_candidates, "sparse24_linear": sparse24_linear_candidates,
              "lowrank_linear": lowrank_linear_candidates}


def bench_op(op: str, shape: tuple[int, int, int], warmup: int, rounds: int) -> list[KernelRow]:
    m, k, n = shape
    torch.manual_seed(0)
    linear = nn.Linear(k, n).eval()
    x = torch.randn(m, k)
    with torch.no_grad():
        timings = measure_side_by_side(CANDIDATES[op](x, linear), warmup, rounds)
    return _rows(op, f"{m}x{k}x{n}", timings)


def to_markdown(rows: list[KernelRow]) -> str:
    lines = ["| op | shape (M×K×N, conv layer, or batch×M×K×N) | implementation | median ms | min–max | vs torch fp32 |", "|---|---|---|---:|---|---:|"]
    lines += [f"| {r.op} | {r.shape} | {r.candidate} | {r.median_ms:.3g} | {r.min_ms:.3g}–{r.max_ms:.3g} | "
              f"{r.speedup:.2f}x |" for r in rows]
    notes = ["TVM: not timed per op (it builds whole graphs; "
             "`python -m edgepasses.bench.tvm_bench --int8` times its int8 convs)."]
    if not torch.cuda.is_available():
        notes.append("Triton: no CUDA GPU here; `python -m edgepasses.bench.gpu_kernels` times the Triton "
                     "kernels where there is one.")
    return "\n".join(lines + [""] + notes)


def bench_kernels(op_names: list[str], shapes: list[tuple[int, int, int]], warmup: int, rounds: int,
                  json_path: str | None = None) -> list[KernelRow]:
    """Times each op in `op_names`: the linear ops at `shapes` (M, K, N), int8_conv2d at CONV_LAYERS,
    int8_bmm at BMM_SHAPES."""
    rows = []
    for op in op_names:
        if op == "int8_conv2d":
            for layer in CONV_LAYERS:
                rows += bench_conv(layer, warmup, rounds)
            continue
        if op == "int8_bmm":
            for shape in BMM_SHAPES:
                rows += bench_bmm(shape, warmup, rounds)
            continue
        for shape in shapes:
            rows += bench_op(op, shape, warmup, rounds)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return rows
