"""The C ABI of `csrc/**/*.cpp`: each entry point's ctypes signature.

Kept free of torch and of the package, so that a bare interpreter (the AddressSanitizer test's
subprocess, which preloads libasan) can declare the same signatures on its own build of the library.

Every buffer is passed as (pointer, size in bytes): the C++ refuses a call whose buffers are
shorter than its shapes need, so a direct call cannot make a kernel read or write out of bounds.
Every kernel returns 0 on success, else a nonzero code (check.h: 1 null pointer, 2 bad shape,
3 bad quantization, 4 out of memory, 5 short buffer) with a one-line message from
`edge_last_error()` on the calling thread.
"""
from __future__ import annotations

import ctypes

_p, _i64, _i32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
_buf = [_p, _i64]  # a buffer: pointer, size in bytes

SIGNATURES = {
    # x f32 [M,K]; M; K; w i8 [N,K]; N; w_scale f32 [N]; w_sum i32 [N] (row sums of w); bias f32 [N] or NULL;
    # x_scale > 0: static per-tensor (u8 codes, x_zero_point in [0, 255]), x_scale <= 0: dynamic per-token;
    # weight_bits 7 promises |w| <= 64 (the u8*s8 16-bit pair path is then exact); out f32 [M,N]; threads.
    "edge_int8_linear": (_i32, [*_buf, _i64, _i64, *_buf, _i64, *_buf, *_buf, *_buf, _f64, _i32, _i32, *_buf, _i32]),
    # x f32 [M,K]; M; K; w i8 panel-packed 7-bit codes; shuffle u8 (2:4: each code's activation position) or
    # NULL (dense); N; w_scale f32 [N]; w_sum i32 [N]; bias f32 [N] or NULL; x_scale, x_zero_point as
    # edge_int8_linear; out f32 [M,N]; threads.
    "edge_int8_linear_packed": (_i32, [*_buf, _i64, _i64, *_buf, *_buf, _i64, *_buf, *_buf, *_buf, _f64, _i32, *_buf,
                                       _i32]),
    # x f32 [B,C,H,W]; B, C, H, W; w i8 [O,KH,KW,C/groups] (packed); O, KH, KW; w_scale f32 [O]; w_sum i32 [O];
    # bias f32 [O] or NULL; stride/padding/dilation (h, w); groups; x_scale > 0, x_zero_point static;
    # weight_bits; out f32 [B,O,OH,OW]; threads.
    "edge_int8_conv2d": (_i32, [*_buf, _i64, _i64, _i64, _i64, *_buf, _i64, _i64, _i64, *_buf, *_buf, *_buf,
                                _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f64, _i32, _i32, *_buf, _i32]),
    # w i8 [O,Cg,KH,KW] (torch's layout); O, Cg, KH, KW; packed i8 [O,KH,KW,Cg] (out): what edge_int8_conv2d reads;
    # threads.
    "edge_int8_conv2d_pack": (_i32, [*_buf, _i64, _i64, _i64, _i64, *_buf, _i32]),
    # a f32 [batch,M,K]; b f32 [batch,K,N] ([batch,N,K] with transpose_b); batch; M; K; N; transpose_b 0/1;
    # a_scale > 0, a_zero_point in [0, 255]; b_scale, b_zero_point (static per-tensor u8 for both);
    # out f32 [batch,M,N]; threads.
    "edge_int8_bmm": (_i32, [*_buf, *_buf, _i64, _i64, _i64, _i64, _i32, _f64, _i32, _f64, _i32, *_buf, _i32]),
    # x f32 [M,K]; M; K; values f32 [N,K/2]; indices u8 [N,ceil(K/8)]: per group of 4 along K, the two
    # kept positions i0 < i1 as the nibble i0 | i1 << 2, group 2j in the low nibble of byte j; N;
    # bias f32 [N] or NULL; out f32 [M,N]; threads.
    "edge_sparse24_linear_f32": (_i32, [*_buf, _i64, _i64, *_buf, *_buf, _i64, *_buf, *_buf, _i32]),
    # w i8 [N,K]; N; K; sums i32 [N] (out: row sums); range i32 [2] (out: min and max code); threads.
    "edge_int8_row_stats": (_i32, [*_buf, _i64, _i64, *_buf, *_buf, _i32]),
    # The last refusal's message on this thread.
    "edge_last_error": (ctypes.c_char_p, []),
}


def buffer(t) -> tuple[ctypes.c_void_p | None, int]:
    """(pointer, size in bytes) of a contiguous tensor, (None, 0) for None: how the ABI takes a buffer."""
    return (None, 0) if t is None else (ctypes.c_void_p(t.data_ptr()), t.numel() * t.element_size())


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets the signatures of `lib`'s entry points (ctypes would otherwise pass every int as 32 bits)."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def last_error(lib: ctypes.CDLL) -> str:
    return lib.edge_last_error().decode(errors="replace")
