"""The Triton kernels (kernels/triton_ops.py) against torch references, on the CPU through
Triton's interpreter.

`@triton.jit` decides at decoration time whether it compiles for a GPU or interprets, from
TRITON_INTERPRET. Another test module in the same pytest worker may have imported the kernels
first without it, so the kernel cases run in a subprocess that sets TRITON_INTERPRET=1 before
importing anything: this file run as a script (`python test_triton_ops.py [int8] [sparse24]`)
runs the cases and prints one JSON line of results, which the test below checks.

References are exact where the op is exact: activation codes equal torch's quantization
(quantize_per_tensor for static, the per-token formula for dynamic); the int8 output is the
float64 dequantization of the integer sum_k (q - zp) * w; with unit scales and no bias the
output must equal that integer bit for bit. The 2:4 kernel is compared with the dense matmul
(float64) of the unpacked weight.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARK = "TRITON_CASES_RESULT "


# ---- cases (run in the interpreter subprocess) ------------------------------------------------

def _reference_codes(x, x_scale, zero_point):
    """(q - zp as int64, per-row scale as float64 column or float) of torch's quantization."""
    import torch
    x = x.float()
    if x_scale is None:
        s = x.abs().amax(-1) / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.clamp(torch.round(x / s[:, None]), -127, 127).long()
        return q, s.double()[:, None], q + 128, s
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, x_scale, zero_point, 0, 255, torch.uint8).long()
    return q - zero_point, x_scale, q, None


def _int8_case(m, n, k, x_scale, zero_point, *, bias=True, batch=None, dtype="float32", seed=0, unit=False,
               rows=None):
    import torch
    from edgepasses.kernels import triton_ops
    g = torch.Generator().manual_seed(seed)
    shape = (*batch, k) if batch else (m, k)
    x = rows if rows is not None else torch.randn(shape, generator=g) * 3
    if x_scale is not None and rows is None:
        x[..., :4] = torch.tensor([0.5, 1.5, -2.5, 1e4])[: min(4, k)] * x_scale  # ties and clamping
    x = x.to(getattr(torch, dtype))
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale = torch.ones(n) if unit else torch.rand(n, generator=g) * 0.02 + 1e-3
    w_sum = w.sum(1, dtype=torch.int32)
    b = torch.randn(n, generator=g) if bias else None

    out = triton_ops.int8_linear(x, w, w_scale, w_sum, b, x_scale, zero_point)
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], n), out.shape

    rows2d = x.reshape(-1, k)
    shifted, s, q_u8, s_row = _reference_codes(rows2d, x_scale, zero_point)
    codes, scales = triton_ops.quantize_activations(rows2d.float(), x_scale, zero_point)
    assert torch.equal(codes.long() + 128, q_u8), "activation codes differ from torch's quantization"
    if x_scale is None:
        assert torch.equal(scales, s_row), "per-token scales differ"
    acc = shifted.double() @ w.double().T  # exact: |acc| << 2**53
    ref = acc * s * w_scale.double()
    if b is not None:
        ref = ref + b.double()
    ref = ref.reshape(out.shape)
    if unit:
        assert torch.equal(out, ref.float()), "int32 accumulation is not exact"
    else:
        torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


def _dynamic_ties_case():
    import torch
    k = 36
    x = (torch.arange(k, dtype=torch.float32) - 17.5) * 0.125  # ties at scale 1/8 ...
    x[0] = -127 * 0.125  # ... once the row max makes s = 15.875 / 127 = 0.125 exactly
    rows = torch.stack([x, torch.zeros(k), -x * 3])  # plus a zero row (scale 1)
    _int8_case(3, 7, k, None, 128, rows=rows)


