"""Fuzzing the `edge::` ops' arguments (kernels/checks.py): random valid arguments give what a float
reference gives, and random invalid ones (wrong dtype, rank, shape, short indices, bias length, zero
point, 7-bit promise, row sums) are refused with one clear line naming the op and the argument,
never a crash, a raw IndexError or a wrong result.

Invalid cases are a valid call with one argument broken ("mutations"), so each refusal is known
to come from that argument. The references compute in float64 from the values the kernels see
(x quantized as the op quantizes it, for the int8 ops), within a float32 tolerance relative to
Σ|x||w|."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.ao.quantization.fx._decomposed
import torch.nn.functional as F
from edgepasses.kernels import ops
from edgepasses.kernels.ops import KernelError
from hypothesis import given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=60, deadline=None, derandomize=True)
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_refused(call: Callable[[], object], op: str, *mentions: str) -> KernelError:
    """`call` raises a one-line KernelError naming `op` and each of `mentions`."""
    with pytest.raises(KernelError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"edge::{op}: ") and "\n" not in message, message
    for word in mentions:
        assert word in message, f"{word!r} not in {message!r}"
    return info.value


def assert_close_to(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """y (float32) within 1e-5 of ref (float64) relative to the sum of magnitudes `scale`."""
    assert y.dtype == torch.float32 and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    err = (y.double() - ref).abs()
    bad = err > 1e-5 * scale + 1e-6
    assert not bad.any(), f"max error {err.max().item():.3g} at {bad.nonzero()[0].tolist()}"


def fake_quant(x: torch.Tensor, x_scale: float | None, zp: int) -> torch.Tensor:
    """x as the int8 ops see it after quantizing (float64): static u8 or dynamic per-token (rows)."""
    x = x.float()
    if x_scale is None:
        s = x.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(x / s), -127, 127).double() * s.double()
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, x_scale, zp, 0, 255, torch.uint8)
    return (q.double() - zp) * torch.tensor(x_scale, dtype=torch.float32).double()


def codes(shape, bits: int, gen: torch.Generator) -> torch.Tensor:
    low, high = (-64, 64) if bits == 7 else (-128, 127)
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=gen)


# ---- valid arguments: the float reference ------------------------------------------------------

@dataclasses.dataclass
class LinearArgs:
    x: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_sum: torch.Tensor
    bias: torch.Tensor | None
    x_scale: float | None
    x_zero_point: int
    weight_bits: int

    def call(self):
        return ops.int8_linear(*dataclasses.astuple(self))

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        xq = fake_quant(self.x.reshape(-1, self.weight.shape[1]), self.x_scale, self.x_zero_point)
        w = self.weight.double() * self.weight_scale.double()[:, None]
        ref, scale = xq @ w.T, xq.abs() @ w.abs().T
        if self.bias is not None:
            ref, scale = ref + self.bias.double(), scale + self.bias.double().abs()
        shape = (*self.x.shape[:-1], self.weight.shape[0])
        return ref.reshape(shape), scale.reshape(shape)


@st.composite
def linear_args(draw) -> LinearArgs:
    batch = draw(st.lists(st.integers(0, 5), min_size=1, max_size=2))
    k, n, bits = draw(st.integers(1, 80)), draw(st.integers(1, 40)), draw(st.sampled_from([7, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    dtype = draw(st.sampled_from(X_DTYPES))
    weight = codes((n, k), bits, gen)
    static = draw(st.booleans())
    return LinearArgs(
        x=(torch.randn(*batch, k, generator=gen) * 3).to(dtype),
        weight=weight,
        weight_scale=torch.rand(n, generator=gen) * 0.02 + 1e-3,
        weight_sum=ops.int8_weight_sum(weight),
        bias=torch.randn(n, generator=gen) if draw(st.booleans()) else None,
        x_scale=draw(st.sampled_from([0.02, 0.05, 0.3])) if static else None,
        x_zero_point=draw(st.integers(0, 255)),
        weight_bits=bits,
    )


@FUZZ
@given(args=linear_args())
def test_int8_linear_matches_the_float_reference(args):
    assert_close_to(args.call(), *args.reference())


@dataclasses.dataclass
class ConvArgs:
    x: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_sum: torch.Tensor
    bias: torch.Tensor | None
    stride: list
    padding: list
    dilation: list
    groups: int
    x_scale: float
    x_zero_point: int
    weight_bits: int

    def call(self):
        return ops.int8_conv2d(*dataclasses.astuple(self))

    def call_into(self):
        """Through the Python entry point, which takes what the op's schema would refuse first."""
        return ops.int8_conv2d_into(torch.empty(0), *dataclasses.astuple(self))

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        xq = fake_quant(self.x, self.x_scale, self.x_zero_point)  # padding reads as the zero point: 0
        w = self.weight.permute(0, 3, 1, 2).double() * self.weight_scale.double()[:, None, None, None]  # unpacked
        conv = lambda a, b: F.conv2d(a, b, None, self.stride, self.padding, self.dilation, self.groups)
        ref, scale = conv(xq, w), conv(xq.abs(), w.abs())
        if self.bias is not None:
            ref, scale = ref + self.bias.double()[:, None, None], scale + self.bias.double().abs()[:, None, None]
        return ref, scale


