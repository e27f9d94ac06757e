"""Calls the kernels' raw C ABI (no Python checks) on an AddressSanitizer build: run by test_asan.py
as `python asan_calls.py LIBRARY MODE` with libasan preloaded. No torch: every buffer is a plain
malloc block of exactly the bytes asked for, so ASan's redzones start right after it.

MODE
  refuse  short buffers (honestly sized) and bad arguments: each call must be refused with a
          nonzero code and a message naming the buffer, and nothing may be read out of bounds;
  valid   calls across shapes, both CPU paths (AVX2 and portable) and thread counts: code 0, the
          2:4 kernel's outputs equal to a dense reference, the conv weights packed channels-last;
  lie     a call whose indices size claims more bytes than were allocated: the kernel reads past
          the block and ASan must report it (the check that this harness sees out-of-bounds reads);
  ops     the `edge::` ops themselves (torch imported, the ASan build swapped in): valid calls
          match torch, and broken arguments (short indices, ...) are refused with a KernelError.
          Needs libstdc++ preloaded beside libasan (torch throws C++ exceptions).
Prints one line per call; the last line is "ALL OK" when every expectation held.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import random
import sys
from pathlib import Path

ABI_PATH = Path(__file__).resolve().parents[2] / "kernels" / "abi.py"
_spec = importlib.util.spec_from_file_location("edge_abi", ABI_PATH)
abi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(abi)

libc = ctypes.CDLL(None)  # with libasan preloaded, malloc is ASan's
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]

F32, I8, U8, I32 = ctypes.c_float, ctypes.c_int8, ctypes.c_uint8, ctypes.c_int32


class Buffer:
    """A malloc block holding `values` as `ctype`; `(ptr, nbytes)` is how the C ABI takes it."""

    def __init__(self, ctype, values, claim: int | None = None):
        self.ctype, self.count = ctype, len(values)
        self.nbytes = self.count * ctypes.sizeof(ctype)
        self.ptr = libc.malloc(max(self.nbytes, 1))
        if self.count:
            ctypes.memmove(self.ptr, (ctype * self.count)(*values), self.nbytes)
        self.claimed = self.nbytes if claim is None else claim  # a lie, for the `lie` mode

    def abi(self):
        return ctypes.c_void_p(self.ptr), self.claimed

    def values(self) -> list:
        return list((self.ctype * self.count).from_address(self.ptr))


NULL = (None, 0)


def rand_floats(rng: random.Random, n: int) -> list[float]:
    return [rng.uniform(-2, 2) for _ in range(n)]


def rand_codes(rng: random.Random, n: int, bits: int) -> list[int]:
    low, high = (-64, 64) if bits == 7 else (-128, 127)
    return [rng.randint(low, high) for _ in range(n)]


# ---- 2:4 operands -------------------------------------------------------------------------------

def sparse_weight(rng: random.Random, n: int, k: int) -> tuple[list[float], list[int], list[list[float]]]:
    """(values [N*K/2], indices [N*ceil(K/8)], dense rows) in pack_sparse24's format."""
    groups, nbytes = k // 4, (k // 4 + 1) // 2
    values, indices, dense = [], [], []
    for _ in range(n):
        row, nibbles = [0.0] * k, []
        for g in range(groups):
            i0, i1 = sorted(rng.sample(range(4), 2))
            v0, v1 = rng.uniform(-1, 1), rng.uniform(-1, 1)
            values += [v0, v1]
            row[4 * g + i0], row[4 * g + i1] = v0, v1
            nibbles.append(i0 | i1 << 2)
        nibbles += [0] * (2 * nbytes - len(nibbles))
        indices += [nibbles[2 * j] | nibbles[2 * j + 1] << 4 for j in range(nbytes)]
        dense.append(row)
    return values, indices, dense


def sparse_call(lib, x, m, k, values, indices, n, bias, out, threads=1) -> int:
    return lib.edge_sparse24_linear_f32(*x.abi(), m, k, *values.abi(), *indices.abi(), n,
                                        *(bias.abi() if bias else NULL), *out.abi(), threads)


