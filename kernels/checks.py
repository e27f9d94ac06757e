"""Argument checks of the `edge::` ops, in one place.

Every op checks its arguments here before any kernel runs: its CPU and CUDA implementations,
its fake implementation (so a bad call fails at trace time too) and the `*_into` entry points.
Each refusal is one line naming the op, the argument, what was expected and what was given:

    edge::sparse24_linear: indices must have shape (8, 2) (N, ceil(K/8) for K=16), got (8, 1)

Two kinds of checks:
- structure (types, dtypes, ranks, shapes, devices, scalar ranges): O(1), on every call;
- values a weight promises (7-bit codes within [-64, 64], row sums that match the codes, 2:4
  nibbles with i0 < i1): a scan, done once per weight tensor and remembered until the tensor
  changes in place (its version counter), so a compiled graph scans its constants on the first
  call only. Inference tensors have no version counter: for them a scan holds for the tensor's
  lifetime (in-place edits of a weight inside `torch.inference_mode` are not seen).

The C++ checks its buffers' sizes again (csrc/check.h), so even a direct call of the C ABI
cannot read out of bounds; these checks are what gives the clear message.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from edgepasses.errors import EdgeError

from . import abi
from .panels import packed_size, unpack_int8_panels

MAX_INT8_K = 65793        # csrc/int8/int8.h kMaxK: the longest reduction whose int32 sums cannot overflow
MAX_INT8_BMM_K = 33025    # kMaxBmmK: the same for two centered u8 activations (K·255·255 < 2**31)
SEVEN_BIT = (-64, 64)     # weight_bits=7: u8·s8 pairs then sum in int16 exactly (2·255·64 < 2**15)
FLOATING = "floating"


class KernelError(EdgeError, ValueError):
    """An `edge::` op was called with arguments its kernels do not take."""


class KernelTypeError(KernelError, TypeError):
    """An `edge::` op argument of the wrong type or dtype."""


def _refuse(op: str, message: str, error: type[KernelError] = KernelError) -> None:
    raise error(f"edge::{op}: {message}")


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


# ---- structure: tensors ------------------------------------------------------------------------

def tensor(op: str, name: str, t, *, dtypes, dim: int | None = None, min_dim: int = 0,
           device: torch.device | None = None) -> None:
    """`t` is a tensor of one of `dtypes` (or any floating dtype for FLOATING), of rank `dim` (or at
    least `min_dim`), on `device`."""
    if not isinstance(t, Tensor):
        _refuse(op, f"{name} must be a tensor, got {type(t).__name__}", KernelTypeError)
    if dtypes == FLOATING:
        if not t.is_floating_point():
            _refuse(op, f"{name} must be a floating-point tensor, got {t.dtype}", KernelTypeError)
    elif t.dtype not in dtypes:
        wanted = " or ".join(str(d) for d in dtypes)
        _refuse(op, f"{name} must be {wanted}, got {t.dtype}", KernelTypeError)
    if dim is not None and t.dim() != dim:
        _refuse(op, f"{name} must be {dim}-D, got {t.dim()}-D {_shape(t)}")
    if t.dim() < min_dim:
        _refuse(op, f"{name} must have at least {min_dim} dims, got {t.dim()}-D {_shape(t)}")
    if device is not None and t.device != device:
        _refuse(op, f"{name} is on {t.device}, x on {device}: all tensors must be on one device")


def per_channel(op: str, name: str, t: Tensor | None, channels: int, device: torch.device, *,
                dtypes=FLOATING, optional: bool = False) -> None:
    """One value per output channel: shape (channels,)."""
    if t is None:
        if not optional:
            _refuse(op, f"{name} is required", KernelTypeError)
        return
    tensor(op, name, t, dtypes=dtypes, device=device)
    if t.shape != (channels,):
        _refuse(op, f"{name} must have shape ({channels},) (one per output channel), got {_shape(t)}")


def input_rows(op: str, x: Tensor, k: int) -> None:
    """x (checked: floating, at least one dim) is [..., K]."""
    if x.shape[-1] != k:
        _refuse(op, f"x's last dim must be {k} (the weight's K), got {x.shape[-1]} (x {_shape(x)})")


def out_buffer(op: str, out, shape: Sequence[int]) -> None:
    """The kernels write `out` through a raw pointer: it must be exactly what they write."""
    tensor(op, "out", out, dtypes=(torch.float32,))
    if _shape(out) != tuple(shape) or not out.is_contiguous():
        _refuse(op, f"out must be a contiguous tensor of shape {tuple(shape)}, got "
                    f"{'' if out.is_contiguous() else 'non-contiguous '}{_shape(out)}")


def on_cpu(op: str, tensors: Iterable[Tensor | None]) -> None:
    """The C++ kernels read host memory."""
    for t in tensors:
        if t is not None and t.device.type not in ("cpu", "meta"):
            _refuse(op, f"the C++ kernels take CPU tensors, got one on {t.device}")


# ---- structure: scalars ------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def integer(op: str, name: str, v, low: int, high: int | None = None) -> None:
    if not _is_int(v):
        _refuse(op, f"{name} must be an int, got {type(v).__name__}", KernelTypeError)
    if isinstance(v, int) and (v < low or (high is not None and v > high)):
        wanted = f"in [{low}, {high}]" if high is not None else f">= {low}"
        _refuse(op, f"{name} must be {wanted}, got {v}")


def x_quant(op: str, x_scale, x_zero_point, *, dynamic_ok: bool) -> None:
    """x_scale: a finite float > 0 (static per-tensor quantization), or None (dynamic per-token)
    where the op has it; x_zero_point: the u8 zero point, in [0, 255]."""
    if x_scale is None:
        if not dynamic_ok:
            _refuse(op, "x_scale is required (static per-tensor quantization only)", KernelTypeError)
    elif not isinstance(x_scale, (int, float, torch.SymFloat, torch.SymInt)) or isinstance(x_scale, bool):
        _refuse(op, f"x_scale must be a float, got {type(x_scale).__name__}", KernelTypeError)
    elif isinstance(x_scale, (int, float)) and not (math.isfinite(x_scale) and x_scale > 0):
        _refuse(op, f"x_scale must be finite and > 0{' (or None: dynamic)' if dynamic_ok else ''}, got {x_scale}")
    integer(op, "x_zero_point", x_zero_point, 0, 255)


def weight_bits(op: str, bits) -> None:
    if not _is_int(bits) or bits not in (7, 8):
        _refuse(op, f"weight_bits must be 7 or 8, got {bits!r}")


def pair(op: str, name: str, v, low: int) -> None:
    """A conv's stride / padding / dilation: two ints (h, w), each >= low."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        _refuse(op, f"{name} must be a list of 2 ints (h, w), got {v!r}", KernelTypeError)
    for item in v:
        integer(op, name, item, low)