@st.composite
def conv_args(draw) -> ConvArgs:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, og = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    # input at least as large as the dilated kernel, so the output is never empty
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    bits = draw(st.sampled_from([7, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    weight = ops.pack_int8_conv2d_weight(codes((og * groups, cg, kh, kw), bits, gen))
    return ConvArgs(
        x=(torch.randn(draw(st.integers(0, 2)), cg * groups, h, w, generator=gen) * 3).to(draw(st.sampled_from(X_DTYPES))),
        weight=weight,
        weight_scale=torch.rand(og * groups, generator=gen) * 0.02 + 1e-3,
        weight_sum=ops.int8_weight_sum(weight),
        bias=torch.randn(og * groups, generator=gen) if draw(st.booleans()) else None,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        x_scale=draw(st.sampled_from([0.02, 0.05, 0.3])),
        x_zero_point=draw(st.integers(0, 255)),
        weight_bits=bits,
    )


@FUZZ
@given(args=conv_args())
def test_int8_conv2d_matches_the_float_reference(args):
    assert_close_to(args.call(), *args.reference())


def random_24(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] with two random kept positions per group of 4 (some of them zero)."""
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return torch.randn(n, k, generator=gen) * mask * (torch.rand(n, k, generator=gen) > 0.1)


@dataclasses.dataclass
class SparseArgs:
    x: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    bias: torch.Tensor | None
    weight_scale: torch.Tensor | None
    x_scale: float | None
    x_zero_point: int
    dense: torch.Tensor  # the weight values/indices compress (float64, dequantized for int8)

    def call(self):
        return ops.sparse24_linear(self.x, self.values, self.indices, self.bias, self.weight_scale, self.x_scale,
                                   self.x_zero_point)

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.x.reshape(-1, self.dense.shape[1])
        xr = rows.float().double() if self.weight_scale is None else fake_quant(rows, self.x_scale, self.x_zero_point)
        ref, scale = xr @ self.dense.T, xr.abs() @ self.dense.abs().T
        if self.bias is not None:
            ref, scale = ref + self.bias.double(), scale + self.bias.double().abs()
        shape = (*self.x.shape[:-1], self.dense.shape[0])
        return ref.reshape(shape), scale.reshape(shape)


@st.composite
def sparse_args(draw) -> SparseArgs:
    batch = draw(st.lists(st.integers(0, 36), min_size=1, max_size=2))  # M >= 3: the weight-stationary kernel
    k, n = 4 * draw(st.integers(1, 24)), draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(*batch, k, generator=gen) * 3).to(draw(st.sampled_from(X_DTYPES)))
    bias = torch.randn(n, generator=gen) if draw(st.booleans()) else None
    dense = random_24(n, k, gen)
    if draw(st.booleans()):  # float values
        values, indices = ops.pack_sparse24(dense)
        return SparseArgs(x, values, indices, bias, None, None, 0, dense.double())
    weight = (dense * 40).round().clamp(-127, 127).to(torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    values, indices = ops.pack_sparse24(weight)
    x_scale = draw(st.sampled_from([None, 0.05]))
    return SparseArgs(x, values, indices, bias, scale, x_scale, draw(st.integers(0, 255)),
                      weight.double() * scale.double()[:, None])


@FUZZ
@given(args=sparse_args())
def test_sparse24_linear_matches_the_float_reference(args):
    assert_close_to(args.call(), *args.reference())


# ---- invalid arguments: one argument broken, a clear refusal -----------------------------------

def replace(args, **changes):
    return dataclasses.replace(args, **changes)


def flip_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[-1] += 1
    return t


def wide_codes(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w.view(-1)[0] = 100
    return w


# (name, mutation of valid args, words the refusal must mention)
LINEAR_MUTATIONS = [
    ("x int", lambda a: replace(a, x=a.x.to(torch.int32)), ["x", "floating"]),
    ("x bool", lambda a: replace(a, x=a.x > 0), ["x", "floating"]),
    ("x 0-dim", lambda a: replace(a, x=torch.tensor(1.0)), ["x", "at least 1"]),
    ("x last dim", lambda a: replace(a, x=torch.randn(2, a.weight.shape[1] + 1)), ["x's last dim"]),
    ("weight float", lambda a: replace(a, weight=a.weight.float()), ["weight", "torch.int8"]),
    ("weight uint8", lambda a: replace(a, weight=a.weight.to(torch.uint8)), ["weight", "torch.int8"]),
    ("weight 1-D", lambda a: replace(a, weight=a.weight[0]), ["weight", "2-D"]),
    ("weight 3-D", lambda a: replace(a, weight=a.weight[None]), ["weight", "2-D"]),
    ("weight_scale long", lambda a: replace(a, weight_scale=torch.ones(a.weight.shape[0] + 1)), ["weight_scale"]),
    ("weight_scale 2-D", lambda a: replace(a, weight_scale=a.weight_scale[:, None]), ["weight_scale"]),
    ("weight_scale int", lambda a: replace(a, weight_scale=a.weight_sum), ["weight_scale", "floating"]),
    ("weight_sum int64", lambda a: replace(a, weight_sum=a.weight_sum.long()), ["weight_sum", "torch.int32"]),
    ("weight_sum short", lambda a: replace(a, weight_sum=a.weight_sum[:-1]), ["weight_sum", "shape"]),
    ("weight_sum wrong", lambda a: replace(a, weight_sum=flip_sum(a.weight_sum)), ["weight_sum", "row sums"]),
    ("bias long", lambda a: replace(a, bias=torch.ones(a.weight.shape[0] + 1)), ["bias", "shape"]),
    ("bias short", lambda a: replace(a, bias=torch.ones(max(a.weight.shape[0] - 1, 0) or 2)), ["bias", "shape"]),
    ("bias int", lambda a: replace(a, bias=a.weight_sum), ["bias", "floating"]),
    ("x_scale nan", lambda a: replace(a, x_scale=float("nan")), ["x_scale", "finite"]),
    ("x_scale inf", lambda a: replace(a, x_scale=float("inf")), ["x_scale", "finite"]),
    ("x_scale 0", lambda a: replace(a, x_scale=0.0), ["x_scale", "> 0"]),
    ("x_scale negative", lambda a: replace(a, x_scale=-0.1), ["x_scale", "> 0"]),
    ("zero point -1", lambda a: replace(a, x_zero_point=-1), ["x_zero_point", "[0, 255]"]),
    ("zero point 256", lambda a: replace(a, x_zero_point=256), ["x_zero_point", "[0, 255]"]),
    ("bits 6", lambda a: replace(a, weight_bits=6), ["weight_bits"]),
    ("bits 9", lambda a: replace(a, weight_bits=9), ["weight_bits"]),
    ("7-bit promise broken", lambda a: replace(a, weight=(w := wide_codes(a.weight)), weight_sum=ops.int8_weight_sum(w),
                                               weight_bits=7), ["weight_bits=7", "[-64, 64]", "got codes in"]),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(args=linear_args(), mutation=st.sampled_from(LINEAR_MUTATIONS))
def test_int8_linear_refuses_each_broken_argument(args, mutation):
    _, mutate, mentions = mutation
    assert_refused(mutate(args).call, "int8_linear", *mentions)


@pytest.mark.parametrize("mutation", LINEAR_MUTATIONS, ids=[m[0] for m in LINEAR_MUTATIONS])
def test_int8_linear_refuses_every_mutation(mutation):
    """Each mutation at least once, whatever hypothesis drew above."""
    args = LinearArgs(torch.randn(3, 8), codes((4, 8), 8, torch.Generator().manual_seed(0)), torch.ones(4),
                      torch.zeros(4, dtype=torch.int32), torch.ones(4), 0.1, 3, 8)
    args.weight_sum = ops.int8_weight_sum(args.weight)
    assert_refused(mutation[1](args).call, "int8_linear", *mutation[2])


# (name, mutation, words the refusal must mention[, "schema": the op's schema refuses the type first])
CONV_MUTATIONS = [
    ("x 3-D", lambda a: replace(a, x=a.x.flatten(0, 1)), ["x", "4-D"]),
    ("x int", lambda a: replace(a, x=a.x.to(torch.int64)), ["x", "floating"]),
    ("weight 3-D", lambda a: replace(a, weight=a.weight[0]), ["weight", "4-D"]),
    ("weight float", lambda a: replace(a, weight=a.weight.float()), ["weight", "torch.int8"]),
    ("stride 1 value", lambda a: replace(a, stride=[1]), ["stride", "2 ints"]),
    ("stride 0", lambda a: replace(a, stride=[0, 1]), ["stride", ">= 1"]),
    ("padding negative", lambda a: replace(a, padding=[0, -1]), ["padding", ">= 0"]),
    ("dilation 0", lambda a: replace(a, dilation=[1, 0]), ["dilation", ">= 1"]),
    ("groups 0", lambda a: replace(a, groups=0), ["groups", ">= 1"]),
    ("groups do not fit", lambda a: replace(a, groups=a.groups + 1), ["groups", "do not fit"]),
    ("kernel larger than input", lambda a: replace(a, x=a.x[..., :1, :1], padding=[0, 0],
                                                   weight=(w := torch.ones(a.weight.shape[0], 2, 2, a.weight.shape[3],
                                                                           dtype=torch.int8)),
                                                   weight_sum=ops.int8_weight_sum(w)), ["kernel", "does not fit"]),
    # The op's schema types x_scale as float: the dispatcher refuses None itself (a RuntimeError
    # naming the argument); the *_into entry point, which has no schema, refuses it here.
    ("x_scale None", lambda a: replace(a, x_scale=None), ["x_scale", "required"], "schema"),
    ("zero point 300", lambda a: replace(a, x_zero_point=300), ["x_zero_point"]),
    ("bits 4", lambda a: replace(a, weight_bits=4), ["weight_bits"]),
    ("weight_scale short", lambda a: replace(a, weight_scale=a.weight_scale[1:]), ["weight_scale"]),
    ("bias long", lambda a: replace(a, bias=torch.ones(a.weight.shape[0] + 2)), ["bias"]),
    ("weight_sum wrong", lambda a: replace(a, weight_sum=flip_sum(a.weight_sum)), ["weight_sum", "row sums"]),
    ("7-bit promise broken", lambda a: replace(a, weight=(w := wide_codes(a.weight)), weight_sum=ops.int8_weight_sum(w),
                                               weight_bits=7), ["weight_bits=7"]),
]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(args=conv_args(), mutation=st.sampled_from(CONV_MUTATIONS))
def test_int8_conv2d_refuses_each_broken_argument(args, mutation):
    assert_conv_refused(args, mutation)


def assert_conv_refused(args: ConvArgs, mutation) -> None:
    broken, mentions = mutation[1](args), mutation[2]
    if mutation[3:] == ("schema",):
        with pytest.raises(RuntimeError, match="Expected a value of type 'float' for argument 'x_scale'"):
            broken.call()
        assert_refused(broken.call_into, "int8_conv2d", *mentions)
    else:
        assert_refused(broken.call, "int8_conv2d", *mentions)


@pytest.mark.parametrize("mutation", CONV_MUTATIONS, ids=[m[0] for m in CONV_MUTATIONS])
def test_int8_conv2d_refuses_every_mutation(mutation):
    w = ops.pack_int8_conv2d_weight(codes((4, 2, 3, 3), 8, torch.Generator().manual_seed(0)))
    args = ConvArgs(torch.randn(1, 4, 5, 5), w, torch.ones(4), ops.int8_weight_sum(w), torch.ones(4), [1, 1], [1, 1],
                    [1, 1], 2, 0.1, 3, 8)
    assert_conv_refused(args, mutation)


def short_indices(a):
    return replace(a, indices=a.indices[:, :-1])


def unordered_indices(a):
    indices = a.indices.clone()
    indices[-1, 0] = (indices[-1, 0] & 0xF0) | 0b0001  # i0 = 1, i1 = 0
    return replace(a, indices=indices)


SPARSE_MUTATIONS = [
    ("short indices", short_indices, ["indices", "shape"]),
    ("indices int64", lambda a: replace(a, indices=a.indices.long()), ["indices", "torch.uint8"]),
    ("indices int8", lambda a: replace(a, indices=a.indices.to(torch.int8)), ["indices", "torch.uint8"]),
    ("indices 1-D", lambda a: replace(a, indices=a.indices.reshape(-1)), ["indices", "2-D"]),
    ("indices i0 >= i1", unordered_indices, ["indices", "i0 < i1"]),
    ("values 1-D", lambda a: replace(a, values=a.values.reshape(-1)), ["values", "2-D"]),
    ("values int32", lambda a: replace(a, values=a.values.to(torch.int32)), ["values"]),
    ("values K not a multiple of 4", lambda a: replace(a, values=torch.cat([a.values, a.values[:, :1]], 1)),
     ["values", "multiple of 4"]),
    ("bias long", lambda a: replace(a, bias=torch.ones(a.values.shape[0] + 1)), ["bias", "shape"]),
    ("bias 2-D", lambda a: replace(a, bias=torch.ones(1, a.values.shape[0])), ["bias", "shape"]),
    ("x last dim", lambda a: replace(a, x=torch.randn(2, a.dense.shape[1] + 4)), ["x's last dim"]),
    ("x 0-dim", lambda a: replace(a, x=torch.tensor(2.0)), ["x"]),
    ("x int", lambda a: replace(a, x=a.x.to(torch.int16)), ["x", "floating"]),
    ("int8 without weight_scale", lambda a: replace(a, values=a.values.to(torch.int8), weight_scale=None),
     ["weight_scale", "required"]),
    ("float with weight_scale", lambda a: replace(a, values=a.values.float(), weight_scale=torch.ones(a.values.shape[0])),
     ["weight_scale", "int8 values"]),
    ("zero point 256", lambda a: replace(a, x_zero_point=256), ["x_zero_point"]),
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(args=sparse_args(), mutation=st.sampled_from(SPARSE_MUTATIONS))
def test_sparse24_linear_refuses_each_broken_argument(args, mutation):
    _, mutate, mentions = mutation
    assert_refused(mutate(args).call, "sparse24_linear", *mentions)


@pytest.mark.parametrize("mutation", SPARSE_MUTATIONS, ids=[m[0] for m in SPARSE_MUTATIONS])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_sparse24_linear_refuses_every_mutation(mutation, int8):
    dense = random_24(8, 40, torch.Generator().manual_seed(0))
    weight = (dense * 40).round().to(torch.int8) if int8 else dense
    values, indices = ops.pack_sparse24(weight)
    args = SparseArgs(torch.randn(5, 40), values, indices, torch.ones(8), torch.ones(8) if int8 else None,
                      0.1 if int8 else None, 3, dense.double())
    assert_refused(mutation[1](args).call, "sparse24_linear", *mutation[2])


def test_sparse24_short_indices_are_refused_with_expected_and_given_shapes():
    x, w = torch.randn(3, 32), random_24(8, 32, torch.Generator().manual_seed(0))
    values, indices = ops.pack_sparse24(w)
    assert_refused(lambda: ops.sparse24_linear(x, values, indices[:, :3], None, None, None, 0), "sparse24_linear",
                   "indices must have shape (8, 4)", "got (8, 3)")
    assert_refused(lambda: ops.sparse24_linear(x, values, indices, torch.ones(7), None, None, 0), "sparse24_linear",
                   "bias must have shape (8,)", "got (7,)")


# ---- lowrank_linear ----------------------------------------------------------------------------

def lowrank(x=None, first=None, second=None, bias=None):
    x = torch.randn(2, 3, 8) if x is None else x
    first = torch.randn(4, 8) if first is None else first
    second = torch.randn(6, 4) if second is None else second
    return lambda: ops.lowrank_linear(x, first, second, bias)


@pytest.mark.parametrize("call,mentions", [
    (lowrank(first=torch.randn(4, 9)), ["first", "(r, 8)"]),
    (lowrank(second=torch.randn(6, 5)), ["second", "(N, 4)"]),
    (lowrank(second=torch.randn(6, 4, 1)), ["second", "2-D"]),
    (lowrank(bias=torch.ones(5)), ["bias", "(6,)"]),
    (lowrank(first=torch.randn(4, 8).double()), ["first", "torch.float32"]),
    (lowrank(x=torch.tensor(1.0)), ["x", "at least 1"]),
    (lowrank(x=torch.ones(2, 8, dtype=torch.int64)), ["x", "floating"]),
], ids=["first K", "second rank", "second 3-D", "bias", "dtype", "x 0-dim", "x int"])
def test_lowrank_linear_refuses_broken_arguments(call, mentions):
    assert_refused(call, "lowrank_linear", *mentions)


def test_lowrank_linear_matches_the_float_reference():
    x, first, second, bias = torch.randn(2, 3, 8), torch.randn(4, 8), torch.randn(6, 4), torch.randn(6)
    torch.testing.assert_close(ops.lowrank_linear(x, first, second, bias), x @ first.T @ second.T + bias)


# ---- where the checks run: fake mode, *_into, weights that change ------------------------------

def test_structure_is_checked_at_trace_time():
    """The fake implementations check too, so torch.export / torch.compile refuse a bad call
    before anything runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    values, indices = ops.pack_sparse24(random_24(8, 32, torch.Generator().manual_seed(0)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert_refused(lambda: ops.sparse24_linear(torch.randn(3, 32), values, indices[:, :3], None, None, None, 0),
                       "sparse24_linear", "indices")
        w = torch.zeros(4, 8, dtype=torch.int8)
        assert_refused(lambda: ops.int8_linear(torch.randn(3, 8), w, torch.ones(5), torch.zeros(4, dtype=torch.int32),
                                               None, 0.1, 0, 8), "int8_linear", "weight_scale")


def test_into_entry_points_check_their_output_buffer():
    w = torch.ones(4, 8, dtype=torch.int8)
    args = (torch.randn(3, 8), w, torch.ones(4), ops.int8_weight_sum(w), None, 0.1, 0, 8)
    for out, mention in [(torch.empty(3, 5), "shape (3, 4)"), (torch.empty(3, 4, dtype=torch.float64), "float32"),
                         (torch.empty(4, 3).T, "non-contiguous")]:
        assert_refused(lambda out=out: ops.int8_linear_into(out, *args), "int8_linear", "out", mention)
    assert_refused(lambda: ops.int8_linear_into(torch.empty(3, 4), torch.randn(3, 8), w, torch.ones(3),
                                                ops.int8_weight_sum(w), None, 0.1, 0, 8), "int8_linear", "weight_scale")
    out = torch.empty(3, 4)
    ops.int8_linear_into(out, *args)
    torch.testing.assert_close(out, ops.int8_linear(*args))


def test_a_weight_changed_in_place_is_checked_again():
    """Value checks run once per weight tensor, and again after an in-place change (version counter)."""
    w = torch.full((4, 8), 60, dtype=torch.int8)
    sums = ops.int8_weight_sum(w)
    x = torch.randn(2, 8)
    ops.int8_linear(x, w, torch.ones(4), sums, None, 0.1, 0, 7)
    w[0, 0] = 100
    sums.copy_(ops.int8_weight_sum(w))
    assert_refused(lambda: ops.int8_linear(x, w, torch.ones(4), sums, None, 0.1, 0, 7), "int8_linear", "[-64, 64]")
    ops.int8_linear(x, w, torch.ones(4), sums, None, 0.1, 0, 8)  # 8-bit takes any code
    sums[1] += 1
    assert_refused(lambda: ops.int8_linear(x, w, torch.ones(4), sums, None, 0.1, 0, 8), "int8_linear", "row sums")


def test_inference_tensors_are_checked():
    with torch.inference_mode():
        w = torch.full((4, 8), 100, dtype=torch.int8)
        args = (torch.randn(2, 8), w, torch.ones(4), ops.int8_weight_sum(w), None, 0.1, 0)
        assert_refused(lambda: ops.int8_linear(*args, 7), "int8_linear", "weight_bits=7")
        assert ops.int8_linear(*args, 8).shape == (2, 4)
