"""The Triton kernels of `edge::int8_linear` and `edge::sparse24_linear` on an NVIDIA GPU:
correctness against torch references, then latency against torch's own kernels.

    python -m edgepasses.bench.gpu_kernels [--out PATH] [--m 1 16 128 1024 4096] [--k 4096] [--n 4096] [--quick]

1. Correctness, on CUDA: activation codes equal torch's quantization bit for bit; int8 outputs
   match the float64 dequantization of the exact integer sums sum_k (q - zp) * w; 2:4 outputs
   match the float64 dense matmul of the unpacked weight. Shapes include M = 1 and odd sizes.
2. Timing for y = x Wᵀ (+ bias), W [N, K], K = N = 4096 by default, each M of --m, with
   `triton.testing.do_bench` (L2 flushed before each call; median and min–max in ms):
     int8:  ours static per-tensor / dynamic per-token (both include quantizing x and the
            dequantization epilogue) vs `torch._int_mm` (the bare int8 x int8 -> int32 GEMM on
            pre-quantized x; needs M > 16 and multiples of 8) vs fp16 / fp32 `F.linear`;
     2:4:   ours in fp32 and fp16 vs torch's semi-structured sparse fp16 weight
            (`to_sparse_semi_structured`, sparse tensor cores) vs dense fp16 / fp32 `F.linear`.
   Our 2:4 kernel expands the weight in registers and runs a dense MMA (Triton has no sparse
   MMA): expect its gain over dense at small M (weight bytes), not at large M (FLOPs).

Prints Markdown tables and writes everything as JSON to --out. Exits with a message when no CUDA
GPU is present. Exit status 1 when a correctness check fails (timings are still written).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_kernels.json"
M_SIZES = [1, 16, 128, 1024, 4096]

INT8_COLUMNS = ["int8 static (ours)", "int8 dynamic (ours)", "torch._int_mm", "F.linear fp16", "F.linear fp32"]
SPARSE_COLUMNS = ["2:4 fp32 (ours)", "F.linear fp32", "2:4 fp16 (ours)", "semi-structured fp16 (torch)",
                  "F.linear fp16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m edgepasses.bench.gpu_kernels",
        description="Correctness and latency of the Triton int8_linear and sparse24_linear kernels on an NVIDIA GPU, "
                    "against torch._int_mm, torch's semi-structured sparse matmul and dense F.linear.")
    parser.add_argument("--m", type=int, nargs="+", default=list(M_SIZES), help="rows of x (default %(default)s)")
    parser.add_argument("--k", type=int, default=4096, help="reduction dim, a multiple of 8 (default %(default)s)")
    parser.add_argument("--n", type=int, default=4096, help="output features (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args(argv)
    if args.k % 8 or args.k <= 0 or args.n <= 0 or min(args.m) <= 0:
        parser.error(f"need K a positive multiple of 8 and positive N and M; got K={args.k}, N={args.n}, M={args.m}")
    return args


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels: no CUDA GPU is available here (torch.cuda.is_available() is False); this "
                         "benchmark runs the Triton kernels on an NVIDIA GPU. The kernels' CPU tests run them in "
                         "Triton's interpreter: pytest tests/kernels/test_triton_ops.py")
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"gpu_kernels: triton is not importable ({error}); pip install 'edgepasses[triton]'")
    from edgepasses.kernels import triton_ops
    if triton_ops.INTERPRETED:
        raise SystemExit("gpu_kernels: TRITON_INTERPRET is set, so the kernels would run in the interpreter; "
                         "unset it to benchmark the GPU")


# ---- references -------------------------------------------------------------------------------

def _reference_codes(rows: torch.Tensor, x_scale: float | None, zero_point: int):
    """(u8 codes, float64 scale (column or scalar)) of torch's activation quantization."""
    rows = rows.float()
    if x_scale is None:
        s = rows.abs().amax(-1) / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        return torch.clamp(torch.round(rows / s[:, None]), -127, 127).long() + 128, s.double()[:, None], s
    inv = float(torch.tensor(1.0 / x_scale, dtype=torch.float32))
    q = torch.clamp(torch.round(rows * inv) + zero_point, 0, 255).long()
    return q, x_scale, None