# ---- the ops -----------------------------------------------------------------------------------

def int8_weight(op: str, weight, weight_scale, weight_sum, bias, device: torch.device, dim: int) -> int:
    """int8 codes (output channel first) with their per-channel scales, row sums and bias; returns N."""
    tensor(op, "weight", weight, dtypes=(torch.int8,), dim=dim, device=device)
    n = weight.shape[0]
    if any(s == 0 for s in weight.shape):
        _refuse(op, f"weight must have no empty dims, got {_shape(weight)}")
    per_channel(op, "weight_scale", weight_scale, n, device)
    per_channel(op, "weight_sum", weight_sum, n, device, dtypes=(torch.int32,))
    per_channel(op, "bias", bias, n, device, optional=True)
    return n


def int8_linear(op: str, x, weight, weight_scale, weight_sum, bias, x_scale, x_zero_point, bits) -> None:
    tensor(op, "x", x, dtypes=FLOATING, min_dim=1)
    int8_weight(op, weight, weight_scale, weight_sum, bias, x.device, dim=2)
    k = weight.shape[1]
    if k > MAX_INT8_K:
        _refuse(op, f"weight's K must be at most {MAX_INT8_K} (int32 sums), got {k}")
    input_rows(op, x, k)
    x_quant(op, x_scale, x_zero_point, dynamic_ok=True)
    weight_bits(op, bits)