INT8_CASES = {
    "static_m1_odd_n": lambda: _int8_case(1, 5, 12, 0.05, 37),
    "static_tails": lambda: _int8_case(17, 33, 40, 0.02, 0, seed=1),
    "static_zp128_no_bias_batched": lambda: _int8_case(0, 16, 64, 0.03, 128, bias=False, batch=(2, 3), seed=2),
    "static_zp255_exact_ties": lambda: _int8_case(5, 9, 36, 0.0625, 255, seed=3),
    "static_exact_int32": lambda: _int8_case(9, 19, 44, 1.0, 77, bias=False, unit=True, seed=4,
                                             rows=torch_randn_scaled(9, 44, 150.0, 4)),
    "dynamic_m1": lambda: _int8_case(1, 5, 12, None, 128),
    "dynamic_tails": lambda: _int8_case(17, 33, 40, None, 128, seed=5),
    "dynamic_batched_fp16": lambda: _int8_case(0, 16, 64, None, 128, batch=(2, 3), dtype="float16", seed=6),
    "dynamic_ties_zero_row": _dynamic_ties_case,
    "wrong_k_raises": lambda: _raises_value_error(lambda: _int8_case(2, 4, 8, 0.1, 0, rows=torch_randn_scaled(2, 12))),
}


def torch_randn_scaled(m, k, scale=1.0, seed=0):
    import torch
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale


def _raises_value_error(fn):
    try:
        fn()
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


def _sparse_weight(n, k, g, dtype):
    import torch
    dense = torch.randn(n, k, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]  # two random positions per group
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    dense = dense * mask
    dense[0, :4] = 0  # an empty group
    if n > 1:
        dense[1, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with one non-zero
    return dense.to(getattr(torch, dtype))


def _sparse_case(m, n, k, *, bias=True, batch=None, dtype="float32", seed=0, precision=None):
    import torch
    from edgepasses.kernels import triton_ops
    from edgepasses.kernels.ops import pack_sparse24
    g = torch.Generator().manual_seed(seed)
    dense = _sparse_weight(n, k, g, dtype)
    values, indices = pack_sparse24(dense)
    x = torch.randn(*(batch or (m,)), k, generator=g).to(getattr(torch, dtype))
    b = torch.randn(n, generator=g) if bias else None
    out = triton_ops.sparse24_linear(x, values, indices, b, precision=precision)
    assert out.dtype == torch.float32 and out.shape == (*x.shape[:-1], n), out.shape
    ref = x.double() @ dense.double().T
    if b is not None:
        ref = ref + b.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(ref.abs().max().item(), 1.0))


def _sparse_int8_case():
    import torch
    from edgepasses.kernels import triton_ops
    from edgepasses.kernels.ops import pack_sparse24
    g = torch.Generator().manual_seed(7)
    n, k = 11, 20
    codes = (_sparse_weight(n, k, g, "float32") * 40).round().clamp(-127, 127).to(torch.int8)
    values, indices = pack_sparse24(codes)
    w_scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    b = torch.randn(n, generator=g)
    x = torch.randn(3, k, generator=g)
    for x_scale, zp in [(0.03, 50), (None, 128)]:
        out = triton_ops.sparse24_linear(x, values, indices, b, w_scale, x_scale, zp)
        shifted, s, _, _ = _reference_codes(x, x_scale, zp)
        ref = (shifted.double() @ codes.double().T) * s * w_scale.double() + b.double()
        torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


SPARSE_CASES = {
    "m1_odd_n_odd_groups": lambda: _sparse_case(1, 5, 12),  # K/4 = 3 groups: a padded index nibble
    "tails": lambda: _sparse_case(17, 33, 40, seed=1),  # K = 40 is not a multiple of BLOCK_K = 32
    "no_bias_batched": lambda: _sparse_case(0, 16, 64, bias=False, batch=(2, 3), seed=2),
    "k4_ieee": lambda: _sparse_case(3, 7, 4, seed=3, precision="ieee"),
    "float16": lambda: _sparse_case(5, 9, 36, dtype="float16", seed=4),
    "int8_values": _sparse_int8_case,
    "bad_indices_raise": lambda: _raises_value_error(_sparse_bad_indices),
}


def _sparse_bad_indices():
    import torch
    from edgepasses.kernels import triton_ops
    # values [2, 4] mean K = 8, which has one index byte per row, not 3
    triton_ops.sparse24_linear(torch.zeros(2, 8), torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.uint8), None)