def sparse_operands(rng, m, k, n, with_bias=True):
    values, indices, dense = sparse_weight(rng, n, k)
    x = rand_floats(rng, m * k)
    bias = rand_floats(rng, n) if with_bias else None
    return x, values, indices, dense, bias


# ---- refuse --------------------------------------------------------------------------------------

class Expect:
    def __init__(self, lib):
        self.lib, self.failures = lib, []

    def refused(self, name: str, code: int, *mentions: str) -> None:
        message = abi.last_error(self.lib)
        print(f"{name}: code {code}: {message}")
        if code == 0 or not all(word in message for word in mentions):
            self.failures.append(f"{name}: expected a refusal mentioning {mentions}, got code {code}: {message!r}")

    def ok(self, name: str, code: int) -> None:
        if code != 0:
            self.failures.append(f"{name}: expected success, got code {code}: {abi.last_error(self.lib)!r}")


def refuse_sparse24(lib, expect: Expect) -> None:
    rng = random.Random(0)
    m, k, n = 3, 32, 4
    x, values, indices, _, bias = sparse_operands(rng, m, k, n)
    full = {"x": Buffer(F32, x), "values": Buffer(F32, values), "indices": Buffer(U8, indices),
            "bias": Buffer(F32, bias), "out": Buffer(F32, [0.0] * (m * n))}
    short = {"x": Buffer(F32, x[:-1]), "values": Buffer(F32, values[:-1]), "indices": Buffer(U8, indices[:-1]),
             "bias": Buffer(F32, bias[:-1]), "out": Buffer(F32, [0.0] * (m * n - 1))}
    for name in ("indices", "values", "bias", "x", "out"):
        args = {**full, name: short[name]}
        code = sparse_call(lib, args["x"], m, k, args["values"], args["indices"], n, args["bias"], args["out"])
        expect.refused(f"sparse24_linear_f32 short {name}", code, name, "expected")
    b = full
    expect.refused("sparse24_linear_f32 K=30", sparse_call(lib, b["x"], m, 30, b["values"], b["indices"], n, None,
                                                           b["out"]), "multiple of 4")
    expect.refused("sparse24_linear_f32 M=-1", sparse_call(lib, b["x"], -1, k, b["values"], b["indices"], n, None,
                                                           b["out"]), "negative")
    expect.refused("sparse24_linear_f32 M*K overflows", sparse_call(lib, b["x"], 2**62, k, b["values"], b["indices"],
                                                                    n, None, b["out"]), "overflow")
    code = lib.edge_sparse24_linear_f32(*b["x"].abi(), m, k, *b["values"].abi(), *NULL, n, *NULL, *b["out"].abi(), 1)
    expect.refused("sparse24_linear_f32 null indices", code, "indices", "null")


def linear_call(lib, x, m, k, w, n, scale, wsum, bias, x_scale, zp, bits, out, threads=1) -> int:
    return lib.edge_int8_linear(*x.abi(), m, k, *w.abi(), n, *scale.abi(), *wsum.abi(),
                                *(bias.abi() if bias else NULL), x_scale, zp, bits, *out.abi(), threads)


def linear_operands(rng, m, k, n, bits):
    w = rand_codes(rng, n * k, bits)
    return {"x": Buffer(F32, rand_floats(rng, m * k)), "w": Buffer(I8, w), "scale": Buffer(F32, [0.01] * n),
            "wsum": Buffer(I32, [sum(w[r * k:(r + 1) * k]) for r in range(n)]),
            "bias": Buffer(F32, rand_floats(rng, n)), "out": Buffer(F32, [0.0] * (m * n))}


