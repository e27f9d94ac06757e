"""Kernels: every argument mutation of tests/kernels/test_kernel_args.py (imported, not copied) on the
edge:: ops, each a clear KernelError naming the op and the argument before any C++ runs; a few more on
lowrank_linear and the *_into output buffers; and valid calls, which must match the float reference."""
from __future__ import annotations

import re

import torch

from hostile_common import kernel_args

from edgepasses.bench.hostile import Case, clear_error, correct


def _refusal(op: str, mentions) -> str:
    """A regex: the message starts with `edge::op: ` and mentions each word."""
    return rf"(?s)^edge::{op}: " + "".join(f"(?=.*{re.escape(m)})" for m in mentions)


def _linear_base():
    ka = kernel_args()
    w = ka.codes((4, 8), 8, torch.Generator().manual_seed(0))
    return ka.LinearArgs(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), w, torch.ones(4),
                         ka.ops.int8_weight_sum(w), torch.ones(4), 0.1, 3, 8)


def _conv_base():
    ka = kernel_args()
    w = ka.ops.pack_int8_conv2d_weight(ka.codes((4, 2, 3, 3), 8, torch.Generator().manual_seed(0)))
    return ka.ConvArgs(torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(1)), w, torch.ones(4),
                       ka.ops.int8_weight_sum(w), torch.ones(4), [1, 1], [1, 1], [1, 1], 2, 0.1, 3, 8)


def _sparse_base(int8: bool):
    ka = kernel_args()
    dense = ka.random_24(8, 40, torch.Generator().manual_seed(0))
    weight = (dense * 40).round().to(torch.int8) if int8 else dense
    values, indices = ka.ops.pack_sparse24(weight)
    return ka.SparseArgs(torch.randn(5, 40, generator=torch.Generator().manual_seed(1)), values, indices,
                         torch.ones(8), torch.ones(8) if int8 else None, 0.1 if int8 else None, 3, dense.double())


def _valid_sparse_int8():
    """int8 2:4 values that really fit int8, dequantized for the reference (as the fuzz strategy builds them)."""
    ka = kernel_args()
    gen = torch.Generator().manual_seed(0)
    dense = ka.random_24(8, 40, gen)
    weight = (dense * 40).round().clamp(-127, 127).to(torch.int8)
    scale = torch.rand(8, generator=gen) * 0.02 + 1e-3
    values, indices = ka.ops.pack_sparse24(weight)
    return ka.SparseArgs(torch.randn(5, 40, generator=gen), values, indices, torch.ones(8), scale, 0.05, 3,
                         weight.double() * scale.double()[:, None])


def _mutated(base, mutate, into: bool = False):
    def run():
        broken = mutate(base())
        return broken.call_into() if into else broken.call()
    return run


def _matches_reference(base):
    def run():
        args = base()
        return args.call(), args

    def check(result):
        got, args = result
        kernel_args().assert_close_to(got, *args.reference())
    return run, check


def _lowrank(**broken):
    ka = kernel_args()
    gen = torch.Generator().manual_seed(2)
    parts = {"x": torch.randn(2, 3, 8, generator=gen), "first": torch.randn(4, 8, generator=gen),
             "second": torch.randn(6, 4, generator=gen), "bias": None}
    parts.update(broken)
    return ka.lowrank(**parts)


def _bmm(**broken):
    from edgepasses.kernels import ops

    gen = torch.Generator().manual_seed(3)
    parts = {"a": torch.randn(2, 5, 8, generator=gen), "b": torch.randn(2, 8, 6, generator=gen), "a_scale": 0.05,
             "a_zero_point": 128, "b_scale": 0.05, "b_zero_point": 120, "transpose_b": False}
    parts.update(broken)
    return ops.int8_bmm(**parts)


def _bmm_matches_fake_quant():
    """A valid int8_bmm call against the float matmul of the dequantized operands."""
    qd = torch.ops.quantized_decomposed
    a, b = torch.randn(3, 7, 9), torch.randn(3, 5, 9)

    def fake_quant(t, scale, zp):
        return qd.dequantize_per_tensor(qd.quantize_per_tensor(t, scale, zp, 0, 255, torch.uint8), scale, zp, 0, 255,
                                        torch.uint8)

    def run():
        return _bmm(a=a, b=b, transpose_b=True), fake_quant(a, 0.05, 128) @ fake_quant(b, 0.05, 120).transpose(1, 2)

    def check(result):
        got, want = result
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return run, check


def _into(out):
    def run():
        ka = kernel_args()
        w = torch.ones(4, 8, dtype=torch.int8)
        return ka.ops.int8_linear_into(out(), torch.randn(3, 8), w, torch.ones(4), ka.ops.int8_weight_sum(w), None,
                                       0.1, 0, 8)
    return run


