"""The reference target interpreted op by op vs compiled by Inductor around our kernels.

    python -m edgepasses.bench.reference_compile [--rounds N] [--warmup N] [--only minilm,resnet18]

(minilm) the pretrained all-MiniLM-L6-v2, batch 8 x 64 tokens, `quantize` on the reference target with
    `compile` off and on, beside eager fp32 and OpenVINO fp32; mean cosine of each program's embeddings
    to eager fp32's on the test split, and how far the two reference programs' embeddings are apart;
(resnet18) torchvision ResNet-18 (random weights), batch 1, `fold_bn,quantize` on reference both ways,
    beside eager fp32.
Both programs of a model are lowered from the same compressed graph; latency is the median with
min-max over interleaved rounds (`timing.measure_side_by_side`); compile time is Inductor's alone.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.utils._pytree

import edgepasses
from edgepasses.backends.reference import ReferenceTarget
from edgepasses.measure.timing import Timing, measure_side_by_side

from .sections import run_sections

CALIBRATION_BATCHES = 10
INTERPRETED = "int8 reference, interpreted"
COMPILED = "int8 reference, Inductor-compiled"


def _lower_both_ways(gm: torch.fx.GraphModule, example: tuple) -> tuple[Callable, Callable, float]:
    """(interpreted program, compiled program, seconds to compile) of one compressed graph."""
    interpreted = ReferenceTarget(compile=False).lower(gm, example)
    start = time.perf_counter()
    compiled = ReferenceTarget(compile=True).lower(gm, example)
    return interpreted, compiled, time.perf_counter() - start


def _table(timings: dict[str, Timing], quality: dict[str, str] | None = None, quality_header: str = "") -> list[str]:
    """Latency rows (the first program is the baseline), with a quality column where given."""
    base = next(iter(timings.values())).median_ms
    column = f" {quality_header} |" if quality else ""
    lines = [f"| program | median ms (min-max) | vs eager fp32 |{column}",
             "|---|---|---:|" + ("---|" if quality else "")]
    lines += [f"| {name} | {t.median_ms:.1f} ({t.min_ms:.1f}-{t.max_ms:.1f}) | {base / t.median_ms:.2f}x |"
              + (f" {quality[name]} |" if quality else "") for name, t in timings.items()]
    ratio = timings[INTERPRETED].median_ms / timings[COMPILED].median_ms
    return lines + ["", f"compiled / interpreted: {ratio:.2f}x faster"]


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
    start = time.perf_counter()
    gm = edgepasses.compress(model, example, "quantize", calibration=splits.calibration)
    compress_s = time.perf_counter() - start
    interpreted, compiled, compile_s = _lower_both_ways(gm, example)
    programs = {"eager fp32": model, "OpenVINO fp32": openvino_direct(model, example),
                INTERPRETED: interpreted, COMPILED: compiled}
    with torch.no_grad():
        embeddings = {name: embed(fn, splits.test) for name, fn in programs.items()}
    reference = embeddings["eager fp32"]
    cosine = {name: f"{embedding_quality(reference, e).mean_cosine:.4f}" for name, e in embeddings.items()}
    apart = (embeddings[INTERPRETED] - embeddings[COMPILED]).abs().max().item()
    between = embedding_quality(embeddings[INTERPRETED], embeddings[COMPILED])
    timings = measure_side_by_side(_calls(programs, example), warmup, rounds)
    return [f"## (minilm) all-MiniLM-L6-v2 (pretrained), batch {BATCH_SIZE} x {SEQ_LEN} tokens, `quantize`", "",
            *_table(timings, cosine, f"mean cosine to fp32 ({len(splits.test) * BATCH_SIZE} test sentences)"), "",
            f"Interpreted vs compiled embeddings: cosine mean {between.mean_cosine:.6f}, min {between.min_cosine:.6f}, "
            f"max abs difference {apart:.2e}, nearest-neighbour agreement {between.neighbour_agreement:.1%}.",
            f"Compile time: `quantize` (calibration {len(splits.calibration)} batches) {compress_s:.1f} s; "
            f"reference lowering + Inductor {compile_s:.1f} s (Inductor alone {compiled.compile_s:.1f} s)."]


def bench_resnet18(warmup: int, rounds: int) -> list[str]:
    from edgepasses.zoo import get_model

    zoo = get_model("resnet18", 1)
    example = zoo.example_inputs
    gm = edgepasses.compress(zoo.module, example, "fold_bn,quantize",
                             calibration=zoo.calibration(CALIBRATION_BATCHES))
    interpreted, compiled, compile_s = _lower_both_ways(gm, example)
    programs = {"eager fp32": zoo.module, INTERPRETED: interpreted, COMPILED: compiled}
    with torch.no_grad():
        apart = (_tensor(interpreted(*example)) - _tensor(compiled(*example))).abs().max().item()
    timings = measure_side_by_side(_calls(programs, example), warmup, rounds)
    shape = "x".join(map(str, example[0].shape))
    return [f"## (resnet18) torchvision ResNet-18 (random weights), input {shape}, `fold_bn,quantize`", "",
            *_table(timings), "",
            f"Interpreted vs compiled logits: max abs difference {apart:.2e}.",
            f"Compile time: reference lowering + Inductor {compile_s:.1f} s "
            f"(Inductor alone {compiled.compile_s:.1f} s)."]


def main(argv: list[str] | None = None) -> None:
    run_sections("reference compile bench", __doc__.split("\n")[0], lambda warmup, rounds: {
        "minilm": lambda: bench_minilm(warmup, rounds), "resnet18": lambda: bench_resnet18(warmup, rounds)}, argv)


if __name__ == "__main__":
    main()