def refuse_int8_linear(lib, expect: Expect) -> None:
    rng = random.Random(1)
    m, k, n = 3, 40, 5
    full = linear_operands(rng, m, k, n, 8)
    for name, c_name, ctype in (("x", "x", F32), ("w", "w", I8), ("scale", "w_scale", F32), ("wsum", "w_sum", I32),
                                ("bias", "bias", F32), ("out", "out", F32)):
        args = {**full, name: Buffer(ctype, full[name].values()[:-1])}
        code = linear_call(lib, args["x"], m, k, args["w"], n, args["scale"], args["wsum"], args["bias"], 0.05, 3, 8,
                           args["out"])
        expect.refused(f"int8_linear short {c_name}", code, c_name, "expected")
    f = full
    for name, kk, zp, bits, x_scale, word in (("K=0", 0, 3, 8, 0.05, "K"), ("K too long", 70000, 3, 8, 0.05, "K"),
                                              ("zero point 256", k, 256, 8, 0.05, "x_zero_point"),
                                              ("weight_bits 6", k, 3, 6, 0.05, "weight_bits"),
                                              ("x_scale nan", k, 3, 8, float("nan"), "x_scale")):
        code = linear_call(lib, f["x"], m, kk, f["w"], n, f["scale"], f["wsum"], f["bias"], x_scale, zp, bits, f["out"])
        expect.refused(f"int8_linear {name}", code, word)


def conv_call(lib, ops, geometry, x_scale=0.05, zp=3, bits=8, threads=1) -> int:
    b, c, h, w, o, kh, kw, stride, pad, dil, groups = geometry
    return lib.edge_int8_conv2d(*ops["x"].abi(), b, c, h, w, *ops["w"].abi(), o, kh, kw, *ops["scale"].abi(),
                                *ops["wsum"].abi(), *(ops["bias"].abi() if ops["bias"] else NULL),
                                stride[0], stride[1], pad[0], pad[1], dil[0], dil[1], groups, x_scale, zp, bits,
                                *ops["out"].abi(), threads)


def conv_operands(rng, geometry, bits, with_bias=True):
    b, c, h, w, o, kh, kw, stride, pad, dil, groups = geometry
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    per = c // groups * kh * kw
    codes = rand_codes(rng, o * per, bits)
    return {"x": Buffer(F32, rand_floats(rng, b * c * h * w)), "w": Buffer(I8, codes), "scale": Buffer(F32, [0.01] * o),
            "wsum": Buffer(I32, [sum(codes[r * per:(r + 1) * per]) for r in range(o)]),
            "bias": Buffer(F32, rand_floats(rng, o)) if with_bias else None,
            "out": Buffer(F32, [0.0] * (b * o * max(oh, 0) * max(ow, 0)))}


def refuse_int8_conv2d(lib, expect: Expect) -> None:
    rng = random.Random(2)
    geometry = (1, 4, 5, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2)
    full = conv_operands(rng, geometry, 8)
    for name, c_name, ctype in (("x", "x", F32), ("w", "w", I8), ("scale", "w_scale", F32), ("wsum", "w_sum", I32),
                                ("bias", "bias", F32), ("out", "out", F32)):
        args = {**full, name: Buffer(ctype, full[name].values()[:-1])}
        expect.refused(f"int8_conv2d short {c_name}", conv_call(lib, args, geometry), c_name, "expected")
    expect.refused("int8_conv2d groups=3", conv_call(lib, full, (*geometry[:-1], 3)), "groups")
    expect.refused("int8_conv2d kernel larger than input",
                   conv_call(lib, full, (1, 4, 2, 2, 4, 3, 3, (1, 1), (0, 0), (1, 1), 2)), "larger")
    expect.refused("int8_conv2d stride 0", conv_call(lib, full, (*geometry[:7], (0, 1), *geometry[8:])), "stride")
    expect.refused("int8_conv2d x_scale 0", conv_call(lib, full, geometry, x_scale=0.0), "x_scale")


def refuse_row_stats(lib, expect: Expect) -> None:
    n, k = 3, 40
    w, sums, bounds = Buffer(I8, [1] * (n * k)), Buffer(I32, [0] * n), Buffer(I32, [0, 0])
    for name, args in (("w", (Buffer(I8, [1] * (n * k - 1)), sums, bounds)), ("sums", (w, Buffer(I32, [0] * (n - 1)),
                                                                                        bounds)),
                       ("range", (w, sums, Buffer(I32, [0])))):
        code = lib.edge_int8_row_stats(*args[0].abi(), n, k, *args[1].abi(), *args[2].abi(), 1)
        expect.refused(f"int8_row_stats short {name}", code, name, "expected")