def _bench_checks_case():
    """The GPU bench's correctness checks, on small shapes in the interpreter (they must pass)."""
    from edgepasses.bench import gpu_kernels
    records = gpu_kernels.check_correctness("cpu", shapes=[(1, 5, 12), (17, 33, 40)])
    assert len(records) == 2 * (3 + 2) and all(r["ok"] for r in records), records


def _bench_candidates_case():
    """Every candidate the GPU bench times runs (or says why not) at a small shape."""
    from edgepasses.bench import gpu_kernels
    cands = gpu_kernels._candidates(24, 16, 32, device="cpu")
    assert set(cands) == set(gpu_kernels.INT8_COLUMNS) | set(gpu_kernels.SPARSE_COLUMNS), set(cands)
    for name, call in cands.items():
        if not isinstance(call, str):
            out = call()
            assert out.shape == (24, 16), (name, out.shape)
    assert isinstance(gpu_kernels._candidates(1, 16, 32, device="cpu")["torch._int_mm"], str)


GROUPS = {"int8": INT8_CASES, "sparse24": SPARSE_CASES,
          "bench": {"correctness_checks": _bench_checks_case, "candidates": _bench_candidates_case}}


def _run_cases(groups: list[str]) -> dict[str, str]:
    from edgepasses.kernels import triton_ops
    if not triton_ops.INTERPRETED:
        return {"setup": "TRITON_INTERPRET=1 was not in effect when triton_ops was imported"}
    results = {}
    for name, case in ((f"{g}/{name}", case) for g in groups for name, case in GROUPS[g].items()):
        start = time.perf_counter()
        try:
            case()
            results[name] = f"ok {time.perf_counter() - start:.2f}s"
        except Exception:  # noqa: BLE001 -- reported to the parent test
            results[name] = traceback.format_exc()
    return results


# ---- tests (pytest process) -------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'edgepasses[triton]')")


@needs_triton
def test_triton_kernels_in_interpreter():
    """All cases in one subprocess: importing edgepasses and triton there takes longer than the cases."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__, *GROUPS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and lines, f"the interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(lines[-1][len(MARK):])
    assert set(results) == {f"{g}/{name}" for g, cases in GROUPS.items() for name in cases}, results
    failed = {name: r for name, r in results.items() if not r.startswith("ok")}
    assert not failed, "\n\n".join(f"{name}:\n{r}" for name, r in failed.items())


def test_gpu_bench_exits_clearly_without_a_gpu(monkeypatch, tmp_path, capsys):
    import torch
    from edgepasses.bench import gpu_kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_kernels.main(["--out", str(out)])
    assert exit_info.value.code not in (0, None)
    assert "no CUDA GPU" in str(exit_info.value.code) + capsys.readouterr().err
    assert not out.exists()


def test_gpu_bench_markdown():
    from edgepasses.bench import gpu_kernels
    timings = {1: {"a": dict(median_ms=0.01234, min_ms=0.012, max_ms=0.02, n=9), "b": {"skipped": "needs M > 16"}}}
    table = gpu_kernels.markdown(timings, ["a", "b", "c"], "t").splitlines()
    assert table[2] == "| M | a | b | c |" and table[3] == "|---:|---:|---:|---:|"
    assert table[4] == "| 1 | 0.0123 (0.0120–0.0200) | n/a: needs M > 16 | n/a: not run |"


def test_gpu_bench_arguments():
    from edgepasses.bench import gpu_kernels
    args = gpu_kernels.parse_args([])
    assert args.m == [1, 16, 128, 1024, 4096] and args.k == args.n == 4096
    assert args.out == gpu_kernels.DEFAULT_OUT and args.out.name == "gpu_kernels.json"
    args = gpu_kernels.parse_args(["--m", "1", "32", "--k", "256", "--n", "512", "--out", "x.json", "--quick"])
    assert args.m == [1, 32] and (args.k, args.n) == (256, 512) and str(args.out) == "x.json" and args.quick


if __name__ == "__main__":
    print(MARK + json.dumps(_run_cases(sys.argv[1:] or list(GROUPS))), flush=True)