def cases() -> list[Case]:
    from edgepasses.kernels.ops import KernelError

    ka = kernel_args()
    cases = []
    for name, mutate, mentions in ka.LINEAR_MUTATIONS:
        cases.append(Case(f"kernel int8_linear: {name}", "kernel", _mutated(_linear_base, mutate),
                          clear_error(KernelError, _refusal("int8_linear", mentions))))
    for name, mutate, mentions, *schema in ka.CONV_MUTATIONS:
        if schema == ["schema"]:  # the op's schema (x_scale: float) refuses None in torch's dispatcher itself;
            # the *_into entry point, which has no schema, is where our check speaks
            cases.append(Case(f"kernel int8_conv2d_into: {name}", "kernel", _mutated(_conv_base, mutate, into=True),
                              clear_error(KernelError, _refusal("int8_conv2d", mentions))))
        else:
            cases.append(Case(f"kernel int8_conv2d: {name}", "kernel", _mutated(_conv_base, mutate),
                              clear_error(KernelError, _refusal("int8_conv2d", mentions))))
    for int8 in (False, True):
        kind = "int8" if int8 else "float"
        base = (lambda i: lambda: _sparse_base(i))(int8)
        for name, mutate, mentions in ka.SPARSE_MUTATIONS:
            cases.append(Case(f"kernel sparse24_linear {kind}: {name}", "kernel", _mutated(base, mutate),
                              clear_error(KernelError, _refusal("sparse24_linear", mentions))))
    for name, broken, mentions in [
        ("first K", {"first": torch.randn(4, 9)}, ["first", "(r, 8)"]),
        ("second rank", {"second": torch.randn(6, 5)}, ["second", "(N, 4)"]),
        ("bias length", {"bias": torch.ones(5)}, ["bias", "(6,)"]),
        ("float64 first", {"first": torch.randn(4, 8).double()}, ["first", "torch.float32"]),
        ("x int", {"x": torch.ones(2, 8, dtype=torch.int64)}, ["x", "floating"]),
    ]:
        cases.append(Case(f"kernel lowrank_linear: {name}", "kernel", (lambda b: lambda: _lowrank(**b)())(broken),
                          clear_error(KernelError, _refusal("lowrank_linear", mentions))))
    for name, broken, mentions in [
        ("b's K", {"b": torch.randn(2, 7, 6)}, ["b", "K=7", "a's K is 8"]),
        ("transposed b's K", {"transpose_b": True}, ["b", "[..., N, K]", "K=6"]),
        ("batch dims", {"b": torch.randn(3, 8, 6)}, ["same batch dims", "(3, 8, 6)"]),
        ("a 1-D", {"a": torch.randn(8)}, ["a", "at least 2 dims"]),
        ("b int", {"b": torch.ones(2, 8, 6, dtype=torch.int64)}, ["b", "floating"]),
        ("a_scale zero", {"a_scale": 0.0}, ["a_scale", "> 0"]),
        ("b_scale inf", {"b_scale": float("inf")}, ["b_scale", "finite"]),
        ("a_zero_point 256", {"a_zero_point": 256}, ["a_zero_point", "[0, 255]"]),
        ("b_zero_point -1", {"b_zero_point": -1}, ["b_zero_point", "[0, 255]"]),
        ("K 0", {"a": torch.randn(2, 5, 0), "b": torch.randn(2, 0, 6)}, ["K must be in [1, 33025]"]),
    ]:
        cases.append(Case(f"kernel int8_bmm: {name}", "kernel", (lambda b: lambda: _bmm(**b))(broken),
                          clear_error(KernelError, _refusal("int8_bmm", mentions))))
    run, check = _bmm_matches_fake_quant()
    cases.append(Case("kernel int8_bmm: a valid call matches the fake-quant matmul", "kernel", run, correct(check)))
    for name, out, mention in [("out of the wrong shape", lambda: torch.empty(3, 5), "shape (3, 4)"),
                               ("out float64", lambda: torch.empty(3, 4, dtype=torch.float64), "float32"),
                               ("out non-contiguous", lambda: torch.empty(4, 3).T, "non-contiguous")]:
        cases.append(Case(f"kernel int8_linear_into: {name}", "kernel", _into(out),
                          clear_error(KernelError, _refusal("int8_linear", ["out", mention]))))
    for name, base in [("int8_linear", _linear_base), ("int8_conv2d", _conv_base),
                       ("sparse24_linear float", lambda: _sparse_base(False)),
                       ("sparse24_linear int8", _valid_sparse_int8)]:
        run, check = _matches_reference(base)
        cases.append(Case(f"kernel {name}: a valid call matches the float reference", "kernel", run, correct(check)))
    return cases
