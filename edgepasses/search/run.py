"""`edgepasses.search`: the Pareto front of pipelines for a model on a target."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .engine import Spec, out_of_time, run_local, spec_for_workers
from .evaluate import EvalFn, Evaluator, time_programs
from .front import Front, Point
from .objectives import Scoring, parse_budget, parse_objectives
from .space import SearchSpace, layer_groups
from .study import close_interrupted, done_count, make_sampler, open_study, read_meta, storage_for, write_meta


def search(model: torch.nn.Module, data: Sequence, eval_fn: EvalFn | None = None, *,
           example_inputs: tuple | None = None, target: str = "openvino", trials: int = 60,
           objectives: "str | Sequence[str]" = ("latency", "accuracy", "size"),
           budget: "dict[str, float] | list[str] | None" = None, out: "str | Path | None" = None,
           sampler: str = "nsga2", workers: str | None = None, num_workers: int | None = None,
           distill_steps: int = 0, distill_data: Sequence | None = None, warmup: int = 2, rounds: int = 5,
           reference: "Callable[..., Any] | None" = None, reference_info: dict[str, Any] | None = None,
           space: SearchSpace | None = None, seed: int | None = 0, progress: bool = True,
           seed_configs: Sequence[dict[str, Any]] = (), lut: bool = False,
           meta: dict[str, Any] | None = None, distill_lr: float = 1e-4, budget_s: float | None = None,
           canonical: bool = False, baseline: float | None = None,
           on_built: Callable[..., None] | None = None) -> Front:
    """Search per-group compression choices (quantize / prune / lowrank / sparsify_24) for `model` on
    `target`; return the Pareto front of the finished, feasible trials.

    `data`: input tuples (calibration of data-aware passes, the SQNR proxy, flash distillation);
    `eval_fn(callable) -> float`: accuracy, higher is better (default: output SQNR in dB vs `model`).
    `budget`: upper bounds `latency_ms`, `size_mb`, `accuracy_drop` (eval_fn's units). `out`: the run
    directory (Optuna storage `study.db`, `search.json`); a rerun with the same `out` resumes, keeping
    every finished trial, until `trials` are done. `workers="ray"` (local) or "ray://..." runs trials in
    Ray tasks. `reference`: a callable timed interleaved with every candidate (e.g. NNCF int8), with
    `reference_info` (latency/size/accuracy) stored for the report. `budget_s`: no trial starts after
    that many seconds (the trials count still caps the run). `canonical`: `model` is a canonical
    GraphModule already (the `edge` backend's graph); `baseline`: `eval_fn` of the float model, when the
    caller has it; `on_built`: see `Evaluator` (trials in this process only).
    """
    import tempfile

    objectives = parse_objectives(objectives)
    budget = parse_budget(budget)
    data = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
    example_inputs = tuple(example_inputs) if example_inputs is not None else data[0]
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="edgepasses-search-"))
    start = time.perf_counter()
    deadline = time.time() + budget_s if budget_s is not None else None
    evaluator = Evaluator(model, example_inputs, data, eval_fn=eval_fn, target=target, warmup=warmup, rounds=rounds,
                          distill_steps=distill_steps, distill_data=distill_data, reference=reference,
                          distill_lr=distill_lr, canonical=canonical, on_built=on_built)
    meta_path = out / "search.json"
    if meta_path.exists():
        baseline = read_meta(out)["baseline_accuracy"]
    else:
        baseline = float("inf") if eval_fn is None else baseline if baseline is not None else \
            evaluator.baseline_accuracy()
    space = space or SearchSpace(layer_groups(evaluator.base))
    scoring = Scoring(objectives, budget, baseline if baseline != float("inf") else 200.0)
    if lut and workers:
        raise ValueError("lut=True screens in one process; it does not combine with workers (Ray)")
    spec = Spec(model, example_inputs, data, eval_fn, target, space, scoring, warmup, rounds, distill_steps,
                distill_data, reference=reference, lut_dir=str(out) if lut else None, distill_lr=distill_lr,
                canonical=canonical, deadline=deadline)
    study = open_study(storage_for(out, journal=workers is not None), scoring.directions,
                       make_sampler(sampler, trials, seed))
    interrupted = close_interrupted(study)
    if not study.get_trials(deepcopy=False):
        for seed_config in (space.uniform("int8"), space.uniform("float"), *seed_configs):  # baselines first
            study.enqueue_trial(seed_config)
    write_meta(out, {"target": getattr(target, "name", target), "objectives": list(objectives), "budget": budget, "trials": trials,
                     "sampler": sampler, "baseline_accuracy": baseline if eval_fn is not None else None,
                     "accuracy_metric": "eval_fn" if eval_fn is not None else "output SQNR dB (proxy)",
                     "groups": [g.name for g in space.groups], "warmup": warmup, "rounds": rounds,
                     "distill_steps": distill_steps, "distill_lr": distill_lr, "example_inputs": [list(x.shape) for x in example_inputs
                                                                        if isinstance(x, torch.Tensor)],
                     "seed_trials": 2 + len(seed_configs), "lut": bool(lut),
                     **({"reference": reference_info} if reference_info else {}), **(meta or {})})
    remaining = max(0, trials - done_count(study))
    if remaining:
        if workers:
            from .ray_runner import run_ray

            run_ray(workers, out, spec_for_workers(spec, out), scoring.directions, sampler, trials, remaining,
                    seed, num_workers)
        else:
            attempts = 0  # trials the latency table screens out (PRUNED) are not done: draw more, within reason
            while remaining > 0 and attempts < 3 * trials and not out_of_time(spec):
                run_local(study, spec, remaining, evaluator, show_progress=progress)
                attempts += remaining
                remaining = max(0, trials - done_count(study))
    elapsed = time.perf_counter() - start
    meta = read_meta(out)
    write_meta(out, {"wall_s": meta.get("wall_s", 0.0) + elapsed, "interrupted_trials":
                     meta.get("interrupted_trials", 0) + interrupted})
    return load_front(out)


def load_front(out: "str | Path") -> Front:
    """The front of a run directory (finished trials only)."""
    from optuna.trial import TrialState

    meta = read_meta(out)
    objectives = tuple(meta["objectives"])
    baseline = meta.get("baseline_accuracy")
    scoring = Scoring(objectives, meta.get("budget", {}), baseline if baseline is not None else 200.0)
    study = open_study(storage_for(out), scoring.directions)
    points = [Point.from_trial(t, meta["target"], scoring.baseline_accuracy)
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return Front.from_points(points, objectives, scoring.baseline_accuracy, meta.get("reference"))


def measure_reference(fn: Callable[..., Any], example_inputs: tuple, warmup: int, rounds: int) -> dict[str, float]:
    """Latency of a reference program with the search's timing procedure."""
    t = time_programs({"reference": lambda: fn(*example_inputs)}, warmup, rounds)["reference"]
    return {"latency_ms": t.median_ms, "latency_min_ms": t.min_ms, "latency_max_ms": t.max_ms}