def int8_linear_packed(op: str, x, weight, shuffle, out_features, weight_scale, weight_sum, bias, x_scale,
                       x_zero_point) -> None:
    """weight (and shuffle, 2:4) 1-D in the panel layout (panels.py) of an [out_features, K] weight."""
    tensor(op, "x", x, dtypes=FLOATING, min_dim=1)
    integer(op, "out_features", out_features, 1)
    k = x.shape[-1]
    if k == 0 or k > MAX_INT8_K:
        _refuse(op, f"x's last dim (K) must be in [1, {MAX_INT8_K}], got {k}")
    tensor(op, "weight", weight, dtypes=(torch.int8,), dim=1, device=x.device)
    size = packed_size(out_features, k, shuffle is not None)
    if shuffle is not None:
        tensor(op, "shuffle", shuffle, dtypes=(torch.uint8,), dim=1, device=x.device)
        if shuffle.numel() != size:
            _refuse(op, f"shuffle must hold {size} positions for a 2:4 [{out_features}, {k}] weight, got "
                        f"{shuffle.numel()}")
    if weight.numel() != size:
        kind = "2:4" if shuffle is not None else "dense"
        _refuse(op, f"weight must hold {size} packed codes for a {kind} [{out_features}, {k}] weight "
                    f"(panels.pack_int8_panels{'_24' if shuffle is not None else ''}), got {weight.numel()}")
    per_channel(op, "weight_scale", weight_scale, out_features, x.device)
    per_channel(op, "weight_sum", weight_sum, out_features, x.device, dtypes=(torch.int32,))
    per_channel(op, "bias", bias, out_features, x.device, optional=True)
    x_quant(op, x_scale, x_zero_point, dynamic_ok=True)


def int8_packed_values(op: str, weight: Tensor, shuffle: Tensor | None, weight_sum: Tensor, k: int) -> None:
    """Packed codes within [-64, 64] (the kernel's exact u8·s8 path), shuffle positions within a step
    (0..7), weight_sum the sums of each channel's codes. The range is the packed codes' own: a kept
    position named twice would add two codes in the unpacked weight."""
    if not _known(weight, "7-bit"):
        low, high = (int(v) for v in torch.aminmax(weight))
        if low < SEVEN_BIT[0] or high > SEVEN_BIT[1]:
            _refuse(op, f"packed weight codes must lie in [{SEVEN_BIT[0]}, {SEVEN_BIT[1]}], got [{low}, {high}]")
        _remember(weight, "7-bit")
    if shuffle is not None and not _known(shuffle, "positions"):
        if int(shuffle.max()) > 7:
            _refuse(op, f"shuffle positions must lie in [0, 7] (within a step of 8), got up to {int(shuffle.max())}")
        _remember(shuffle, "positions")
    if not _known(weight_sum, "row sums", weight):
        codes = unpack_int8_panels(weight, shuffle, weight_sum.shape[0], k)
        if not torch.equal(codes.sum(1, dtype=torch.int32), weight_sum):
            _refuse(op, "weight_sum must hold the sums of each output channel's codes; it does not")
        _remember(weight_sum, "row sums", weight)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_weight_codes(op: str, codes) -> None:
    """int8 conv weight codes in torch's layout [O, C/groups, KH, KW], on the CPU (to be packed)."""
    tensor(op, "codes", codes, dtypes=(torch.int8,), dim=4)
    if any(s == 0 for s in codes.shape):
        _refuse(op, f"codes must have no empty dims, got {_shape(codes)}")
    on_cpu(op, (codes,))


def int8_conv2d(op: str, x, weight, weight_scale, weight_sum, bias, stride, padding, dilation, groups, x_scale,
                x_zero_point, bits) -> tuple[int, int, int, int]:
    """weight: packed codes [O, KH, KW, C/groups] (ops.pack_int8_conv2d_weight). Returns the output
    shape (B, O, OH, OW)."""
    tensor(op, "x", x, dtypes=FLOATING, dim=4)
    o = int8_weight(op, weight, weight_scale, weight_sum, bias, x.device, dim=4)
    pair(op, "stride", stride, 1)
    pair(op, "padding", padding, 0)
    pair(op, "dilation", dilation, 1)
    integer(op, "groups", groups, 1)
    b, c, h, w = x.shape
    _, kh, kw, per_group = weight.shape
    if c == 0 or h == 0 or w == 0:
        _refuse(op, f"x must have channels, height and width, got {_shape(x)}")
    if per_group * groups != c or o % groups:
        _refuse(op, f"weight {_shape(weight)} with groups={groups} needs {per_group * groups} input channels and "
                    f"{groups} | {o} output channels; x has {c} channels: these do not fit")
    if per_group * kh * kw > MAX_INT8_K:
        _refuse(op, f"weight's C/groups·KH·KW must be at most {MAX_INT8_K} (int32 sums), got {per_group * kh * kw}")
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        _refuse(op, f"the {kh}x{kw} kernel (dilation {list(dilation)}) does not fit the padded {h}x{w} input "
                    f"(padding {list(padding)}): output would be {oh}x{ow}")
    x_quant(op, x_scale, x_zero_point, dynamic_ok=False)
    weight_bits(op, bits)
    return b, o, oh, ow