def refuse_conv2d_pack(lib, expect: Expect) -> None:
    o, cg, kh, kw = 4, 3, 3, 2
    full = o * cg * kh * kw
    for name, w, packed in (("w", Buffer(I8, [1] * (full - 1)), Buffer(I8, [0] * full)),
                            ("packed", Buffer(I8, [1] * full), Buffer(I8, [0] * (full - 1)))):
        code = lib.edge_int8_conv2d_pack(*w.abi(), o, cg, kh, kw, *packed.abi(), 1)
        expect.refused(f"int8_conv2d_pack short {name}", code, name, "expected")


# ---- valid ---------------------------------------------------------------------------------------

def valid_conv2d_pack(lib, expect: Expect) -> None:
    rng = random.Random(9)
    for o, cg, kh, kw in ((1, 1, 1, 1), (4, 3, 3, 2), (7, 5, 1, 3), (300, 70, 3, 3)):
        codes, packed = rand_codes(rng, o * cg * kh * kw, 8), Buffer(I8, [0] * (o * cg * kh * kw))
        expect.ok(f"int8_conv2d_pack {o}x{cg}x{kh}x{kw}",
                  lib.edge_int8_conv2d_pack(*Buffer(I8, codes).abi(), o, cg, kh, kw, *packed.abi(), 2))
        # packed[o, i, j, c] = codes[o, c, i, j]
        want = [codes[((n * cg + c) * kh + i) * kw + j]
                for n in range(o) for i in range(kh) for j in range(kw) for c in range(cg)]
        if packed.values() != want:
            expect.failures.append(f"int8_conv2d_pack {o}x{cg}x{kh}x{kw}: not channels-last")


def bmm_call(lib, a, b, batch, m, k, n, transpose_b, out, a_zp=120, b_zp=130, threads=1) -> int:
    return lib.edge_int8_bmm(*a.abi(), *b.abi(), batch, m, k, n, transpose_b, 0.02, a_zp, 0.03, b_zp, *out.abi(),
                             threads)


def bmm_operands(rng, batch, m, k, n):
    return {"a": Buffer(F32, rand_floats(rng, batch * m * k)), "b": Buffer(F32, rand_floats(rng, batch * k * n)),
            "out": Buffer(F32, [0.0] * (batch * m * n))}


def refuse_int8_bmm(lib, expect: Expect) -> None:
    rng = random.Random(9)
    batch, m, k, n = 2, 3, 9, 5
    full = bmm_operands(rng, batch, m, k, n)
    for name in ("a", "b", "out"):
        args = {**full, name: Buffer(F32, full[name].values()[:-1])}
        expect.refused(f"int8_bmm short {name}", bmm_call(lib, args["a"], args["b"], batch, m, k, n, 0, args["out"]),
                       name, "expected")
    f = full
    for name, kk, transpose_b, a_zp, word in (("K=0", 0, 0, 120, "K"), ("K too long", 40000, 0, 120, "K"),
                                              ("transpose_b 2", k, 2, 120, "transpose_b"),
                                              ("a zero point 256", k, 0, 256, "a_zero_point")):
        code = bmm_call(lib, f["a"], f["b"], batch, m, kk, n, transpose_b, f["out"], a_zp=a_zp)
        expect.refused(f"int8_bmm {name}", code, word)
    expect.refused("int8_bmm sizes overflow", bmm_call(lib, f["a"], f["b"], 2**40, 2**20, k, n, 0, f["out"]),
                   "overflow")


def valid_int8_bmm(lib, expect: Expect) -> None:
    rng = random.Random(10)
    for batch, m, k, n in ((1, 1, 1, 1), (2, 5, 7, 9), (3, 17, 33, 31), (1, 4, 64, 16), (4, 9, 2, 18), (8, 33, 40, 30)):
        for transpose_b in (0, 1):
            ops = bmm_operands(rng, batch, m, k, n)
            code = bmm_call(lib, ops["a"], ops["b"], batch, m, k, n, transpose_b, ops["out"], threads=2)
            expect.ok(f"int8_bmm {batch}x{m}x{k}x{n} transpose_b={transpose_b}", code)


