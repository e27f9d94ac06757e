"""ResNet-18, batch 1: eager PyTorch vs OpenVINO vs TVM untuned vs TVM tuned, fp32 and int8.

`python -m edgepasses.bench.tvm_bench [--trials 32] [--time-limit 780] [--rounds 20] [--int8] [--no-untuned]`

The fp32 candidates run the same `fold_bn` graph. `--int8` adds `fold_bn,quantize` (8 batches of the zoo's
calibration) on TVM (dense convs as TVM's int8 code, `backends/tvm/int8_conv.py`, the linear on our C++ kernel,
the rest tuned; records in `--int8-cache-dir`)
and on OpenVINO, each quantized for its target. Everything is timed interleaved
(`measure_side_by_side`): median and min–max in ms. Tuning time is stated (as recorded when the
records were reused); the tuned fp32 graph is then lowered a second time to show the cache.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import edgepasses

from edgepasses.measure.timing import measure_side_by_side
from edgepasses.zoo import get_model

CALIBRATION_BATCHES = 8  # as bench.runner's int8 rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per fused op")
    parser.add_argument("--time-limit", type=float, default=780.0, help="seconds of tuning at most")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls before each timed one (see edgepasses.measure.timing.measure_side_by_side)")
    parser.add_argument("--cache-dir", default=None, help="tuning records (default ~/.cache/edgepasses/tvm)")
    parser.add_argument("--int8", action="store_true", help="add tvm int8 and openvino int8 rows")
    parser.add_argument("--int8-cache-dir", default=None, help="tuning records of the int8 graph (default: --cache-dir)")
    parser.add_argument("--no-untuned", action="store_true", help="leave out the untuned tvm row (slow to time)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)

    from edgepasses.backends.tvm import TVMTarget

    zoo = get_model(args.model, 1)
    model, inputs = zoo.module, zoo.example_inputs
    gm = edgepasses.compress(model, inputs, "fold_bn")
    compile_s, info = {}, {}

    def timed(name, make):
        start = time.perf_counter()
        lowered = make()
        compile_s[name] = time.perf_counter() - start
        info[name] = getattr(lowered, "info", None)
        return lowered

    candidates = {"eager fp32": model}
    candidates["openvino fp32"] = timed("openvino fp32", lambda: edgepasses.lower(gm, inputs, target="openvino"))
    if not args.no_untuned:
        candidates["tvm untuned"] = timed("tvm untuned", lambda: TVMTarget(trials=0, records=False).lower(gm, inputs))
    tuned_target = TVMTarget(trials=args.trials, time_limit_s=args.time_limit)
    candidates["tvm tuned"] = timed("tvm tuned", lambda: tuned_target.lower(gm, inputs, cache_dir=args.cache_dir))
    timed("tvm tuned, 2nd compile", lambda: tuned_target.lower(gm, inputs, cache_dir=args.cache_dir))
    if args.int8:
        calibration = zoo.calibration(CALIBRATION_BATCHES)
        int8 = {t: edgepasses.compress(model, inputs, "fold_bn,quantize", calibration=calibration, target=t)
                for t in ("tvm", "openvino")}
        candidates["openvino int8"] = timed("openvino int8", lambda: edgepasses.lower(int8["openvino"], inputs,
                                                                                      target="openvino"))
        candidates["tvm int8 tuned"] = timed("tvm int8 tuned", lambda: tuned_target.lower(
            int8["tvm"], inputs, cache_dir=args.int8_cache_dir or args.cache_dir))

    with torch.no_grad():
        expected = model(*inputs)
        errors = {name: (f(*inputs) - expected).abs().max().item() for name, f in candidates.items()}
    timings = measure_side_by_side({name: (lambda f=f: f(*inputs)) for name, f in candidates.items()},
                                   warmup=args.warmup, rounds=args.rounds, settle=args.settle)

    eager = timings["eager fp32"].median_ms
    print(f"\n{args.model}, batch 1, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, each timed "
          f"call after {args.settle} untimed call(s) of the same program\n")
    print("| candidate | median ms | min–max ms | vs eager | max abs err | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in timings.items():
        print(f"| {name} | {t.median_ms:.1f} | {t.min_ms:.1f}–{t.max_ms:.1f} | {eager / t.median_ms:.2f}× | "
              f"{errors[name]:.2g} | {compile_s.get(name, 0):.1f} |")
    tuned, second = info["tvm tuned"], info["tvm tuned, 2nd compile"]
    print(f"\ntvm tuned: {_tuning(tuned)}; 2nd compile {compile_s['tvm tuned, 2nd compile']:.1f} s (cache hit: "
          f"{second['cache_hit']}); target {tuned['target']}")
    if args.int8:
        lowering = candidates["tvm int8 tuned"].edge_lowering
        int8_info = info["tvm int8 tuned"]
        print(f"tvm int8 tuned: {_tuning(int8_info)}; {lowering.int8_ops} int8 ops, {int8_info['int8_conv_kernels']} "
              f"distinct int8 conv kernels in TVM code (the other int8 ops on our C++ kernels), "
              f"{len(lowering.fallbacks)} fallbacks")
    result = {"timings_ms": {n: {"median": t.median_ms, "min": t.min_ms, "max": t.max_ms} for n, t in timings.items()},
              "compile_s": compile_s, "max_abs_err": errors, "tvm": {"tuned": tuned, "second": second,
                                                               "int8": info.get("tvm int8 tuned")}}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1, default=str)
    return result


def _tuning(info: dict) -> str:
    """Trials, tasks and tuning time of a tuned TVM build (the recorded time when records were reused):
    MetaSchedule's and the measuring of the convolutions' tiles (`conv_nchwc`)."""
    hit = info.get("cache_hit")
    seconds = (info.get("recorded_tuning_s") if hit else info.get("tuning_s")) or 0
    tiles_s = (info.get("recorded_conv_tiles_s") if hit else info.get("conv_tiles", {}).get("seconds")) or 0
    when = "when recorded, reused now" if hit else "now"
    return (f"{info.get('conv_tiles', {}).get('convs')} fp32 convolutions by our schedule + MetaSchedule "
            f"{info.get('trials_per_task')} trials/task over {info.get('tasks')} other tasks, tuning "
            f"{seconds + tiles_s:.0f} s ({tiles_s:.0f} s of it measuring conv tiles; {when})")


if __name__ == "__main__":
    main()
