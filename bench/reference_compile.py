"""The reference target interpreted op by op vs compiled by Inductor around our kernels, beside OpenVINO.

    python -m edgepasses.bench.reference_compile [--rounds N] [--warmup N] [--only minilm,resnet18,mobilenet_v2]

(minilm) the pretrained all-MiniLM-L6-v2, batch 8 x 64 tokens, `quantize` on the reference target with
    `compile` off and on, beside eager fp32 and OpenVINO fp32; mean cosine of each program's embeddings
    to eager fp32's on the test split, and how far the two reference programs' embeddings are apart;
(resnet18, mobilenet_v2) torchvision ResNet-18 and MobileNetV2 (random weights), batch 1, 224x224,
    `fold_bn,quantize` on reference both ways, beside eager fp32 and two OpenVINO int8 programs: the same
    pipeline compressed for and lowered to target openvino, and NNCF's int8 of the float model (the same
    calibration batches); SQNR of each program's logits to eager fp32's. Inductor's path must not make a
    CNN slower than the interpreted reference target.
Both reference programs of a model are lowered from the same compressed graph; latency is the median with
min-max over interleaved rounds (`timing.measure_side_by_side`); `build s` runs from the float model to
the ready program (compression with its calibration, lowering, Inductor), and the compile-time line
splits it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.utils._pytree

import edgepasses
from edgepasses.backends.reference import ReferenceTarget
from edgepasses.measure.timing import Timing, measure_side_by_side

from .runner import markdown_table
from .sections import run_sections

T = TypeVar("T")

CALIBRATION_BATCHES = 10
CNNS = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNetV2"}
CNN_PIPELINE = "fold_bn,quantize"
EAGER = "eager fp32"
INTERPRETED = "int8 reference, interpreted"
COMPILED = "int8 reference, Inductor-compiled"
OPENVINO_EDGE = f"int8 OpenVINO (edge `{CNN_PIPELINE}`)"
OPENVINO_NNCF = "int8 OpenVINO (NNCF)"


def fx_graph_cache_counts() -> Counter[str]:
    """Inductor's FX graph cache lookups so far (hit, miss, bypass): a compile time means little without
    knowing whether its C++ was generated and compiled, or read back from the cache."""
    from torch._dynamo.utils import counters

    return Counter({key.removeprefix("fxgraph_cache_"): n for key, n in counters["inductor"].items()
                    if key.startswith("fxgraph_cache_")})


def cache_outcome(before: Counter[str], after: Counter[str]) -> str:
    """The lookups between two `fx_graph_cache_counts`, in words ("1 miss")."""
    return ", ".join(f"{n} {kind}" for kind, n in (after - before).items()) or "no lookup"


def warm_kernels() -> None:
    """Our kernel library, built once per machine on first use: built before anything is timed, so that
    no lowering's seconds hold its one-time compile."""
    from edgepasses.kernels.build import KernelBuildError, library

    try:
        library()
    except KernelBuildError:
        pass  # each program that needs it fails with this error in its own place, as without the warm-up