def valid_row_stats(lib, expect: Expect) -> None:
    rng = random.Random(8)
    for n, k in ((1, 1), (3, 31), (2, 32), (5, 33), (4, 100), (2, 0)):
        codes = rand_codes(rng, n * k, 8)
        sums, bounds = Buffer(I32, [0] * n), Buffer(I32, [0, 0])
        expect.ok(f"int8_row_stats {n}x{k}", lib.edge_int8_row_stats(*Buffer(I8, codes).abi(), n, k, *sums.abi(),
                                                                      *bounds.abi(), 2))
        want = [sum(codes[r * k:(r + 1) * k]) for r in range(n)]
        if sums.values() != want or (k and bounds.values() != [min(codes), max(codes)]):
            expect.failures.append(f"int8_row_stats {n}x{k}: {sums.values()} {bounds.values()}")


def valid_sparse24(lib, expect: Expect) -> None:
    rng = random.Random(3)
    for m, k, n in ((1, 4, 1), (2, 12, 3), (3, 32, 9), (5, 100, 7), (40, 36, 33), (33, 68, 5), (70, 20, 2)):
        for with_bias, threads in ((True, 1), (False, 2)):
            x, values, indices, dense, bias = sparse_operands(rng, m, k, n, with_bias)
            out = Buffer(F32, [0.0] * (m * n))
            code = sparse_call(lib, Buffer(F32, x), m, k, Buffer(F32, values), Buffer(U8, indices), n,
                               Buffer(F32, bias) if bias else None, out, threads)
            expect.ok(f"sparse24 {m}x{k}x{n}", code)
            got = out.values()
            for i in range(m):
                for j in range(n):
                    ref = sum(x[i * k + t] * dense[j][t] for t in range(k)) + (bias[j] if bias else 0.0)
                    if abs(got[i * n + j] - ref) > 1e-4 * (1 + abs(ref)):
                        expect.failures.append(f"sparse24 {m}x{k}x{n}: out[{i},{j}] = {got[i * n + j]}, expected {ref}")


def valid_int8_linear(lib, expect: Expect) -> None:
    rng = random.Random(4)
    for m, k, n in ((1, 1, 1), (1, 70, 9), (3, 31, 4), (4, 33, 8), (5, 32, 25), (13, 100, 3), (1, 64, 17)):
        for bits in (7, 8):
            for x_scale in (0.05, 0.0):  # static, dynamic
                ops = linear_operands(rng, m, k, n, bits)
                code = linear_call(lib, ops["x"], m, k, ops["w"], n, ops["scale"], ops["wsum"], ops["bias"], x_scale,
                                   3, bits, ops["out"], threads=2)
                expect.ok(f"int8_linear {m}x{k}x{n} bits={bits} x_scale={x_scale}", code)


