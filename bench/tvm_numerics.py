"""Every zoo model on the `tvm` target, fp32 and int8 pipelines: does TVM compute what we lowered?

`python -m edgepasses.bench.tvm_numerics [--model NAME ...] [--inputs 4]`

- fp32: the `fold_bn` graph lowered to TVM, against eager PyTorch;
- int8: the `fold_bn,quantize` graph (the zoo's calibration, 8 batches) lowered to TVM, against that
  fake-quant graph run in PyTorch. TVM's integer path (our int8 kernels, integer matmuls, Relax Q/DQ)
  computes the same codes except where a value lands within float rounding of a rounding boundary
  (the fake-quant graph sums dequantized floats, the kernels exact integers): such a code moves by one
  step, and the step propagates. In deep random-weight networks (ResNet-50, MobileNetV2, RegNet) that
  deviation from the fake-quant graph is not far below the quantization error itself, the same for the
  reference target's int8 kernels in PyTorch. So the int8 tolerance is relative to
  the quantization error, not an absolute floor.

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

from edgepasses.zoo import ZOO_NAMES, get_model

CALIBRATION_BATCHES = 8
# Tolerances. fp32: TVM's float reductions run in another order than PyTorch's, so outputs agree to
# float32 rounding accumulated over the depth.
FP32_MIN_SQNR_DB = 60.0
# int8: TVM's deviation from the fake-quant graph stays this far below the quantization error (the
# fake-quant graph against eager fp32; 6 dB: a quarter of its power), and TVM is as close to fp32 as
# the fake-quant graph, within
INT8_MARGIN_DB = 6.0
INT8_VS_FP32_SLACK_DB = 0.5
MIN_SAME_ARGMAX = {"fp32": 1.0, "int8": 0.9}


def sqnr_db(reference: torch.Tensor, value: torch.Tensor) -> float:
    noise = (value - reference).double().pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _outputs(fn, inputs: list[tuple]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([fn(*x).float() for x in inputs])


def check(name: str, pipeline: str, gm: torch.fx.GraphModule, inputs: list[tuple], eager: torch.Tensor) -> dict:
    """`gm` lowered to TVM untuned, on `inputs`, against `gm` itself in PyTorch (`eager`: the fp32 module's outputs)."""
    from edgepasses.backends.tvm import TVMTarget

    start = time.perf_counter()
    lowered = TVMTarget(trials=0, records=False).lower(gm, inputs[0])
    build_s = time.perf_counter() - start
    kind = "int8" if "quantize" in pipeline else "fp32"
    expected = eager if kind == "fp32" else _outputs(gm, inputs)
    got = _outputs(lowered, inputs)
    same = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    lowering = lowered.edge_lowering
    row = {"model": name, "pipeline": pipeline, "kind": kind, "max_abs_err": (got - expected).abs().max().item(),
           "sqnr_db": sqnr_db(expected, got), "same_argmax": same, "int8_ops": lowering.int8_ops,
           "fallbacks": len(lowering.fallbacks), "build_s": build_s}
    ok = same >= MIN_SAME_ARGMAX[kind] and not lowering.fallbacks
    if kind == "fp32":
        ok = ok and row["sqnr_db"] >= FP32_MIN_SQNR_DB
    else:
        row["quant_sqnr_db"], row["tvm_vs_fp32_db"] = sqnr_db(eager, expected), sqnr_db(eager, got)
        reference = edgepasses.lower(gm, inputs[0], target="reference")  # the same kernels, from PyTorch
        row["reference_sqnr_db"] = sqnr_db(expected, _outputs(reference, inputs))
        ok = (ok and row["sqnr_db"] >= row["quant_sqnr_db"] + INT8_MARGIN_DB
              and row["tvm_vs_fp32_db"] >= row["quant_sqnr_db"] - INT8_VS_FP32_SLACK_DB)
    row["ok"] = ok
    return row


def model_rows(name: str, n_inputs: int) -> list[dict]:
    zoo = get_model(name, 1)
    if zoo.calibration is None:
        raise ValueError(f"zoo model {name} has no calibration data")
    batches = zoo.calibration(CALIBRATION_BATCHES + n_inputs - 1)
    inputs = [zoo.example_inputs] + batches[CALIBRATION_BATCHES:]
    eager = _outputs(zoo.module, inputs)
    fp32 = edgepasses.compress(zoo.module, zoo.example_inputs, "fold_bn")
    int8 = edgepasses.compress(zoo.module, zoo.example_inputs, "fold_bn,quantize",
                               calibration=batches[:CALIBRATION_BATCHES], target="tvm")
    return [check(name, "fold_bn", fp32, inputs, eager), check(name, "fold_bn,quantize", int8, inputs, eager)]


def table(rows: list[dict]) -> str:
    lines = ["| model | pipeline | vs | max abs err | SQNR dB | int8: reference target vs fake-quant, dB | "
             "int8: fake-quant / tvm vs fp32, dB | same argmax | int8 ops | fallbacks | build s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        versus = "eager" if r["kind"] == "fp32" else "fake-quant graph"
        flag = "" if r["ok"] else " **FAIL**"
        int8 = r["kind"] == "int8"
        reference = f"{r['reference_sqnr_db']:.1f}" if int8 else "–"
        quant = f"{r['quant_sqnr_db']:.1f} / {r['tvm_vs_fp32_db']:.1f}" if int8 else "–"
        lines.append(f"| {r['model']} | {r['pipeline']} | {versus} | {r['max_abs_err']:.3g} | {r['sqnr_db']:.1f}{flag} | "
                     f"{reference} | {quant} | {r['same_argmax']:.2f} | {r['int8_ops']} | {r['fallbacks']} | "
                     f"{r['build_s']:.1f} |")
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
    print(f"\nTolerances: fp32 vs eager: SQNR >= {FP32_MIN_SQNR_DB:.0f} dB, same argmax 100%. int8 vs the fake-quant "
          f"graph: SQNR >= the quantization SQNR (fake-quant vs fp32) + {INT8_MARGIN_DB:.0f} dB, tvm vs fp32 no more "
          f"than {INT8_VS_FP32_SLACK_DB} dB below the fake-quant graph's, same argmax >= {MIN_SAME_ARGMAX['int8']:.0%}. "
          f"No fallbacks. {args.inputs} inputs per model, torch threads {torch.get_num_threads()}.")
    failed = [f"{r['model']} {r['pipeline']}" for r in rows if not r["ok"]]
    if failed:
        print(f"Outside tolerance: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
