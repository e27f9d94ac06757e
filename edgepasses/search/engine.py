"""Running trials: the objective (space -> pipeline -> measurement -> objectives, constraints), locally
or in Ray tasks that share the study's storage."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .evaluate import EvalFn, Evaluator
from .objectives import Scoring
from .space import SearchSpace


@dataclass
class Spec:
    """Everything a worker needs to build the same objective (picklable: Ray ships it)."""
    model: torch.nn.Module | None    # None: loaded from `graph_artifact` (a canonical graph shipped to Ray)
    example_inputs: tuple
    data: Sequence[tuple]
    eval_fn: EvalFn | None
    target: str
    space: SearchSpace
    scoring: Scoring
    warmup: int = 2
    rounds: int = 5
    distill_steps: int = 0
    distill_data: Sequence | None = None
    threads: int | None = None
    lut_dir: str | None = None      # screen with the per-layer latency table in this run directory
    distill_lr: float = 1e-4
    canonical: bool = False         # model is a canonical GraphModule already (pipeline="auto")
    deadline: float | None = None   # time.time() after which no trial starts (a search's budget_s)
    reference: Callable[..., Any] | None = field(default=None, repr=False)  # driver only, never shipped
    graph_artifact: str | None = None  # where workers load the canonical graph from (`artifacts.save`)

    def evaluator(self) -> Evaluator:
        if self.threads:
            torch.set_num_threads(self.threads)
        model = self.model
        if model is None:
            from ..artifacts import load

            model = load(self.graph_artifact, program=False).graph
        return Evaluator(model, self.example_inputs, self.data, eval_fn=self.eval_fn, target=self.target,
                         warmup=self.warmup, rounds=self.rounds, distill_steps=self.distill_steps,
                         distill_data=self.distill_data, reference=self.reference,
                         distill_lr=self.distill_lr, canonical=self.canonical)


DISTILL_STEPS = "distill_steps"  # a trial's user attribute: its distillation length, when not the search's


def _known(study, pipeline: str, distill_steps: int | None) -> dict[str, Any] | None:
    """The measurement of a finished trial with the same pipeline and distillation: samplers repeat
    themselves."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if (t.user_attrs.get("pipeline") == pipeline and t.user_attrs.get(DISTILL_STEPS) == distill_steps
                and "latency_ms" in t.user_attrs):
            return dict(t.user_attrs)
    return None


def make_objective(spec: Spec, evaluator: Evaluator | None = None) -> Callable[[Any], list[float]]:
    evaluator = evaluator or spec.evaluator()
    with_calibration = bool(spec.data)
    table = None
    if spec.lut_dir:
        from .lut import LatencyTable

        table = LatencyTable(spec.lut_dir, spec.target, spec.warmup, spec.rounds)

    def objective(trial) -> list[float]:
        config = spec.space.suggest(trial)
        head, tail = spec.space.split(config, with_calibration)
        pipeline = spec.space.pipeline(config, with_calibration)
        trial.set_user_attr("pipeline", pipeline)
        distill_steps = trial.user_attrs.get(DISTILL_STEPS)  # enqueued with the trial (auto's recovery)
        attrs = _known(trial.study, pipeline, distill_steps)
        lut_sum = None
        if attrs is None and table is not None:
            lut_sum = _screen(trial, spec, evaluator, table, config, head)
        if attrs is None:
            try:
                attrs = evaluator.measure(head, tail, distill_steps).to_attrs()
                if table is not None:
                    table.record(trial.number, lut_sum, attrs["latency_ms"], pipeline)
                    attrs["lut_sum_ms"] = lut_sum
            except Exception as exc:  # the trial FAILs with the reason; the search goes on
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
                raise
        else:
            attrs["repeat_of"] = attrs.get("repeat_of", None) or "earlier trial"
        attrs["pipeline"] = pipeline
        attrs["load_avg"] = round(os.getloadavg()[0], 2)  # 1-min load after the measurement (a shared machine)
        attrs["constraints"] = spec.scoring.constraints(attrs)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return spec.scoring.values(attrs)

    return objective


def _screen(trial, spec: Spec, evaluator: Evaluator, table, config: dict[str, Any], head: str) -> float:
    """The table's sum for this candidate; raises optuna.TrialPruned when the table screens it out."""
    import copy

    import optuna
    from optuna.trial import TrialState

    from .lut import layer_keys, screen

    layers = layer_keys(evaluator._run(copy.deepcopy(evaluator.base), head), config)
    predicted = table.predict(layers)
    scale = table.scale()
    trial.set_user_attr("lut_sum_ms", predicted["sum_ms"])
    if scale is None:
        return predicted["sum_ms"]
    measured = [{**t.user_attrs, "number": t.number} for t in trial.study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)) if "latency_ms" in t.user_attrs]
    why = screen(predicted["sum_ms"] * scale, predicted["size_mb"], spec.scoring.budget, measured,
                 spec.scoring.baseline_accuracy)
    trial.set_user_attr("lut_predicted_ms", predicted["sum_ms"] * scale)
    if why:
        trial.set_user_attr("screened", why)
        raise optuna.TrialPruned(why)
    return predicted["sum_ms"]


def run_local(study, spec: Spec, n_trials: int, evaluator: Evaluator | None = None,
              show_progress: bool = True) -> None:
    from ..progress import progress

    objective = make_objective(spec, evaluator)
    steps = range(n_trials)
    for _ in (progress(steps, "search: trials") if show_progress else steps):
        if out_of_time(spec):
            return
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)


def out_of_time(spec: Spec) -> bool:
    return spec.deadline is not None and time.time() >= spec.deadline


def spec_for_workers(spec: Spec, out: Path) -> Spec:
    """The spec Ray ships: no reference program (it stays with the driver); a canonical graph as an
    artifact in the run directory, which the workers see (its node metadata, which the passes read,
    does not survive pickling)."""
    if not spec.canonical:
        return dataclasses.replace(spec, reference=None)
    from ..artifacts import save

    path = out / "canonical-graph"
    if not path.exists():
        save(spec.model, path, spec.example_inputs, target_artifact=False)
    return dataclasses.replace(spec, reference=None, model=None, graph_artifact=str(path.resolve()))