def activation_quant(op: str, name: str, scale, zero_point) -> None:
    """A static per-tensor u8 quantization: `name`_scale a finite float > 0, `name`_zero_point in [0, 255]."""
    if not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)) or isinstance(scale, bool):
        _refuse(op, f"{name}_scale must be a float, got {type(scale).__name__}", KernelTypeError)
    if isinstance(scale, (int, float)) and not (math.isfinite(scale) and scale > 0):
        _refuse(op, f"{name}_scale must be finite and > 0, got {scale}")
    integer(op, f"{name}_zero_point", zero_point, 0, 255)


def int8_bmm(op: str, a, b, a_scale, a_zero_point, b_scale, b_zero_point, transpose_b) -> tuple[int, ...]:
    """a [..., M, K] @ b [..., K, N] (b [..., N, K] with transpose_b), the same batch dims. Returns the
    output shape [..., M, N]."""
    tensor(op, "a", a, dtypes=FLOATING, min_dim=2)
    tensor(op, "b", b, dtypes=FLOATING, min_dim=2, device=a.device)
    if not isinstance(transpose_b, bool):
        _refuse(op, f"transpose_b must be a bool, got {type(transpose_b).__name__}", KernelTypeError)
    if a.shape[:-2] != b.shape[:-2]:
        _refuse(op, f"a and b must have the same batch dims, got a {_shape(a)} and b {_shape(b)}")
    k = a.shape[-1]
    b_k, n = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if b_k != k:
        layout = "[..., N, K]" if transpose_b else "[..., K, N]"
        _refuse(op, f"b {_shape(b)} read as {layout} (transpose_b={transpose_b}) has K={b_k}; a's K is {k}")
    if isinstance(k, int) and not 0 < k <= MAX_INT8_BMM_K:
        _refuse(op, f"K must be in [1, {MAX_INT8_BMM_K}] (int32 sums), got {k}")
    if isinstance(n, int) and n == 0:
        _refuse(op, f"N must be > 0, got b {_shape(b)}")
    activation_quant(op, "a", a_scale, a_zero_point)
    activation_quant(op, "b", b_scale, b_zero_point)
    return (*a.shape[:-1], n)


def sparse24_k(values) -> int:
    """The dense weight's K of 2:4 values [N, K/2]."""
    return values.shape[1] * 2


def sparse24_index_bytes(k: int) -> int:
    """Index bytes per row: one nibble per group of 4 along K."""
    return (k // 4 + 1) // 2


def sparse24_linear(op: str, x, values, indices, bias, weight_scale, x_scale, x_zero_point) -> None:
    tensor(op, "x", x, dtypes=FLOATING, min_dim=1)
    tensor(op, "values", values, dim=2, device=x.device,
           dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8))
    n, k = values.shape[0], sparse24_k(values)
    if k % 4:
        _refuse(op, f"values must have shape (N, K/2) with K a multiple of 4, got {_shape(values)} (K={k})")
    tensor(op, "indices", indices, dtypes=(torch.uint8,), dim=2, device=x.device)
    if _shape(indices) != (n, sparse24_index_bytes(k)):
        _refuse(op, f"indices must have shape {(n, sparse24_index_bytes(k))} (N, ceil(K/8) for K={k}), "
                    f"got {_shape(indices)}")
    per_channel(op, "bias", bias, n, x.device, optional=True)
    input_rows(op, x, k)
    if values.dtype == torch.int8:
        per_channel(op, "weight_scale", weight_scale, n, x.device)
        if k == 0:
            _refuse(op, "int8 values must have K > 0, got K=0")
        x_quant(op, x_scale, x_zero_point, dynamic_ok=True)
    else:  # float values: no quantization; arguments that would be ignored are refused instead
        if weight_scale is not None or x_scale is not None:
            _refuse(op, f"weight_scale and x_scale are for int8 values; values are {values.dtype}")
        integer(op, "x_zero_point", x_zero_point, 0, 255)


def lowrank_linear(op: str, x, first, second, bias) -> None:
    """x [..., K] @ first [r, K]ᵀ @ second [N, r]ᵀ + bias [N], all one floating dtype."""
    tensor(op, "x", x, dtypes=FLOATING, min_dim=1)
    for name, t in (("first", first), ("second", second)):
        tensor(op, name, t, dtypes=(x.dtype,), dim=2, device=x.device)
    if first.shape[1] != x.shape[-1]:
        _refuse(op, f"first must have shape (r, {x.shape[-1]}) (x's last dim), got {_shape(first)}")
    if second.shape[1] != first.shape[0]:
        _refuse(op, f"second must have shape (N, {first.shape[0]}) (first's rank), got {_shape(second)}")
    per_channel(op, "bias", bias, second.shape[0], x.device, dtypes=(x.dtype,), optional=True)


