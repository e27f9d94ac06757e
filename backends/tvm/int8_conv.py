"""int8 convolution in TVM on AVX2 CPUs: u8 x s8 dot products of 4 channels (`vpmaddubsw`, `vpmaddwd`).

A quantized conv2d (`edge::int8_conv2d`: static per-tensor u8 activations with a zero point, 7-bit
per-channel symmetric weights) becomes one PrimFunc, float NCHW in and out like the C++ kernel it
replaces:

- the input is quantized as torch rounds and written in blocked channels (NCHW16c; a stem with fewer
  than 16 channels in one block of a multiple of 4), padded with the zero point's code;
- the weights are packed once (a constant-folded layout transform) as OIHW4i16o4i: 4 input
  channels x 8 output channels are one 32-byte vector;
- the convolution accumulates in int32 over a register tile of `rows x cols` pixels x 16 output
  channels: per 4 input channels one broadcast of 4 input codes, two `vpmaddubsw` (u8·s8 pairs summed
  in int16: exact, since |w| <= 64 makes 2·255·64 < 2^15) and two `vpmaddwd` with ones (int32);
- the dequantization (acc − zp·Σw) · s_x · s_w + bias writes NCHW float.

On the 3x3 convs of ResNet-18's stages at batch 1 it beats our fp32 schedule (`conv_nchwc`) and the
C++ int8 kernel called from Relax (im2col, transposes and its OpenMP threads beside TVM's pool);
`python -m edgepasses.bench.tvm_bench --int8` times whole models.
"""

from tvm import s_tir, te, tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from edgepasses.quant import cpu_flags

OUT_BLOCK = 16          # output channels per block: two 8-lane int32 vectors
DOT = 4                 # input channels per u8 x s8 dot product
INTRINSIC = "edgepasses_dot_8x4_u8i8i32_avx2"
FUNC_NAME = "int8_conv2d"   # the PrimFuncs' names in the Relax module (counted in `build`'s info)


@T.prim_func(s_tir=True)
def _dot_desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((8, 4), "int8", offset_factor=1),
              c: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:4], b[0:8, 0:4])
        T.writes(c[0:8])
        for i in T.serial(0, 8):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_avx2(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((8, 4), "int8", offset_factor=1),
              c: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:4], b[0:8, 0:4])
        T.writes(c[0:8])
        four_codes = T.reinterpret(T.broadcast(T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 8),
                                   dtype="uint8x32")
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), four_codes,
                                        b.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")


TensorIntrin.register(INTRINSIC, _dot_desc, _dot_avx2, override=True)