def _sparse_dense(n: int, k: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random 2:4-sparse [N, K] weight (two random positions kept per group of 4)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dense = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return (dense * mask).to(device=device, dtype=dtype)


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


CHECK_SHAPES = [(1, 5, 12), (17, 33, 40), (130, 257, 520), (64, 4096, 4096)]  # (M, N, K)


def check_correctness(device: str = "cuda", shapes=CHECK_SHAPES) -> list[dict[str, Any]]:
    """One record per case: name, shape, ok, max error relative to the output's max, details."""
    from edgepasses.kernels import triton_ops
    from edgepasses.kernels.ops import pack_sparse24
    records = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def record(name, shape, ok, rel_err, **details):
        records.append(dict(name=name, shape=shape, ok=bool(ok), max_rel_err=rel_err, **details))

    for m, n, k in shapes:
        x = (torch.randn(m, k, generator=g) * 3).to(device)
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).to(device)
        w_scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device)
        w_sum = w.sum(1, dtype=torch.int32)
        bias = torch.randn(n, generator=g).to(device)
        for x_scale, zp in [(0.04, 37), (0.02, 128), (None, 128)]:
            name = f"int8_linear {'dynamic' if x_scale is None else f'static zp={zp}'}"
            try:
                q_ref, s, s_row = _reference_codes(x, x_scale, zp)
                codes, scales = triton_ops.quantize_activations(x, x_scale, zp)
                codes_exact = torch.equal(codes.long() + 128, q_ref)
                scales_exact = s_row is None or torch.equal(scales, s_row)
                zp_ref = 128 if x_scale is None else zp
                ref = ((q_ref - zp_ref).double() @ w.double().T) * s * w_scale.double() + bias.double()
                out = triton_ops.int8_linear(x, w, w_scale, w_sum, bias, x_scale, zp)
                err = _max_rel_err(out, ref)
                record(name, [m, n, k], codes_exact and scales_exact and err < 1e-5, err,
                       codes_exact=codes_exact, scales_exact=scales_exact)
            except Exception as error:  # noqa: BLE001 -- reported, the run goes on
                record(name, [m, n, k], False, None, error=repr(error))

    for m, n, k in shapes:
        dense = _sparse_dense(n, k, device, seed=m + n)
        values, indices = pack_sparse24(dense)
        bias = torch.randn(n, generator=g).to(device)
        x = torch.randn(m, k, generator=g).to(device)
        for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 1e-4)]:
            name = f"sparse24_linear {str(dtype).removeprefix('torch.')}"
            try:
                xd, vd = x.to(dtype), values.to(dtype)
                ref = xd.double() @ dense.to(dtype).double().T + bias.double()
                out = triton_ops.sparse24_linear(xd, vd, indices, bias)
                err = _max_rel_err(out, ref)
                record(name, [m, n, k], err < tol, err)
            except Exception as error:  # noqa: BLE001
                record(name, [m, n, k], False, None, error=repr(error))
    return records


# ---- timing -----------------------------------------------------------------------------------

def time_ms(fn: Callable[[], Any], quick: bool) -> dict[str, Any]:
    """do_bench samples (ms; L2 flushed before each call): median, min, max and their count."""
    import statistics

    import triton.testing
    samples = triton.testing.do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="all")
    samples = [float(s) for s in samples]
    return dict(median_ms=statistics.median(samples), min_ms=min(samples), max_ms=max(samples), n=len(samples))


