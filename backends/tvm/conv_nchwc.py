"""Fast fp32 convolution in TVM on CPUs: blocked channels and a register-tiled direct schedule.

MetaSchedule's generic CPU rules do not find fast convolutions in a budget a user can wait for:
after minutes of tuning, a ResNet-18 3x3 conv stays well behind eager PyTorch, in NCHW, NHWC or
NCHW8c alike. So convolutions get the schedule TVM's former TOPI x86 `conv2d_NCHWc` had (Liu et al.,
"Optimizing CNN Model Inference on CPUs", 2019), written with `tvm.s_tir.Schedule`:

- channels blocked by `CHANNEL_BLOCK` (NCHW16c activations, OIHW16i16o weights, laid out by
  Relax's `ConvertLayout`, which also carries the blocked layout through the elementwise ops
  between convolutions); convolutions whose channels do not divide (a 3-channel stem, depthwise)
  keep NCHW and MetaSchedule;
- per output row, a register tile of `rows x cols` output pixels by the 16 output channels of a
  block (2 AVX2 vectors each) accumulates over input channels, kernel rows and columns: one
  broadcast input value feeds two FMAs, one weight vector feeds rows x cols;
- the bias / residual add / ReLU epilogue is computed per tile while it is in registers;
- rows of output channel blocks run in parallel.

The tile is the only free choice. `choose_tiles` measures the candidates of every distinct
convolution on this machine (a second each) and keeps the choice in a JSON file beside the
tuning records; without measuring, `default_tile` picks by the register budget.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, topi
from tvm.relax.expr_functor import PyExprMutator, mutator

log = logging.getLogger("edgepasses")

CHANNEL_BLOCK = 16      # output channels per block: two 8-lane AVX2 vectors
ACCUMULATORS = 6        # tile pixels (x 2 vectors each): 12 of the 16 ymm registers, the rest for operands
SMALL_MAP = 14 * 14     # output pixels up to which the weights-outer schedule is a candidate
CONV_BLOCK = "conv2d_NCHWc"
LAYOUT = f"NCHW{CHANNEL_BLOCK}c"


def to_nchwc(mod, target):
    """`mod` with its float conv2d in the blocked layout, legalized to TOPI's `conv2d_NCHWc`."""
    block = CHANNEL_BLOCK
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [LAYOUT, f"OIHW{block}i{block}o"]})(mod)
    mod = _NarrowInputConvs(mod).transform()  # after: ConvertLayout fails on their 5-d input layout
    with target:  # TOPI's conv2d_NCHWc asks for the target
        return relax.transform.LegalizeOps({"relax.nn.conv2d": _legalize_blocked_conv})(mod)