def in_block(channels: int) -> int | None:
    """Input channels per block: 16, or all of them rounded up to 4 when fewer; None otherwise."""
    if channels % OUT_BLOCK == 0:
        return OUT_BLOCK
    return -(-channels // DOT) * DOT if channels < OUT_BLOCK else None


def supported(in_channels: int, out_channels: int, groups: int, dilation, weight_bits: int) -> bool:
    """An AVX2 CPU and 7-bit weights (what `QuantCaps.saturating_int8` asks for on one without VNNI),
    dense, undilated, whole channel blocks."""
    return (weight_bits == 7 and "avx2" in cpu_flags() and groups == 1 and tuple(dilation) == (1, 1)
            and out_channels % OUT_BLOCK == 0 and in_block(in_channels) is not None)


def packing(in_channels: int):
    """Index map of the weight codes [O, C, KH, KW] → [O/16, C/blk, KH, KW, blk/4, 16, 4] (for
    `relax.op.layout_transform`, whose zero padding fills the block of a stem with fewer channels)."""
    block = in_block(in_channels)
    return lambda o, i, h, w: (o // OUT_BLOCK, i // block, h, w, i % block // DOT, o % OUT_BLOCK, i % DOT)


def compute(x_shape, packed_shape, stride, padding, x_scale: float, zero_point: int, has_bias: bool):
    """The PrimFunc (x f32 NCHW, packed weight, weight scale, weight sum, [bias]) → out f32 NCHW."""
    n, channels, height, width = x_shape
    out_chunks, in_chunks, kh, kw, dots, _, _ = packed_shape
    block, (sh, sw), (ph, pw) = dots * DOT, stride, padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    x = te.placeholder(x_shape, "float32", name="x")
    weight = te.placeholder(packed_shape, "int8", name="weight")
    scale = te.placeholder((out_chunks * OUT_BLOCK,), "float32", name="weight_scale")
    weight_sum = te.placeholder((out_chunks * OUT_BLOCK,), "int32", name="weight_sum")
    bias = te.placeholder((out_chunks * OUT_BLOCK,), "float32", name="bias") if has_bias else None
    inverse, zp = tirx.const(1.0 / x_scale, "float32"), tirx.const(float(zero_point), "float32")

    def code(value):  # torch's quantize_per_tensor: float32 x·(1/s), round half to even, + zp, clamp
        return tirx.max(tirx.min(tirx.round(value * inverse) + zp, 255.0), 0.0).astype("uint8")

    def padded_code(b, c, h, w, lane):
        channel = c * block + lane
        inside = tirx.all(h >= ph, h < height + ph, w >= pw, w < width + pw, channel < channels)
        return tirx.if_then_else(inside, code(x[b, channel, h - ph, w - pw]), tirx.const(zero_point, "uint8"))

    data = te.compute((n, in_chunks, height + 2 * ph, width + 2 * pw, block), padded_code, name="data_pad")
    ic, rh, rw = te.reduce_axis((0, in_chunks), "ic"), te.reduce_axis((0, kh), "kh"), te.reduce_axis((0, kw), "kw")
    dot, lane = te.reduce_axis((0, dots), "dot"), te.reduce_axis((0, DOT), "lane")
    acc = te.compute((n, out_chunks, out_h, out_w, OUT_BLOCK), lambda b, o, h, w, ob: te.sum(
        data[b, ic, h * sh + rh, w * sw + rw, dot * DOT + lane].astype("int32")
        * weight[o, ic, rh, rw, dot, ob, lane].astype("int32"), axis=[ic, rh, rw, dot, lane]), name="int8_conv")

    def dequant(b, o, h, w):
        centred = acc[b, o // OUT_BLOCK, h, w, o % OUT_BLOCK] - zero_point * weight_sum[o]
        value = centred.astype("float32") * tirx.const(x_scale, "float32") * scale[o]
        return value + bias[o] if has_bias else value

    out = te.compute((n, out_chunks * OUT_BLOCK, out_h, out_w), dequant, name="dequant")
    return te.create_prim_func([x, weight, scale, weight_sum] + ([bias] if has_bias else []) + [out])


def default_tile(out_h: int, out_w: int) -> tuple[int, int]:
    """2x2 pixels where they divide (8 accumulators, which timed best at ResNet-18's stage sizes), else 1 pixel."""
    return (2 if out_h % 2 == 0 else 1), (2 if out_w % 2 == 0 else 1)


def schedule(func, tile: tuple[int, int] | None = None):
    """`func` (from `compute`) scheduled: parallel over channel blocks x row tiles, the register tile's
    dot products tensorized, the dequantization per item, quantize-and-pad a parallel vectorized loop."""
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("int8_conv")
    n, oc, oh, ow, ob, ic, kh, kw, dot, lane = sch.get_loops(conv)
    rows, cols = tile or default_tile(int(sch.get(oh).extent), int(sch.get(ow).extent))
    oh_outer, oh_inner = sch.split(oh, [None, rows])
    ow_outer, ow_inner = sch.split(ow, [None, cols])
    ob_outer, ob_inner = sch.split(ob, [None, 8])
    item = sch.fuse(n, oc, oh_outer)
    sch.parallel(item)
    sch.reorder(item, ow_outer, ic, kh, kw, dot, oh_inner, ow_inner, ob_outer, ob_inner, lane)
    # Dequantize each item's rows when they are done: the int32 sums then need a buffer of those rows
    # only (a full one is megabytes of fresh pages per call, which made the stem several times slower).
    dequant = sch.get_sblock("dequant")
    sch.reverse_compute_at(dequant, item)  # before decompose_reduction, which adds a producer
    sch.vectorize(sch.get_loops(dequant)[-1])
    init = sch.decompose_reduction(conv, ic)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ob_inner, INTRINSIC)
    for loop in (dot, oh_inner, ow_inner, ob_outer):
        sch.unroll(loop)
    pad = sch.get_loops(sch.get_sblock("data_pad"))
    sch.parallel(sch.fuse(*pad[:3]))  # over rows too: a stem has one channel block
    sch.vectorize(pad[-1])
    # Opaque to Relax's fusion, which would merge the ops around it into a new, unscheduled function.
    func = sch.mod["main"].without_attr("global_symbol")  # the module it joins names it
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
