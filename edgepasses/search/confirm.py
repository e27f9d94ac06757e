"""After a zoo-model search: re-measure the picked front point beside NNCF int8 in one interleaved run with
more rounds, then the eager float model in rounds of its own (`confirm.json`, shown by the report), and
optionally check the per-layer latency table against every measured trial (`lut.json`).

Eager PyTorch is not in the interleaved rounds: its OpenMP workers keep spinning after each call and slow
whatever runs next on a machine with few cores, which hides most of the gap between the two that are
compared.

    python -m edgepasses.search.confirm RUN_DIR [--rounds 30] [--lut]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


EAGER = "eager float (PyTorch)"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def confirm(out: "str | Path", rounds: int = 30, warmup: int = 3, max_accuracy_drop: float | None = None,
            command: str = "") -> dict:
    import edgepasses
    from ..api import lower
    from ..measure.peers import nncf_int8
    from ..zoo import get_model
    from .evaluate import time_programs
    from .run import load_front
    from .study import read_meta, trial_params

    meta = read_meta(out)
    if max_accuracy_drop is None:
        max_accuracy_drop = meta.get("budget", {}).get("accuracy_drop")
    zoo = get_model(meta["model"], meta["batch"])
    data = zoo.calibration(meta.get("calibration_batches", 4))
    front = load_front(out)
    point = front.pick(max_accuracy_drop=max_accuracy_drop)
    load_before = _load()
    # Built as the search built it: the structural steps, flash distillation (when the run used it and the
    # structure changed), then quantize: the pipeline text alone does not carry the distillation.
    from .evaluate import Evaluator

    steps = meta.get("distill_steps", 0)
    distill_data = [b[0] for b in zoo.calibration(min(16, max(meta.get("calibration_batches", 4), 8)))]
    evaluator = Evaluator(zoo.module, zoo.example_inputs, data, target=meta["target"], distill_steps=steps,
                          distill_data=distill_data, distill_lr=meta.get("distill_lr", 1e-4))
    space = _space(meta, zoo)  # exports the model: once
    head, tail = space.split({**space.uniform("float"), **trial_params(out, point.trial)}, bool(data))
    gm, _, distilled = evaluator.compress(head, tail)
    assert str(edgepasses.Pipeline.parse(head + ("," + tail if tail else ""))) == point.pipeline
    program = lower(gm, zoo.example_inputs, target=meta["target"])
    nncf = nncf_int8(zoo.module, zoo.example_inputs, data, model_type=zoo.nncf_model_type)
    programs = {f"search trial {point.trial}": program, "nncf int8": nncf, EAGER: zoo.module}
    calls = {name: (lambda fn=fn: fn(*zoo.example_inputs)) for name, fn in programs.items()}
    timings = time_programs({name: call for name, call in calls.items() if name != EAGER}, warmup, rounds)
    timings.update(time_programs({EAGER: calls[EAGER]}, warmup, rounds))
    result = {"command": command, "trial": point.trial, "pipeline": point.pipeline, "rounds": rounds,
              "distilled": distilled,
              "warmup": warmup, "batch": meta["batch"], "max_accuracy_drop": max_accuracy_drop,
              "baseline_accuracy": front.baseline_accuracy, "load_before": load_before, "load_after": _load(),
              "programs": {name: {"latency_ms": timings[name].median_ms, "latency_min_ms": timings[name].min_ms,
                                  "latency_max_ms": timings[name].max_ms, "accuracy": zoo.accuracy_fn(fn)}
                           for name, fn in programs.items()},
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (Path(out) / "confirm.json").write_text(json.dumps(result, indent=1))
    return result


def _space(meta: dict, zoo):
    from ..canonical import export_canonical
    from .space import SearchSpace, layer_groups

    knobs = set(meta.get("knobs", ["quant", "prune", "lowrank", "sparse24"]))
    return SearchSpace(layer_groups(export_canonical(zoo.module, zoo.example_inputs)), quantize="quant" in knobs,
                       prune="prune" in knobs, lowrank="lowrank" in knobs, sparsify_24="sparse24" in knobs,
                       data_aware=meta.get("prune_criterion", "activation") == "activation")


def check_lut(out: "str | Path", max_trials: int | None = None) -> dict:
    from ..zoo import get_model
    from .lut import check_run
    from .study import read_meta

    meta = read_meta(out)
    zoo = get_model(meta["model"], meta["batch"])
    data = zoo.calibration(meta.get("calibration_batches", 4))
    space = _space(meta, zoo)
    return check_run(out, zoo.module, zoo.example_inputs, data, space, meta.get("warmup", 2), meta.get("rounds", 5),
                     max_trials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgepasses.search.confirm", description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-accuracy-drop", type=float, default=None)
    parser.add_argument("--no-confirm", action="store_true", help="only the latency-table check")
    parser.add_argument("--lut", action="store_true", help="also predict measured trials from the latency table")
    parser.add_argument("--lut-trials", type=int, default=None, help="that many trials, evenly spaced (default: all)")
    args = parser.parse_args(argv)
    command = "python -m edgepasses.search.confirm " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.lut:
        print("latency table vs measured:", json.dumps(check_lut(args.run_dir, args.lut_trials)))
    if args.no_confirm:
        return 0
    result = confirm(args.run_dir, args.rounds, args.warmup, args.max_accuracy_drop, command)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
