"""`pipeline="auto"` on the real-weight models, as a user writes it, compiled twice (the second compile is a
compile-cache hit), then scored on data the search never saw.

    python -m edgepasses.bench.auto_showcase [resnet18|minilm|all] [--budget-s 600] [--md docs/auto.md]

- digits ResNet-18 on OpenVINO: the metric is top-1 on the last 413 images of the digits train split
  (a validation part: the 1024 before them are the calibration and distillation batches); the test
  split is scored after the search, for the float model, the result and NNCF int8.
- all-MiniLM-L6-v2 (pretrained) on the reference target (or `--minilm-target openvino`: which one is faster
  depends on the CPU's int8 units), without a metric: auto's own fidelity score
  (mean cosine to the float embeddings on held-out calibration batches, budget 0.99); the test
  sentences are scored after.

The latencies are auto's own final comparison: the result, the float program on the target, OpenVINO
fp32 and NNCF int8 of the same graph in one interleaved run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgepasses.search.auto import AUTO, SearchOptions, spread_batches

from .runner import Machine

BATCH = 8
CALIBRATION_IMAGES = 1024


def _compile_twice(module, example: tuple, options: dict) -> tuple[list, object]:
    """The two compilations (a fresh Dynamo each time, the same cache_dir) and the compiled model."""
    compilations: list = []
    for _ in range(2):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="edge", dynamic=False,
                                 options={**options, "on_compile": compilations.append})
        with torch.no_grad():
            compiled(*example)
    return compilations, compiled


def _latency_rows(auto, scores: dict[str, str]) -> list[str]:
    rows = []
    for name, t in auto.latency_ms.items():
        ratio = "1.00×" if name == AUTO else f"{auto.speedup[name]:.2f}× slower than auto" \
            if auto.speedup[name] >= 1 else f"{1 / auto.speedup[name]:.2f}× faster than auto"
        rows.append(f"| {name} | {t['median']:.2f} ({t['min']:.2f}–{t['max']:.2f}) | {ratio} | "
                    f"{auto.scores.get(name, float('nan')):.4f} | {scores.get(name, '-')} |")
    return rows


def _summary(compilations: list, budget_s: float) -> list[str]:
    first, second = compilations
    auto = first.auto
    return [f"- chosen: `{auto.pipeline}`" + (f" (distilled: {auto.distilled['steps']} steps, loss "
                                               f"{auto.distilled['loss_start']:.3g} → {auto.distilled['loss_end']:.3g})"
                                               if auto.distilled else ""),
            f"- search: {auto.trials} finished trials in {auto.search_s:.0f} s of budget_s={budget_s:g}; "
            f"whole first compile {first.seconds:.0f} s (cache {first.cache})",
            f"- second compile of the same model: {second.seconds:.1f} s (cache {second.cache}), "
            f"chose `{second.auto.pipeline}`",
            f"- {auto.metric}: float {auto.baseline:.4f}, auto {auto.score:.4f} (max_drop {auto.max_drop:g})"]


def digits_resnet18(budget_s: float, cache_dir: str, target: str = "openvino") -> str:
    from edgepasses.measure.peers import nncf_int8
    from edgepasses.zoo import get_model
    from edgepasses.zoo.digits import DigitsData, accuracy, load_digits_split

    zoo = get_model("digits_resnet18", BATCH)
    split = load_digits_split(32)
    train_x = split.train_x
    calibration = [(train_x[i:i + BATCH],) for i in range(0, CALIBRATION_IMAGES, BATCH)]
    validation = DigitsData(train_x[:0], split.train_y[:0], train_x[CALIBRATION_IMAGES:],
                            split.train_y[CALIBRATION_IMAGES:])

    def top1_validation(fn) -> float:
        return accuracy(fn, data=validation, size=32, batch_size=BATCH)

    options = {"pipeline": "auto", "target": target, "calibration": calibration, "metric": top1_validation,
               "max_drop": 0.01, "search": {"budget_s": budget_s}, "cache_dir": cache_dir}
    compilations, compiled = _compile_twice(zoo.module, zoo.example_inputs, options)
    auto = compilations[0].auto
    # NNCF on the batches auto's own comparison calibrated it on (and ours on).
    nncf = nncf_int8(zoo.module, zoo.example_inputs, spread_batches(calibration, SearchOptions().calibration_batches))
    test = {AUTO: zoo.accuracy_fn(compiled), "nncf int8": zoo.accuracy_fn(nncf),
            "fp32 on the target": zoo.accuracy_fn(zoo.module)}
    lines = ["## digits ResNet-18 on OpenVINO, metric: top-1 (validation), max_drop 0.01", "",
             "```python", "torch.compile(model, backend='edge', options={'pipeline': 'auto', 'target': 'openvino',",
             f"    'calibration': calibration,  # {len(calibration)} batches of {BATCH} train images",
             "    'metric': top1_validation,   # 413 other train images", f"    'max_drop': 0.01, 'search': "
             f"{{'budget_s': {budget_s:g}}}, 'cache_dir': cache_dir}})", "```", "",
             *_summary(compilations, budget_s), "",
             f"Test split (360 images, never seen by the search): float {test['fp32 on the target']:.2f} %, auto "
             f"{test[AUTO]:.2f} % (drop {test['fp32 on the target'] - test[AUTO]:.2f} points), NNCF int8 "
             f"{test['nncf int8']:.2f} %.", "",
             "| program | latency ms median (min–max) | vs auto | validation top-1 % | test top-1 % |",
             "|---|---|---|---|---|",
             *_latency_rows(auto, {k: f"{v:.2f}" for k, v in test.items()})]
    return "\n".join(lines)


def minilm(budget_s: float, cache_dir: str, target: str = "reference") -> str:
    from edgepasses.zoo import sentence_embeddings as sentences

    module = sentences.load_encoder()
    splits = sentences.sentence_splits(calibration=16, validation=0, test=16, batch_size=BATCH)
    options = {"pipeline": "auto", "target": target, "calibration": splits.calibration, "max_drop": 0.01,
               "search": {"budget_s": budget_s}, "cache_dir": cache_dir}
    compilations, compiled = _compile_twice(module, splits.calibration[0], options)
    auto = compilations[0].auto
    reference = sentences.embed(module, splits.test)
    test = sentences.embedding_quality(reference, sentences.embed(compiled, splits.test))
    lines = [f"## all-MiniLM-L6-v2 (pretrained) on the {target} target, no metric (mean cosine ≥ 0.99)", "",
             "```python", f"torch.compile(encoder, backend='edge', options={{'pipeline': 'auto', 'target': '{target}',",
             f"    'calibration': calibration,  # {len(splits.calibration)} batches of {BATCH} sentences, "
             f"{sentences.SEQ_LEN} tokens", f"    'max_drop': 0.01, 'search': {{'budget_s': {budget_s:g}}}, "
             "'cache_dir': cache_dir})", "```", "",
             *_summary(compilations, budget_s), "",
             f"Test sentences ({len(splits.test) * BATCH}, never seen by the search): mean cosine to the float "
             f"embeddings {test.mean_cosine:.4f} (min {test.min_cosine:.4f}), nearest-neighbour agreement "
             f"{100 * test.neighbour_agreement:.1f} %.", "",
             "| program | latency ms median (min–max) | vs auto | held-out cosine | |", "|---|---|---|---|---|",
             *_latency_rows(auto, {})]
    return "\n".join(lines)


SHOWCASES = {"resnet18": digits_resnet18, "minilm": minilm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepasses.bench.auto_showcase", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", default="all", choices=[*SHOWCASES, "all"])
    parser.add_argument("--budget-s", type=float, default=600.0, help="the search's budget_s per model")
    parser.add_argument("--minilm-target", choices=("reference", "openvino"), default="reference",
                        help="where MiniLM's search runs (the digits ResNet-18's is OpenVINO)")
    parser.add_argument("--cache-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--md", default=None, help="also write the sections to this Markdown file")
    args = parser.parse_args(argv)
    machine = Machine.here()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="edgepasses-auto-showcase-")
    sections = ["# pipeline='auto' on real weights", "",
                f"Generated by `python -m edgepasses.bench.auto_showcase {' '.join(argv or sys.argv[1:])}` on "
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {machine}."]
    for name in SHOWCASES if args.which == "all" else [args.which]:
        start = time.perf_counter()
        targets = {"minilm": args.minilm_target, "resnet18": "openvino"}
        sections += ["", SHOWCASES[name](args.budget_s, cache_dir, targets[name]),
                     "", f"({name}: {time.perf_counter() - start:.0f} s in all; 1-min load average at the end "
                     f"{os.getloadavg()[0]:.1f})"]
        print(sections[-3], flush=True)
    if args.md:
        Path(args.md).write_text("\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
