"""`edgepasses search` on a zoo model: data, eval_fn and the NNCF int8 reference (`edgepasses.measure.peers`)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

NNCF_LABEL = "nncf int8 + openvino"  # as the models bench names its row

def _nncf_reference(zoo, calibration, warmup: int, rounds: int) -> tuple:
    from ..measure.peers import nncf_int8
    from .run import measure_reference

    start = time.perf_counter()
    program = nncf_int8(zoo.module, zoo.example_inputs, calibration, model_type=zoo.nncf_model_type)
    info = {"label": NNCF_LABEL, "size_mb": program.weights_mb, "build_s": time.perf_counter() - start,
            **measure_reference(program, zoo.example_inputs, warmup, rounds)}
    if zoo.accuracy_fn is not None:
        info["accuracy"] = zoo.accuracy_fn(program)
    return program, info


def run_search_command(args: argparse.Namespace) -> int:
    from ..zoo import ZOO_NAMES, get_model

    from .report import front_markdown
    from .run import search
    from .study import read_meta

    if args.model not in ZOO_NAMES:
        args.parser.error(f"unknown model {args.model}; valid models: {', '.join(ZOO_NAMES)}")
    zoo = get_model(args.model, args.batch)
    if zoo.calibration is None:
        args.parser.error(f"zoo model {args.model} has no calibration data")
    data = zoo.calibration(args.calibration_batches)
    reference, info = None, None
    if args.reference == "nncf" and args.target == "openvino":
        reference, info = _nncf_reference(zoo, data, args.warmup, max(args.rounds, 10))
        out_meta = Path(args.out) / "search.json"
        if out_meta.exists() and "reference" in read_meta(args.out):
            info = read_meta(args.out)["reference"]  # measured once, at the start of the run
    distill_data = None
    if args.distill_steps:
        distill_data = [b[0] for b in zoo.calibration(min(16, max(args.calibration_batches, 8)))]
    from .space import SearchSpace, layer_groups
    from ..canonical import export_canonical

    knobs = {k.strip() for k in args.knobs.split(",")}
    space = SearchSpace(layer_groups(export_canonical(zoo.module, zoo.example_inputs)),
                        quantize="quant" in knobs, prune="prune" in knobs, lowrank="lowrank" in knobs,
                        sparsify_24="sparse24" in knobs, data_aware=args.prune_criterion == "activation",
                        prune_ratios=tuple(float(v) for v in args.prune_ratios.split(",")),
                        lowrank_energies=tuple(float(v) for v in args.lowrank_energies.split(",")))
    front = search(zoo.module, data, zoo.accuracy_fn, example_inputs=zoo.example_inputs, target=args.target,
                   trials=args.trials, objectives=args.objectives, budget=args.budget, out=args.out,
                   sampler=args.sampler, workers=args.workers, num_workers=args.num_workers,
                   distill_steps=args.distill_steps, distill_data=distill_data, warmup=args.warmup,
                   rounds=args.rounds, reference=reference, reference_info=info, seed=args.seed, space=space,
                   seed_configs=space.prune_seeds(tuple(float(v) for v in args.seed_prune.split(",") if v.strip())),
                   lut=args.lut, distill_lr=args.distill_lr, meta={"model": args.model, "batch": args.batch,
                                       "calibration_batches": args.calibration_batches,
                                       "knobs": sorted(knobs), "prune_criterion": args.prune_criterion})
    print(front_markdown(front))
    print(f"\nrun directory: {args.out}; report: edgepasses report {args.out}")
    return 0