@mutator
class _NarrowInputConvs(PyExprMutator):
    """Convolutions with a few input channels that do not fill a block (a 3-channel stem) but blocked
    outputs take their whole input as one block (NCHW3c) and write NCHW16c, which `ConvertLayout` then
    carries on. Otherwise ConvertLayout leaves them in NCHW, to MetaSchedule, which leaves a stem
    among the slowest ops of a tuned model."""

    def __init__(self, mod):
        super().__init__(mod)
        self.mod = mod

    def transform(self):
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", None) != "relax.nn.conv2d" or not _narrow_input(call):
            return call
        attrs, in_ch, block = call.attrs, int(call.args[1].ty.shape[1]), CHANNEL_BLOCK
        data = self.builder_.emit(relax.op.layout_transform(
            call.args[0], lambda n, c, h, w: (n, c // in_ch, h, w, c % in_ch)))
        weight = self.builder_.emit(relax.op.layout_transform(
            call.args[1], lambda o, i, h, w: (o // block, i // in_ch, h, w, i % in_ch, o % block)))
        out = self.builder_.emit(relax.op.nn.conv2d(
            data, weight, attrs.strides, attrs.padding, attrs.dilation, 1, f"NCHW{in_ch}c",
            f"OIHW{in_ch}i{block}o", LAYOUT, attrs.out_dtype))
        return relax.op.layout_transform(out, lambda n, c, h, w, b: (n, c * block + b, h, w))


def _narrow_input(call) -> bool:
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, int(attrs.groups), call.args[0].ty.dtype) != \
            ("NCHW", "OIHW", 1, "float32"):
        return False
    out_ch, in_ch = [int(d) for d in call.args[1].ty.shape][:2]
    return out_ch % CHANNEL_BLOCK == 0 and in_ch < CHANNEL_BLOCK


def _legalize_blocked_conv(bb, call):
    attrs = call.attrs
    if attrs.data_layout == "NCHW" or attrs.out_dtype not in ("", "float32"):
        return call  # not blocked: the default legalization (LegalizeOps in `build.prepare`)
    return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], attrs.strides, attrs.padding,
                      attrs.dilation, attrs.data_layout, attrs.out_layout, "float32",
                      primfunc_name_hint=CONV_BLOCK)


def is_blocked_conv(func) -> bool:
    try:
        s_tir.Schedule(func).get_sblock(CONV_BLOCK)
        return True
    except Exception:  # noqa: BLE001 - no such block: not ours
        return False


def schedule(func, tile: tuple[int, int, int]):
    """The schedule of a fused `conv2d_NCHWc` PrimFunc (padding, conv, epilogue) for `tile`:
    (rows, columns, weights_outer). A register tile is `columns` pixels (by `rows` rows unless
    `weights_outer`) of one channel block. With `weights_outer`, each parallel item takes `rows` whole
    rows and the loop over input channels and taps goes outside the pixel loops: every weight is
    loaded once per item instead of once per tile, and the sums live in L1. That is what deep layers
    on small maps need (512 channels at 7x7: 295 KB of weights per block, 49 pixels to use them on)."""
    rows, cols, weights_outer = tile
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock(CONV_BLOCK)
    epilogue = _consumer_chain(sch, conv)
    padding = sch.get_producers(conv)  # before decompose_reduction makes the init block a producer too
    for block in epilogue[:-1]:  # bias, residual add, relu: one expression in the last block
        sch.compute_inline(block)
    if not epilogue:  # accumulate in a tile-sized buffer (registers) all the same, then store it
        epilogue = [sch.cache_write(conv, 0, "global")]
    n, oc_chunk, oh, ow, oc_block, ic, kh, kw = sch.get_loops(conv)
    in_block = int(sch.get(conv).reads[0].source.shape[-1])  # the padded input's channel block
    oh_outer, oh_inner = sch.split(oh, [None, rows])
    sch.reorder(oh_outer, ow, oh_inner)
    # Parallel first: once the reduction is split from its init, `parallel` refuses the loop.
    item = sch.fuse(n, oc_chunk, oh_outer)
    sch.parallel(item)
    ow_outer, ow_inner = sch.split(ow, [None, cols])
    ic_outer, ic_inner = sch.split(ic, [None, in_block])
    if weights_outer:
        sch.reorder(ic_outer, kh, kw, oh_inner, ow_outer, ic_inner, ow_inner, oc_block)
        sch.reverse_compute_at(epilogue[-1], item)
        unrolled = (ic_inner, ow_inner)
    else:
        sch.reorder(ow_outer, ic_outer, kh, kw, ic_inner, oh_inner, ow_inner, oc_block)
        sch.reverse_compute_at(epilogue[-1], ow_outer)
        unrolled = (ic_inner, oh_inner, ow_inner)
    sch.vectorize(sch.get_loops(epilogue[-1])[-1])
    sch.vectorize(oc_block)
    for loop in unrolled:  # kw stays a loop: unrolled, LLVM spills the broadcasts
        sch.unroll(loop)
    init = sch.decompose_reduction(conv, ic_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    for pad in padding:
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
    return sch


def _consumer_chain(sch, block) -> list:
    chain = []
    while consumers := sch.get_consumers(block):
        block = consumers[0]
        chain.append(block)
    return chain


def _output_hw(func) -> tuple[int, int]:
    shape = func.params[-1].shape  # the output buffer: N, C/16, H, W, 16
    return int(shape[2]), int(shape[3])


def tile_candidates(out_h: int, out_w: int) -> list[tuple[int, int, int]]:
    """Register tiles within the budget: rows dividing the height; columns need not divide the
    width (the last tile of a row is cut short), which matters for 7- and 14-wide maps. On small
    maps also the weights-outer variants (see `schedule`), one item per channel block and height."""
    tiles = [(rows, cols, 0) for rows in (1, 2, 3) for cols in range(2, ACCUMULATORS + 1)
             if rows * cols <= ACCUMULATORS and out_h % rows == 0 and cols <= out_w]
    if out_h * out_w <= SMALL_MAP:
        tiles += [(out_h, cols, 1) for cols in range(2, min(ACCUMULATORS, out_w) + 1)]
    return tiles or [(1, 1, 0)]


def default_tile(out_h: int, out_w: int) -> tuple[int, int, int]:
    """Without measurements: a register tile whose columns divide the width (no cut-short tiles),
    then the most pixels."""
    registers = [t for t in tile_candidates(out_h, out_w) if not t[2]]
    return max(registers, key=lambda t: (out_w % t[1] == 0, t[0] * t[1], t[1]))


def compile_func(func, target):
    """One PrimFunc built on its own (as `main`), to time or to run it."""
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def measure(func, tile: tuple[int, int, int], target, repeat: int = 5) -> float:
    """Median seconds of one run of `func` scheduled with `tile`, on random inputs."""
    lib = compile_func(schedule(func, tile).mod["main"], target)
    device = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.shape]).astype(p.dtype), device)
            for p in func.params]
    timer = lib.mod.time_evaluator("main", device, number=1, repeat=repeat, min_repeat_ms=20)
    return float(np.median(timer(*args).results))


def choose_tiles(mod, target, records: Path | None, measure_new: bool) -> tuple[object, dict]:
    """`mod` with every blocked convolution scheduled; (mod, {"convs", "measured"}).

    Tiles come from `records` (JSON: structural hash -> tile), else from measuring the candidates
    when `measure_new`, else `default_tile`; measured choices are written back to `records`."""
    known = json.loads(records.read_text()) if records and records.exists() else {}
    scheduled, measured = {}, 0
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not is_blocked_conv(func):
            continue
        key = str(tvm_ffi.structural_hash(func))
        if key not in known and measure_new:
            timings = {tile: measure(func, tile, target) for tile in tile_candidates(*_output_hw(func))}
            known[key] = list(min(timings, key=timings.get))
            measured += 1
            log.info("target 'tvm': %s: tile %s (%.2f ms; candidates %s)", gvar.name_hint, known[key],
                     1e3 * min(timings.values()),
                     {"x".join(map(str, t)): round(1e3 * s, 2) for t, s in timings.items()})
        tile = tuple(known.get(key) or default_tile(*_output_hw(func)))
        scheduled[gvar] = schedule(func, tile).mod["main"].with_attr("tirx.is_scheduled", True)
    if measured and records:
        records.parent.mkdir(parents=True, exist_ok=True)
        records.write_text(json.dumps(known, indent=1))
    for gvar, func in scheduled.items():
        mod[gvar] = func
    return mod, {"convs": len(scheduled), "measured": measured}