def _candidates(m: int, n: int, k: int, device: str = "cuda") -> dict[str, Callable[[], Any] | str]:
    """name -> call, or -> the reason it does not run at this shape."""
    from edgepasses.kernels import triton_ops
    from edgepasses.kernels.ops import pack_sparse24
    g = torch.Generator(device="cpu").manual_seed(m)
    x32 = torch.randn(m, k, generator=g).to(device)
    x16 = x32.half()
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g).to(device)
    w_scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device)
    w_sum = w8.sum(1, dtype=torch.int32)
    bias32 = torch.randn(n, generator=g).to(device)
    bias16 = bias32.half()
    dense32 = _sparse_dense(n, k, device, seed=m)
    dense16 = dense32.half()
    values32, indices = pack_sparse24(dense32)
    values16 = values32.half()
    cands: dict[str, Callable[[], Any] | str] = {
        "int8 static (ours)": lambda: triton_ops.int8_linear(x32, w8, w_scale, w_sum, bias32, 0.05, 3),
        "int8 dynamic (ours)": lambda: triton_ops.int8_linear(x32, w8, w_scale, w_sum, bias32, None, 128),
        "F.linear fp16": lambda: F.linear(x16, dense16, bias16),
        "F.linear fp32": lambda: F.linear(x32, dense32, bias32),
        "2:4 fp32 (ours)": lambda: triton_ops.sparse24_linear(x32, values32, indices, bias32),
        "2:4 fp16 (ours)": lambda: triton_ops.sparse24_linear(x16, values16, indices, bias32),
    }
    if m > 16 and m % 8 == 0 and n % 8 == 0:
        x8, _ = triton_ops.quantize_activations(x32, 0.05, 128)
        w8t = w8.t()
        cands["torch._int_mm"] = lambda: torch._int_mm(x8, w8t)
    else:
        cands["torch._int_mm"] = "needs M > 16 and M, K, N multiples of 8"
    try:
        from torch.sparse import to_sparse_semi_structured
        sparse16 = to_sparse_semi_structured(dense16)
        F.linear(x16, sparse16, bias16)
        cands["semi-structured fp16 (torch)"] = lambda: F.linear(x16, sparse16, bias16)
    except Exception as error:  # noqa: BLE001 -- unsupported GPU or shape: reported in the table
        cands["semi-structured fp16 (torch)"] = f"unavailable: {type(error).__name__}: {str(error)[:160]}"
    return cands


def run_timings(args: argparse.Namespace) -> dict[int, dict[str, dict[str, Any]]]:
    timings: dict[int, dict[str, dict[str, Any]]] = {}
    for m in args.m:
        row: dict[str, dict[str, Any]] = {}
        for name, call in _candidates(m, args.n, args.k).items():
            if isinstance(call, str):
                row[name] = {"skipped": call}
                continue
            try:
                row[name] = time_ms(call, args.quick)
            except Exception as error:  # noqa: BLE001
                row[name] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            torch.cuda.empty_cache()
        timings[m] = row
        print(f"M={m}: " + ", ".join(f"{name} {r['median_ms']:.4f} ms" for name, r in row.items() if "median_ms" in r),
              file=sys.stderr, flush=True)
    return timings


# ---- report -----------------------------------------------------------------------------------

def _cell(result: dict[str, Any]) -> str:
    if "median_ms" in result:
        return f"{result['median_ms']:.4f} ({result['min_ms']:.4f}–{result['max_ms']:.4f})"
    return "n/a: " + (result.get("skipped") or result.get("error", "?"))[:60]


def markdown(timings: dict[int, dict[str, dict[str, Any]]], columns: list[str], title: str) -> str:
    lines = [f"### {title}", "", "| M | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for m, row in timings.items():
        lines.append(f"| {m} | " + " | ".join(_cell(row.get(c, {"skipped": "not run"})) for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _require_gpu()
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"# Triton kernels on {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
          f"triton {triton.__version__}, K={args.k}, N={args.n}\n")
    checks = check_correctness()
    failed = [c for c in checks if not c["ok"]]
    print("## Correctness\n")
    print("| case | M, N, K | ok | max rel err |\n|---|---|---|---:|")
    for c in checks:
        err = "—" if c["max_rel_err"] is None else f"{c['max_rel_err']:.2e}"
        print(f"| {c['name']} | {c['shape']} | {'yes' if c['ok'] else 'NO ' + c.get('error', '')} | {err} |")
    print()
    timings = run_timings(args)
    print("## Latency, ms: median (min–max) over do_bench samples, L2 flushed\n")
    print(markdown(timings, INT8_COLUMNS, f"int8 linear, K={args.k}, N={args.n} (ours includes quantizing x; "
                                          "torch._int_mm is the bare GEMM)"))
    print()
    print(markdown(timings, SPARSE_COLUMNS, f"2:4 sparse linear, K={args.k}, N={args.n}"))
    result = dict(device=props.name, capability=f"{props.major}.{props.minor}", torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), K=args.k, N=args.n,
                  correctness=checks, timings={str(m): row for m, row in timings.items()},
                  env={k: v for k, v in os.environ.items() if k.startswith(("CUDA_", "TRITON_"))})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if failed:
        print(f"gpu_kernels: {len(failed)} correctness check(s) failed: " + ", ".join(
            f"{c['name']} {c['shape']}" for c in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
