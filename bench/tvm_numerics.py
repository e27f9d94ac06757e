"""Every zoo model on the `tvm` target, fp32 and int8 pipelines: does TVM compute what we lowered?

`python -m edgepasses.bench.tvm_numerics [--model NAME ...] [--inputs 4]`

- fp32: the `fold_bn` graph lowered to TVM, against eager PyTorch;
- int8: the `fold_bn,quantize` graph (the zoo's calibration, 8 batches) lowered to TVM, against that
  fake-quant graph run in PyTorch. TVM's integer path (our int8 kernels, integer matmuls, Relax Q/DQ)
  computes the same codes except where a value lands within float rounding of a rounding boundary;
  such a code moves by one step, and the step propagates, hence an SQNR floor rather than equality.

Builds are untuned (trials=0, no records): tuning changes schedules, not results. Each model runs on
the example input and `--inputs - 1` more inputs shaped like it (not its calibration batches); argmax
is taken over the last dim. Prints a Markdown table and exits 1 when a tolerance below is exceeded.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import edgepasses

from .zoo import ZOO_NAMES, get_model

CALIBRATION_BATCHES = 8
# Tolerances. fp32: TVM's float reductions run in another order than PyTorch's (and fold no FMA the
# same way), so outputs agree to float32 rounding accumulated over the depth. int8: see above.
MIN_SQNR_DB = {"fp32": 60.0, "int8": 30.0}
MIN_SAME_ARGMAX = {"fp32": 1.0, "int8": 0.9}


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    noise = (value - reference).double().pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _outputs(fn, inputs: list[tuple]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([fn(*x).float() for x in inputs])


def check(name: str, pipeline: str, gm: torch.fx.GraphModule, reference_fn, inputs: list[tuple]) -> dict:
    from edgepasses.backends.tvm import TVMTarget

    start = time.perf_counter()
    lowered = TVMTarget(trials=0, records=False).lower(gm, inputs[0])
    build_s = time.perf_counter() - start
    expected, got = _outputs(reference_fn, inputs), _outputs(lowered, inputs)
    kind = "int8" if "quantize" in pipeline else "fp32"
    same = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    lowering = lowered.edge_lowering
    row = {"model": name, "pipeline": pipeline, "kind": kind, "max_abs_err": (got - expected).abs().max().item(),
           "sqnr_db": sqnr_db(expected, got), "same_argmax": same, "int8_ops": lowering.int8_ops,
           "fallbacks": len(lowering.fallbacks), "build_s": build_s}
    row["ok"] = row["sqnr_db"] >= MIN_SQNR_DB[kind] and same >= MIN_SAME_ARGMAX[kind] and not lowering.fallbacks
    return row


def model_rows(name: str, n_inputs: int) -> list[dict]:
    zoo = get_model(name, 1)
    if zoo.calibration is None:
        raise ValueError(f"zoo model {name} has no calibration data")
    batches = zoo.calibration(CALIBRATION_BATCHES + n_inputs - 1)
    inputs = [zoo.example_inputs] + batches[CALIBRATION_BATCHES:]
    fp32 = edgepasses.compress(zoo.module, zoo.example_inputs, "fold_bn")
    int8 = edgepasses.compress(zoo.module, zoo.example_inputs, "fold_bn,quantize",
                               calibration=batches[:CALIBRATION_BATCHES], target="tvm")
    return [check(name, "fold_bn", fp32, zoo.module, inputs),
            check(name, "fold_bn,quantize", int8, int8, inputs)]


def table(rows: list[dict]) -> str:
    lines = ["| model | pipeline | vs | max abs err | SQNR dB | same argmax | int8 ops | fallbacks | build s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        versus = "eager" if r["kind"] == "fp32" else "fake-quant graph"
        flag = "" if r["ok"] else " **FAIL**"
        lines.append(f"| {r['model']} | {r['pipeline']} | {versus} | {r['max_abs_err']:.3g} | {r['sqnr_db']:.1f}{flag} | "
                     f"{r['same_argmax']:.2f} | {r['int8_ops']} | {r['fallbacks']} | {r['build_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=ZOO_NAMES, help="zoo model (repeatable); default: all")
    parser.add_argument("--inputs", type=int, default=4, help="inputs each model is compared on")
    args = parser.parse_args(argv)
    rows = []
    for name in args.model or ZOO_NAMES:
        rows += model_rows(name, args.inputs)
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nTolerances: SQNR >= {MIN_SQNR_DB['fp32']:.0f} dB and same argmax >= {MIN_SAME_ARGMAX['fp32']:.0%} (fp32 "
          f"vs eager); SQNR >= {MIN_SQNR_DB['int8']:.0f} dB and same argmax >= {MIN_SAME_ARGMAX['int8']:.0%} (int8 vs "
          f"the fake-quant graph); no fallbacks. Torch threads: {torch.get_num_threads()}.")
    failed = [f"{r['model']} {r['pipeline']}" for r in rows if not r["ok"]]
    if failed:
        print(f"Outside tolerance: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