def packed_operands(rng, m, k, n, sparse):
    """Operands of edge_int8_linear_packed: buffers of exactly the packed sizes (any codes within
    [-64, 64] and positions within [0, 7] are valid; the sums need not match for memory safety)."""
    n8 = -(-n // 8) * 8
    size = n8 * (-(-k // 8) * 4 if sparse else -(-k // 4) * 4)
    return {"x": Buffer(F32, rand_floats(rng, m * k)), "w": Buffer(I8, rand_codes(rng, size, 7)),
            "shuffle": Buffer(U8, [rng.randrange(8) for _ in range(size)]) if sparse else None,
            "scale": Buffer(F32, [0.01] * n), "wsum": Buffer(I32, [0] * n), "bias": Buffer(F32, rand_floats(rng, n)),
            "out": Buffer(F32, [0.0] * (m * n))}


def packed_call(lib, ops, m, k, n, x_scale=0.05, zp=3, threads=1) -> int:
    shuffle = ops["shuffle"].abi() if ops["shuffle"] else NULL
    return lib.edge_int8_linear_packed(*ops["x"].abi(), m, k, *ops["w"].abi(), *shuffle, n, *ops["scale"].abi(),
                                       *ops["wsum"].abi(), *ops["bias"].abi(), x_scale, zp, *ops["out"].abi(),
                                       threads)


def valid_int8_linear_packed(lib, expect: Expect) -> None:
    rng = random.Random(7)
    for m, k, n in ((1, 1, 1), (1, 70, 9), (3, 31, 4), (4, 33, 8), (5, 32, 25), (13, 100, 3), (9, 64, 49)):
        for sparse in (False, True):
            for x_scale in (0.05, 0.0):  # static, dynamic
                code = packed_call(lib, packed_operands(rng, m, k, n, sparse), m, k, n, x_scale, threads=2)
                expect.ok(f"int8_linear_packed {m}x{k}x{n} sparse={sparse} x_scale={x_scale}", code)


def refuse_int8_linear_packed(lib, expect: Expect) -> None:
    rng = random.Random(8)
    m, k, n = 3, 40, 10
    for sparse in (False, True):
        full = packed_operands(rng, m, k, n, sparse)
        short = [("x", F32), ("w", I8), ("scale", F32), ("wsum", I32), ("bias", F32), ("out", F32)]
        for name, ctype in short + ([("shuffle", U8)] if sparse else []):
            args = {**full, name: Buffer(ctype, full[name].values()[:-1])}
            expect.refused(f"int8_linear_packed sparse={sparse} short {name}", packed_call(lib, args, m, k, n),
                           "expected")
    code = packed_call(lib, packed_operands(rng, m, k, n, False), m, 0, n)
    expect.refused("int8_linear_packed K=0", code, "K")


def valid_int8_conv2d(lib, expect: Expect) -> None:
    rng = random.Random(5)
    geometries = [
        (1, 4, 5, 5, 4, 3, 3, (1, 1), (1, 1), (1, 1), 2),     # grouped, padded
        (2, 3, 7, 6, 6, 3, 3, (2, 1), (1, 0), (1, 2), 3),     # depthwise x2, strided, dilated
        (1, 32, 4, 4, 8, 1, 1, (1, 1), (0, 0), (1, 1), 1),    # 1x1: the codes are the GEMM matrix
        (2, 5, 9, 9, 7, 5, 3, (2, 2), (2, 1), (1, 1), 1),     # odd sizes, K tail
        (1, 8, 3, 3, 8, 3, 3, (1, 1), (0, 0), (1, 1), 8),     # depthwise, one output pixel
    ]
    for geometry in geometries:
        for bits in (7, 8):
            ops = conv_operands(rng, geometry, bits, with_bias=bits == 8)
            expect.ok(f"int8_conv2d {geometry} bits={bits}", conv_call(lib, ops, geometry, bits=bits, threads=2))


def lie(lib) -> None:
    """Indices claimed as 4 bytes per row, allocated 3: the kernel reads the missing byte."""
    rng = random.Random(6)
    m, k, n = 1, 32, 1
    x, values, indices, _, _ = sparse_operands(rng, m, k, n, with_bias=False)
    out = Buffer(F32, [0.0] * (m * n))
    print("calling with indices of 3 bytes claimed as 4", flush=True)
    code = sparse_call(lib, Buffer(F32, x), m, k, Buffer(F32, values), Buffer(U8, indices[:-1], claim=4), n, None, out)
    print(f"returned {code}: ASan did not stop the out-of-bounds read", flush=True)


def through_the_ops(library: str, expect: Expect) -> None:
    import torch
    from edgepasses.kernels import build, ops

    build.library_path = lambda: Path(library)  # the ops run the ASan build
    build.library.cache_clear()
    gen = torch.Generator().manual_seed(7)

    def close(name, got, ref):
        if not torch.allclose(got.double(), ref.double(), rtol=1e-4, atol=1e-3):
            expect.failures.append(f"{name}: max |error| {(got.double() - ref.double()).abs().max().item():.3g}")

    def refused(name, call, *mentions):
        try:
            call()
        except ops.KernelError as error:
            print(f"{name}: {type(error).__name__}: {error}")
            if all(word in str(error) for word in mentions):
                return
        expect.failures.append(f"{name}: expected a KernelError mentioning {mentions}")

    def dequantized(x, x_scale):  # x as the int8 kernels see it: static u8 (zero point 128) or per-token
        if x_scale is not None:
            return torch.fake_quantize_per_tensor_affine(x, x_scale, 128, 0, 255)
        s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        return torch.round(x / s).clamp(-127, 127) * s

    for m, k, n in ((1, 8, 3), (2, 32, 8), (5, 100, 7), (40, 36, 33)):
        w = torch.randn(n, k, generator=gen) * (torch.rand(n, k // 4, 4, generator=gen).argsort(-1) < 2).reshape(n, k)
        values, indices = ops.pack_sparse24(w)
        x, bias = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
        close(f"sparse24 {m}x{k}x{n}", ops.sparse24_linear(x, values, indices, bias, None, None, 0), x @ w.T + bias)
        codes = torch.randint(-64, 65, (n, k), dtype=torch.int8, generator=gen)
        scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
        for bits, x_scale in ((7, 0.05), (8, None)):
            y = ops.int8_linear(x, codes, scale, ops.int8_weight_sum(codes), bias, x_scale, 128, bits)
            close(f"int8_linear {m}x{k}x{n}", y, dequantized(x, x_scale) @ (codes.float() * scale[:, None]).T + bias)
        refused(f"sparse24 {m}x{k}x{n} short indices", lambda x=x, v=values, i=indices: ops.sparse24_linear(
            x, v, i[:, :-1], None, None, None, 0), "indices must have shape")
        refused(f"sparse24 {m}x{k}x{n} long bias", lambda x=x, v=values, i=indices, n=n: ops.sparse24_linear(
            x, v, i, torch.ones(n + 1), None, None, 0), "bias")
    for b, c, hw, o, kernel, groups in ((1, 4, 6, 4, 3, 2), (2, 3, 5, 6, 3, 3), (1, 32, 4, 8, 1, 1)):
        codes = torch.randint(-64, 65, (o, c // groups, kernel, kernel), dtype=torch.int8, generator=gen)
        x = torch.randn(b, c, hw, hw, generator=gen)
        y = ops.int8_conv2d(x, ops.pack_int8_conv2d_weight(codes), torch.full((o,), 0.01), ops.int8_weight_sum(codes),
                            None, [1, 1], [1, 1], [1, 1], groups, 0.05, 128, 7)
        close(f"int8_conv2d {b, c, hw, o, kernel, groups}", y, torch.nn.functional.conv2d(
            dequantized(x, 0.05), codes.float() * 0.01, None, 1, 1, 1, groups))
        refused(f"int8_conv2d {b, c, hw, o, kernel, groups} 3-D weight", lambda x=x, w=codes, o=o, g=groups: ops.int8_conv2d(
            x, w[0], torch.ones(o), ops.int8_weight_sum(w), None, [1, 1], [1, 1], [1, 1], g, 0.05, 0, 8),
            "weight must be 4-D")


def main(library: str, mode: str) -> int:
    if mode == "ops":
        expect = Expect(None)
        through_the_ops(library, expect)
        return report(expect)
    lib = abi.declare(ctypes.CDLL(library))
    if mode == "lie":
        lie(lib)
        return 1
    expect = Expect(lib)
    if mode == "refuse":
        for run in (refuse_sparse24, refuse_int8_linear, refuse_int8_linear_packed, refuse_int8_conv2d,
                    refuse_conv2d_pack, refuse_row_stats, refuse_int8_bmm):
            run(lib, expect)
    else:
        for path in ("avx2", "portable"):
            os.environ["EDGE_KERNELS_PORTABLE"] = "1" if path == "portable" else "0"
            for run in (valid_sparse24, valid_int8_linear, valid_int8_linear_packed, valid_int8_conv2d,
                        valid_conv2d_pack, valid_row_stats, valid_int8_bmm):
                run(lib, expect)
    return report(expect)


def report(expect: Expect) -> int:
    for failure in expect.failures:
        print("FAILED", failure)
    print("ALL OK" if not expect.failures else f"{len(expect.failures)} FAILED", flush=True)
    return 1 if expect.failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