def _timed(build: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


def _compressed(model: torch.nn.Module, example: tuple, pipeline: str, calibration: list[tuple],
                target: str) -> tuple[torch.fx.GraphModule, float]:
    """The pipeline's graph prepared for `target` (its integer forms differ between targets), and its seconds."""
    return _timed(lambda: edgepasses.compress(model, example, pipeline, calibration=calibration, target=target))


@dataclass(frozen=True)
class ReferencePrograms:
    """The interpreted and the compiled program of one compressed graph, with what lowering them took."""
    programs: dict[str, Callable]  # INTERPRETED, COMPILED
    lower_s: dict[str, float]      # by program: the kernel rewrite, and for COMPILED Inductor too
    inductor_s: float              # Lowering.compile_s (0: Inductor failed and the graph runs interpreted)
    inductor_cache: str            # what Inductor's FX graph cache did ("1 miss")


def _lower_both_ways(gm: torch.fx.GraphModule, example: tuple) -> ReferencePrograms:
    warm_kernels()
    interpreted, interpreted_s = _timed(lambda: ReferenceTarget(compile=False).lower(gm, example))
    before = fx_graph_cache_counts()
    compiled, compiled_s = _timed(lambda: ReferenceTarget(compile=True).lower(gm, example))
    return ReferencePrograms({INTERPRETED: interpreted, COMPILED: compiled},
                             {INTERPRETED: interpreted_s, COMPILED: compiled_s}, compiled.edge_lowering.compile_s,
                             cache_outcome(before, fx_graph_cache_counts()))


def _table(timings: dict[str, Timing], columns: dict[str, dict[str, str]]) -> list[str]:
    """Latency rows (the first program is the baseline) and `columns`: header -> cell of each program."""
    base = next(iter(timings.values())).median_ms
    rows = [[name, f"{t.median_ms:.1f} ({t.min_ms:.1f}-{t.max_ms:.1f})", f"{base / t.median_ms:.2f}x",
             *(cells.get(name, "-") for cells in columns.values())] for name, t in timings.items()]
    return markdown_table(["program", "median ms (min-max)", "vs eager fp32", *columns], rows)


def _speedups(timings: dict[str, Timing], of: str, over: list[str]) -> str:
    """How many times faster `of` runs than each of `over` (median over median)."""
    return f"{of}: " + ", ".join(f"{timings[name].median_ms / timings[of].median_ms:.2f}x the speed of {name}"
                                 for name in over if name in timings) + "."


def _build_cells(seconds: dict[str, float]) -> dict[str, str]:
    return {name: f"{s:.1f}" for name, s in seconds.items()}


def _compile_line(pipeline: str, compress_s: float, references: ReferencePrograms) -> str:
    lower_s = references.lower_s
    return (f"Compile time of the reference programs: `{pipeline}` (calibration {CALIBRATION_BATCHES} batches) "
            f"{compress_s:.1f} s; then interpreted: rewrite {lower_s[INTERPRETED]:.1f} s; compiled: rewrite + "
            f"Inductor {lower_s[COMPILED]:.1f} s, of which Inductor {references.inductor_s:.1f} s (FX graph cache: "
            f"{references.inductor_cache}).")


def _tensor(output: Any) -> torch.Tensor:
    """A program's one output tensor (a graph may wrap it in a tuple)."""
    (tensor,) = torch.utils._pytree.tree_leaves(output)
    return tensor


def _calls(programs: dict[str, Callable], example: tuple) -> dict[str, Callable[[], Any]]:
    return {name: (lambda fn=fn: fn(*example)) for name, fn in programs.items()}


def bench_minilm(warmup: int, rounds: int) -> list[str]:
    from edgepasses.measure.peers import openvino_direct
    from edgepasses.zoo.sentence_embeddings import (BATCH_SIZE, SEQ_LEN, embed, embedding_quality, load_encoder,
                                                    sentence_splits)

    model = load_encoder()
    splits = sentence_splits(calibration=CALIBRATION_BATCHES)
    example = splits.test[0]
    gm, compress_s = _compressed(model, example, "quantize", splits.calibration, "reference")
    references = _lower_both_ways(gm, example)
    openvino, openvino_s = _timed(lambda: openvino_direct(model, example))
    programs = {EAGER: model, "OpenVINO fp32": openvino, **references.programs}
    with torch.no_grad():
        embeddings = {name: embed(fn, splits.test) for name, fn in programs.items()}
    reference = embeddings[EAGER]
    cosine = {name: f"{embedding_quality(reference, e).mean_cosine:.4f}" for name, e in embeddings.items()}
    apart = (embeddings[INTERPRETED] - embeddings[COMPILED]).abs().max().item()
    between = embedding_quality(embeddings[INTERPRETED], embeddings[COMPILED])
    timings = measure_side_by_side(_calls(programs, example), warmup, rounds, settle=1)
    build_s = {"OpenVINO fp32": openvino_s, **{name: compress_s + s for name, s in references.lower_s.items()}}
    return [f"## (minilm) all-MiniLM-L6-v2 (pretrained), batch {BATCH_SIZE} x {SEQ_LEN} tokens, `quantize`", "",
            *_table(timings, {f"mean cosine to fp32 ({len(splits.test) * BATCH_SIZE} test sentences)": cosine,
                              "build s": _build_cells(build_s)}), "",
            _speedups(timings, COMPILED, [INTERPRETED, "OpenVINO fp32"]),
            f"Interpreted vs compiled embeddings: cosine mean {between.mean_cosine:.6f}, min {between.min_cosine:.6f}, "
            f"max abs difference {apart:.2e}, nearest-neighbour agreement {between.neighbour_agreement:.1%}.",
            _compile_line("quantize", compress_s, references)]


def _openvino_int8(model: torch.nn.Module, example: tuple, calibration: list[tuple]) -> tuple[dict, dict]:
    """OpenVINO's int8 of a CNN two ways (our pipeline on target openvino; NNCF), and their build seconds."""
    from edgepasses.backends import get_target
    from edgepasses.measure.peers import nncf_int8

    gm, compress_s = _compressed(model, example, CNN_PIPELINE, calibration, "openvino")
    edge, lower_s = _timed(lambda: get_target("openvino").lower(gm, example))
    nncf, nncf_s = _timed(lambda: nncf_int8(model, example, calibration))
    return {OPENVINO_EDGE: edge, OPENVINO_NNCF: nncf}, {OPENVINO_EDGE: compress_s + lower_s, OPENVINO_NNCF: nncf_s}


def bench_cnn(name: str, warmup: int, rounds: int) -> list[str]:
    from edgepasses.analysis.sqnr import sqnr_db
    from edgepasses.zoo import get_model

    zoo = get_model(name, 1)
    example, calibration = zoo.example_inputs, zoo.calibration(CALIBRATION_BATCHES)
    gm, compress_s = _compressed(zoo.module, example, CNN_PIPELINE, calibration, "reference")
    references = _lower_both_ways(gm, example)
    openvino, openvino_s = _openvino_int8(zoo.module, example, calibration)
    programs = {EAGER: zoo.module, **references.programs, **openvino}
    with torch.no_grad():
        logits = {program: _tensor(fn(*example)) for program, fn in programs.items()}
    sqnr = {program: f"{float(sqnr_db(logits[EAGER], out)):.1f}" for program, out in logits.items() if program != EAGER}
    apart = (logits[INTERPRETED] - logits[COMPILED]).abs().max().item()
    timings = measure_side_by_side(_calls(programs, example), warmup, rounds, settle=1)
    build_s = {**{program: compress_s + s for program, s in references.lower_s.items()}, **openvino_s}
    shape = "x".join(map(str, example[0].shape))
    return [f"## ({name}) torchvision {CNNS[name]} (random weights), input {shape}, `{CNN_PIPELINE}`", "",
            *_table(timings, {"SQNR dB to fp32": sqnr, "build s": _build_cells(build_s)}), "",
            _speedups(timings, COMPILED, [INTERPRETED, OPENVINO_EDGE, OPENVINO_NNCF]),
            f"Interpreted vs compiled logits: max abs difference {apart:.2e}.",
            _compile_line(CNN_PIPELINE, compress_s, references)]


def main(argv: list[str] | None = None) -> None:
    run_sections("reference compile bench", __doc__.split("\n")[0], lambda warmup, rounds: {
        "minilm": lambda: bench_minilm(warmup, rounds),
        **{name: (lambda name=name: bench_cnn(name, warmup, rounds)) for name in CNNS}}, argv)


if __name__ == "__main__":
    main()