# ---- values a weight promises: scanned once per tensor ---------------------------------------

def row_stats(codes: Tensor) -> tuple[Tensor, int, int]:
    """(row sums int32 [N], min code, max code) of weight codes [N, ...] (int8 on CPU: one C++ pass)."""
    flat = codes.reshape(codes.shape[0], math.prod(codes.shape[1:]))
    if flat.device.type != "cpu" or flat.dtype != torch.int8:
        low, high = (int(v) for v in torch.aminmax(flat)) if flat.numel() else (127, -128)
        return flat.sum(1, dtype=torch.int32), low, high
    from .build import last_error, library  # the C++ library, built on first use

    flat = flat.contiguous()
    sums, bounds = torch.empty(flat.shape[0], dtype=torch.int32), torch.empty(2, dtype=torch.int32)
    code = library().edge_int8_row_stats(*abi.buffer(flat), *flat.shape, *abi.buffer(sums), *abi.buffer(bounds),
                                         torch.get_num_threads())
    if code != 0:
        raise KernelError(f"edge::int8 weight: {last_error()}")
    return sums, int(bounds[0]), int(bounds[1])


# id(tensor) → (weakref to it, {fact: (its version, weakref to the tensor the fact relates it to or
# None, that one's version)}). Keyed by id, not by a WeakKeyDictionary: this is on every call.
_FACTS: dict[int, tuple[weakref.ref, dict]] = {}


def _facts(t: Tensor, create: bool = False) -> dict | None:
    entry = _FACTS.get(id(t))
    if entry is not None and entry[0]() is t:
        return entry[1]
    if not create:
        return None
    key, facts = id(t), {}

    def forget(ref, key=key):  # when t dies; a newer entry under a reused id stays
        if _FACTS.get(key, (None,))[0] is ref:
            del _FACTS[key]

    _FACTS[key] = (weakref.ref(t, forget), facts)
    return facts


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


def _known(t: Tensor, fact: str, other: Tensor | None = None) -> bool:
    entry = (_facts(t) or {}).get(fact)
    if entry is None or entry[0] != _version(t):
        return False
    if other is None:
        return entry[1] is None
    return entry[1] is not None and entry[1]() is other and entry[2] == _version(other)


def _remember(t: Tensor, fact: str, other: Tensor | None = None) -> None:
    related = (None, None) if other is None else (weakref.ref(other), _version(other))
    _facts(t, create=True)[fact] = (_version(t), *related)


def int8_weight_values(op: str, weight: Tensor, weight_sum: Tensor, bits: int) -> None:
    """weight_bits=7 codes lie within [-64, 64]; weight_sum holds the codes' row sums."""
    check_range = bits == 7 and not _known(weight, "7-bit")
    check_sums = not _known(weight_sum, "row sums", weight)
    if not (check_range or check_sums):
        return
    sums, low, high = row_stats(weight)
    if check_range:
        if low < SEVEN_BIT[0] or high > SEVEN_BIT[1]:
            _refuse(op, f"weight_bits=7 needs every weight code in [{SEVEN_BIT[0]}, {SEVEN_BIT[1]}], got codes in "
                        f"[{low}, {high}]: pass weight_bits=8")
        _remember(weight, "7-bit")
    if check_sums:
        if not torch.equal(sums, weight_sum):
            _refuse(op, "weight_sum must hold the row sums of weight (ops.int8_weight_sum(weight)); it does not")
        _remember(weight_sum, "row sums", weight)


def sparse24_index_values(op: str, indices: Tensor, k: int) -> None:
    """Each group's nibble names two kept positions i0 < i1 (pack_sparse24's format), so the float
    and the int8 paths read the same weight."""
    if _known(indices, "2:4 order"):
        return
    groups = k // 4
    nibbles = torch.stack([indices & 0xF, indices >> 4], dim=-1).reshape(indices.shape[0], -1)[:, :groups]
    bad = (nibbles & 3) >= (nibbles >> 2)
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        nibble = int(nibbles[row, group])
        _refuse(op, f"indices must name two kept positions i0 < i1 per group of 4; row {row} group {group} has "
                    f"i0={nibble & 3}, i1={nibble >> 2}")
    _remember(indices, "2:4 order")
