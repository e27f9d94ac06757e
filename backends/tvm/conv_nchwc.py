"""Fast fp32 convolution in TVM on CPUs: blocked channels and a register-tiled direct schedule.

MetaSchedule's generic CPU rules do not find fast convolutions in a budget a user can wait for:
measured on 2 Zen 3 cores, a 64→64 3x3 conv at 56x56 ran 5.0 ms after 64 trials and 4.0 ms after
256 (eight minutes), beside 2.3 ms for eager PyTorch; the same in NHWC or NCHW8c layouts was no
better. So convolutions get the schedule TVM's former TOPI x86 `conv2d_NCHWc` had (Liu et al.,
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

log = logging.getLogger("edgepasses")

CHANNEL_BLOCK = 16      # output channels per block: two 8-lane AVX2 vectors
ACCUMULATORS = 6        # tile pixels (x 2 vectors each): 12 of the 16 ymm registers, the rest for operands
CONV_BLOCK = "conv2d_NCHWc"
LAYOUT = f"NCHW{CHANNEL_BLOCK}c"  # part of the tuning records' key: the ops MetaSchedule sees depend on it


def to_nchwc(mod, target):
    """`mod` with its float conv2d in the blocked layout, legalized to TOPI's `conv2d_NCHWc`."""
    import tvm
    from tvm import relax

    block = CHANNEL_BLOCK
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [LAYOUT, f"OIHW{block}i{block}o"]})(mod)
    with target:  # TOPI's conv2d_NCHWc asks for the target
        return relax.transform.LegalizeOps({"relax.nn.conv2d": _legalize_blocked_conv})(mod)


def _legalize_blocked_conv(bb, call):
    from tvm import topi

    attrs = call.attrs
    if attrs.data_layout == "NCHW" or attrs.out_dtype not in ("", "float32"):
        return call  # not blocked: the default legalization (LegalizeOps in `build.prepare`)
    return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], attrs.strides, attrs.padding,
                      attrs.dilation, attrs.data_layout, attrs.out_layout, "float32",
                      primfunc_name_hint=CONV_BLOCK)


def is_blocked_conv(func) -> bool:
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(CONV_BLOCK)
        return True
    except Exception:  # noqa: BLE001 - no such block: not ours
        return False


def schedule(func, tile: tuple[int, int]):
    """The register-tiled schedule of a fused `conv2d_NCHWc` PrimFunc (padding, conv, epilogue)."""
    from tvm import s_tir

    rows, cols = tile
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock(CONV_BLOCK)
    epilogue = _consumer_chain(sch, conv)
    padding = sch.get_producers(conv)  # before decompose_reduction makes the init block a producer too
    for block in epilogue[:-1]:  # bias, residual add, relu: one expression in the last block
        sch.compute_inline(block)
    n, oc_chunk, oh, ow, oc_block, ic, kh, kw = sch.get_loops(conv)
    in_block = int(sch.get(conv).reads[0].source.shape[-1])  # the padded input's channel block
    oh_outer, oh_inner = sch.split(oh, [None, rows])
    sch.reorder(oh_outer, ow, oh_inner)
    # Parallel first: once the reduction is split from its init, `parallel` refuses the loop.
    sch.parallel(sch.fuse(n, oc_chunk, oh_outer))
    ow_outer, ow_inner = sch.split(ow, [None, cols])
    ic_outer, ic_inner = sch.split(ic, [None, in_block])
    sch.reorder(ow_outer, ic_outer, kh, kw, ic_inner, oh_inner, ow_inner, oc_block)
    if epilogue:
        sch.reverse_compute_at(epilogue[-1], ow_outer)
        sch.vectorize(sch.get_loops(epilogue[-1])[-1])
    sch.vectorize(oc_block)
    for loop in (ic_inner, oh_inner, ow_inner):  # kw stays a loop: unrolled, LLVM spills the broadcasts
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


def tile_candidates(out_h: int, out_w: int) -> list[tuple[int, int]]:
    """Register tiles within the budget: rows dividing the height; columns need not divide the
    width (the last tile of a row is cut short), which matters for 7- and 14-wide maps."""
    tiles = [(rows, cols) for rows in (1, 2, 3) for cols in range(2, ACCUMULATORS + 1)
             if rows * cols <= ACCUMULATORS and out_h % rows == 0 and cols <= out_w]
    return tiles or [(1, 1)]


def default_tile(out_h: int, out_w: int) -> tuple[int, int]:
    """Without measurements: columns that divide the width (no cut-short tiles), then the most pixels."""
    return max(tile_candidates(out_h, out_w), key=lambda t: (out_w % t[1] == 0, t[0] * t[1], t[1]))


def measure(func, tile: tuple[int, int], target, repeat: int = 5) -> float:
    """Median seconds of one run of `func` scheduled with `tile`, on random inputs."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": schedule(func, tile).mod["main"].with_attr("global_symbol", "main")}),
                      target=target)
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
    import tvm

    import tvm_ffi

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
                     1e3 * min(timings.values()), {f"{r}x{c}": round(1e3 * s, 2) for (r, c), s in timings.items()})
        tile = tuple(known.get(key) or default_tile(*_output_hw(func)))
        scheduled[gvar] = schedule(func, tile).mod["main"].with_attr("tirx.is_scheduled", True)
    if measured and records:
        records.parent.mkdir(parents=True, exist_ok=True)
        records.write_text(json.dumps(known, indent=1))
    for gvar, func in scheduled.items():
        mod[gvar] = func
    return mod, {"convs": len(scheduled), "measured": measured}
