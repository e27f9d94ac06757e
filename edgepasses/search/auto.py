"""`pipeline="auto"`: the fastest compression of a graph within the user's accuracy budget.

The search (`run.search`) measures candidates on the target, each timed in the same interleaved rounds
as the float program on that target, so that its objective is a latency ratio, which does not drift
with the machine's load. The fastest front point within the budget is rebuilt (its flash distillation
is seeded, so it is the candidate the search measured), scored again, and timed once more beside the
float program and, where OpenVINO is installed, OpenVINO fp32 and NNCF int8: the `AutoResult`.

Without a metric, the score is the mean cosine between the compressed and the float graph's outputs
(each sample's flattened output) on a held-out part of the calibration batches, which the search never
calibrates or distils on.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from ..errors import OptionError
from ..pass_base import build_options, option
from ..progress import warnings_held_back

log = logging.getLogger("edgepasses")

AUTO = "auto"
FIDELITY = "mean cosine to the float model's outputs on the held-out calibration batches"
KNOBS = ("quant", "prune", "lowrank", "sparse24")
FP32 = "fp32 on the target"
RECOVERABLE_MISS = 3.0  # a uniform prune ratio that lost at most this many budgets gets a recovery try


@dataclass(frozen=True)
class SearchOptions:
    """`options={"search": {...}}` of `pipeline="auto"`."""
    budget_s: float = option(600.0, "No trial starts after this many seconds.")
    trials: int = option(200, "At most this many finished trials (budget_s usually ends the search first).")
    knobs: tuple = option(KNOBS, "What is searched per group of layers: quant, prune, lowrank, sparse24.")
    prune_ratios: tuple = option((0.0, 0.25, 0.375, 0.5, 0.625), "The prune ratios a group may take.")
    distill_steps: int = option(400, "Flash-distillation steps (on the calibration batches) after pruning, "
                                     "low-rank or 2:4; 0: none.")
    distill_lr: float = option(3e-4, "Its learning rate.")
    recover_steps: int = option(1200, "Distillation steps of the recovery trials: where the largest uniform "
                                      "prune ratio that holds the budget is followed by a near miss, the larger "
                                      "ratios are tried again with this longer distillation; 0: none.")
    rounds: int = option(5, "Interleaved timing rounds per trial.")
    warmup: int = option(2, "Untimed calls of each program before them.")
    confirm_rounds: int = option(20, "Timing rounds of the final comparison (auto, fp32, OpenVINO fp32, NNCF).")
    compare: bool = option(True, "Time NNCF int8 and OpenVINO fp32 beside the result (needs openvino, nncf).")
    holdout: float = option(0.25, "Without a metric: the share of calibration batches held out for scoring.")
    calibration_batches: int = option(8, "At most this many of the calibration batches (spread over them) for "
                                          "quantize and the data-aware passes; distillation uses all.")
    sampler: Literal["tpe", "nsga2", "random"] = option("tpe", "The Optuna sampler after the seed trials.")
    workers: str | None = option(None, "'ray' (local) or 'ray://host:port': trials as Ray tasks.")
    num_workers: int | None = option(None, "How many Ray workers.")
    mixed: bool = option(True, "Where the target has no 2:4 kernel (OpenVINO), candidates may run their 2:4 "
                               "Linears on the reference target's kernel and the rest on the target; on CPUs "
                               "whose int8 path takes 7-bit weights, the ones that kernel packs.")
    lut: bool = option(False, "Screen candidates with the per-layer latency table (one process only).")
    progress: bool = option(False, "Show a progress bar over the trials.")

    def __post_init__(self):
        unknown = set(self.knobs) - set(KNOBS)
        if unknown or not self.knobs:
            raise OptionError(f"search knobs are names of {', '.join(KNOBS)}; got {self.knobs}")
        if not self.budget_s > 0 or self.trials < 1:
            raise OptionError(f"search budget_s and trials must be positive; got {self.budget_s}, {self.trials}")
        if self.calibration_batches < 1:
            raise OptionError(f"search calibration_batches must be positive; got {self.calibration_batches}")
        if not 0 < self.holdout < 1:
            raise OptionError(f"search holdout is a share of the calibration batches in (0, 1); got {self.holdout}")


def parse_search(value: Any) -> SearchOptions:
    if value is None:
        return SearchOptions()
    if isinstance(value, SearchOptions):
        return value
    if not isinstance(value, dict):
        raise OptionError(f"search must be a dict such as {{'budget_s': 600}}; got {value!r:.80}")
    return build_options(SearchOptions, value, where="pipeline='auto' search")


@dataclass
class AutoResult:
    """What `pipeline="auto"` chose, and what it measured (EdgeCompilation.auto, gm.edge_auto)."""
    pipeline: str | None            # None: no candidate held the budget; the float program runs
    target: str
    metric: str                     # what was scored: "metric" (yours) or FIDELITY
    baseline: float                 # the float model's score
    score: float                    # the result's score: as the search measured it (again after a rebuild)
    max_drop: float                 # the share of the baseline it may lose
    distilled: dict | None = None
    trials: int = 0                 # finished trials
    search_s: float = 0.0
    budget_s: float = 0.0
    front: list[dict] = field(default_factory=list)    # pipeline, speedup vs fp32 on the target, score
    latency_ms: dict[str, dict] = field(default_factory=dict)  # confirmation: program -> median, min, max
    scores: dict[str, float] = field(default_factory=dict)     # confirmation: program -> score
    run_dir: str | None = None

    @property
    def speedup(self) -> dict[str, float]:
        """Each compared program's median / the result's, from the same interleaved rounds."""
        ours = self.latency_ms.get(AUTO, {}).get("median")
        return {name: t["median"] / ours for name, t in self.latency_ms.items() if name != AUTO and ours}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "AutoResult":
        return cls(**record)

    def __str__(self) -> str:
        lines = [f"auto on {self.target}: {self.pipeline or 'float (no candidate held the budget)'}",
                 f"  {self.metric}: {self.score:.5g} (float {self.baseline:.5g}, max_drop {self.max_drop:g}); "
                 f"{self.trials} trials in {self.search_s:.0f} s of {self.budget_s:.0f} s"]
        for name, t in self.latency_ms.items():
            ratio = self.speedup.get(name)
            lines.append(f"  {name}: {t['median']:.3g} ms ({t['min']:.3g}-{t['max']:.3g})"
                         + (f", auto is {ratio:.2f}x" if ratio else "")
                         + (f", score {self.scores[name]:.5g}" if name in self.scores else ""))
        return "\n".join(lines)


def mean_cosine(reference: list, outputs: list) -> float:
    """The mean over samples of the cosine between flattened outputs (every tensor output, each sample
    a row of its first dimension)."""
    cosines = []
    for want, got in zip(reference, outputs):
        for a, b in zip(_tensors(want), _tensors(got)):
            a, b = (t.detach().float().reshape(len(t), -1) if t.dim() > 1 else t.detach().float()[None]
                    for t in (a, b))
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12))
    if not cosines:
        raise OptionError("pipeline='auto' without a metric scores floating-point outputs; the graph has none: "
                          "pass metric=...")
    return float(torch.cat(cosines).mean())


def _tensors(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def fidelity(base: torch.fx.GraphModule, held_out: Sequence[tuple]) -> Callable[[Callable], float]:
    with torch.no_grad():
        reference = [base(*batch) for batch in held_out]

    def score(program: Callable) -> float:
        with torch.no_grad():
            return mean_cosine(reference, [program(*batch) for batch in held_out])
    return score


@dataclass(frozen=True)
class Data:
    calibration: list[tuple]       # what quantize and the data-aware passes observe
    distillation: list[tuple]      # (inputs, None): every batch the search may train on


def spread_batches(batches: list[tuple], most: int) -> list[tuple]:
    """At most `most` batches, evenly spaced: observers and bias correction pass over each one, several
    times per trial, and a few dozen batches settle the ranges."""
    if len(batches) <= most:
        return batches
    return [batches[round(i * (len(batches) - 1) / (most - 1))] for i in range(most)] if most > 1 else batches[:1]


def split_calibration(batches: list[tuple], holdout: float, with_metric: bool) -> tuple[list, list]:
    """(batches to calibrate and distil on, batches to score on): all of them with a metric of yours."""
    if with_metric:
        return batches, []
    if len(batches) < 2:
        raise OptionError(f"pipeline='auto' without a metric scores on held-out calibration batches; got "
                          f"{len(batches)} batch: pass at least 2 (better 8 or more), or metric=...")
    held = max(1, round(len(batches) * holdout))
    return batches[:-held], batches[-held:]


def check_auto_inputs(calibration) -> list[tuple]:
    from ..quant.calibration import as_batch

    if calibration is None:
        raise OptionError("pipeline='auto' needs calibration=[...] (input tuples): the search calibrates, "
                          "distils and (without a metric) scores on them")
    return [as_batch(b) for b in calibration]


def auto_compress(base: torch.fx.GraphModule, example_inputs: tuple, calibration: list[tuple], *,
                  target: Any, evaluate: Callable[[Callable], float] | None = None, max_drop: float = 0.01,
                  search: SearchOptions = SearchOptions(), run_dir: str | Path | None = None,
                  lower_kwargs: dict | None = None,
                  baseline: float | None = None) -> tuple[torch.fx.GraphModule, Callable, AutoResult]:
    """(compressed graph, its program on `target`, AutoResult) for the canonical graph `base`; `target`: a
    name, or a built Target (`backends.get_target`).

    `evaluate(program) -> float`, higher is better (default: FIDELITY); `baseline`: its score of `base`, when
    the caller has it. With no candidate within `max_drop`, one WARNING, and the float graph and program."""
    from ..backends import get_target

    batches, held_out = split_calibration(calibration, search.holdout, evaluate is not None)
    metric_name = "metric" if evaluate is not None else FIDELITY
    evaluate = evaluate or fidelity(base, held_out)
    baseline = evaluate(base) if baseline is None else baseline
    budget = max_drop * abs(baseline)
    target = with_2_4_kernel(get_target(target) if isinstance(target, str) else target, search)
    scratch = run_dir is None  # the search's storage, removed at the end (a cache_dir keeps it, to resume)
    run_dir = Path(tempfile.mkdtemp(prefix="edgepasses-auto-")) if scratch else Path(run_dir)
    lower = functools.partial(_lower, target=target, example_inputs=example_inputs, **(lower_kwargs or {}))
    reference = lower(copy.deepcopy(base))
    space = _space(base, search, target)
    data = Data(spread_batches(batches, search.calibration_batches), [(b, None) for b in batches])
    kept = KeptFastest(baseline, budget)
    start = time.perf_counter()
    with warnings_held_back(), _optuna_quiet(), _workers(search):  # trials' pass WARNINGs: summed up below
        front = _search(base, example_inputs, data, evaluate, baseline, target, space, budget, search, run_dir,
                        reference, kept)
    _warn_failures(run_dir)
    result = AutoResult(None, target.name, metric_name, baseline, baseline, max_drop, trials=len(front.all_points),
                        search_s=time.perf_counter() - start, budget_s=search.budget_s,
                        front=[_front_row(p) for p in front.points], run_dir=str(run_dir))
    chosen = _first_within(front, budget, kept, base, example_inputs, data, evaluate, target, search, space,
                           run_dir, lower)
    if chosen is None:
        _warn_float(front, result, budget)
        gm, program = copy.deepcopy(base), reference
    else:
        gm, program, point, score, result.distilled = chosen
        result.pipeline, result.score = point.pipeline, score
    _confirm(result, program, reference, base, example_inputs, data.calibration, evaluate, search)
    _record_reference(run_dir, result, reference)
    if scratch:
        shutil.rmtree(run_dir, ignore_errors=True)
        result.run_dir = None
    gm.edge_auto = result
    return gm, program, result


def with_2_4_kernel(target, search: SearchOptions):
    """`target`, or "target,reference" when `mixed`: a candidate's 2:4 Linears then run on the reference
    target's 2:4 kernel and the rest of it on `target`, measured like any candidate. The backend resolves
    it before its cache lookup, so that a cache hit places the pick's layers as the search did."""
    from ..backends import get_target
    from ..backends.chain import TargetChain
    from ..quant import cpu_int8_saturates

    if not (search.mixed and "sparse24" in search.knobs) or target.sparse24_kernels:
        return target
    reference = get_target("reference")
    # The int8 2:4 kernel takes 7-bit codes, what a target's quantization gives where int8 saturates.
    if not cpu_int8_saturates() or reference.unavailable_reason() is not None:
        return target
    return TargetChain([target, reference])


def _space(base: torch.fx.GraphModule, search: SearchOptions, target):
    from .space import SearchSpace, layer_groups

    knobs = set(search.knobs)
    return SearchSpace(layer_groups(base), quantize="quant" in knobs, prune="prune" in knobs,
                       lowrank="lowrank" in knobs,
                       sparsify_24="sparse24" in knobs and target.sparse24_kernels,
                       prune_ratios=tuple(search.prune_ratios))


def _workers(search: SearchOptions):
    """Ray, started once for the whole search (its seeds, bisection and sampler each run trials on it)."""
    if not search.workers:
        return contextlib.nullcontext()
    from .ray_runner import ray_session

    return ray_session(search.workers, search.num_workers)


@contextlib.contextmanager
def _optuna_quiet():
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _lower(gm: torch.fx.GraphModule, *, target, example_inputs: tuple, **kwargs) -> Callable:
    return target.lower(gm, tuple(example_inputs), **kwargs)


def _search(base, example_inputs, data: "Data", evaluate, baseline, target, space, budget, search, run_dir, reference,
            kept: "KeptFastest"):
    """The seed trials (all int8, all float), a bisection of one prune ratio, then the sampler, until
    budget_s or trials."""
    from .run import search as run_search

    deadline = time.time() + search.budget_s

    def run_until(trials: int):
        # Ray ships the target by name (built Targets need not pickle), and times no reference (never shipped).
        return run_search(base, data.calibration, evaluate, example_inputs=example_inputs,
                          target=target.name if search.workers else target, trials=trials,
                          objectives=("latency", "accuracy"), budget={"accuracy_drop": budget}, out=run_dir,
                          sampler=search.sampler, workers=search.workers, num_workers=search.num_workers,
                          distill_steps=search.distill_steps, distill_data=data.distillation,
                          warmup=search.warmup, rounds=search.rounds,
                          reference=None if search.workers else reference, space=space, progress=search.progress,
                          lut=search.lut, distill_lr=search.distill_lr, budget_s=max(0.0, deadline - time.time()),
                          canonical=True, baseline=baseline, on_built=kept, meta={"auto": True})

    front = run_until(min(2, search.trials))
    int8 = _feasible(front, space.pipeline(space.uniform("int8")))
    ratios = sorted(r for r in search.prune_ratios if r > 0)

    def try_config(config: dict, distill_steps: int | None = None) -> tuple[bool, float] | None:
        return _try(config, space, run_dir, run_until, deadline, search.trials, distill_steps)

    if int8 or time.time() >= deadline:
        quant = space.uniform("int8" if int8 else "float")
    else:
        quant = _sensitivity_seed(base, example_inputs, data, evaluate, budget, baseline, target, space, try_config)
    missed = _bisect_prune(space, ratios, quant, try_config)
    if search.recover_steps and missed is not None and missed[1] <= RECOVERABLE_MISS * budget:
        _bisect_prune(space, ratios[missed[0]:], quant, lambda config: try_config(config, search.recover_steps))
    return run_until(search.trials)


def _sensitivity_seed(base, example_inputs, data: "Data", evaluate, budget: float, baseline: float, target, space,
                      try_config) -> dict:
    """Where int8 everywhere misses the budget: int8 on every group but those holding the layers that
    quantize's accuracy control keeps float against the search's own score (its sensitivity ranking,
    then the fewest float layers that hold), as the next trial. Its quant choices when it holds (the
    bisection then prunes on top of them), else float everywhere."""
    from ..pass_base import PassContext
    from ..pipeline import Pipeline
    from ..quant.accuracy_control import AccuracyControl

    max_drop = budget / abs(baseline) if baseline else 0.0
    ctx = PassContext(example_inputs=example_inputs, calibration=data.calibration, target=target,
                      accuracy=AccuracyControl(evaluate, max_drop))
    try:
        gm = Pipeline.parse("fold_bn,quantize").run(copy.deepcopy(base), ctx)
    except OptionError as exc:  # e.g. a metric that scores the float graph twice apart
        log.info("edge: auto: no sensitivity seed (%s)", exc)
        return space.uniform("float")
    float_layers = next(r.stats for r in gm.edge_report.records if r.step.startswith("quantize"))["float_layers"]
    config = space.float_where(set(float_layers))
    tried = try_config(config)
    return config if tried is not None and tried[0] else space.uniform("float")


def _bisect_prune(space, ratios: list[float], quant: "str | dict",
                  try_config: Callable[[dict], tuple[bool, float] | None]) -> tuple[int, float] | None:
    """The largest uniform prune ratio (on every prunable group but the stem; the quant choices of `quant`)
    that holds the budget, found in about log2(len(ratios)) trials: accuracy falls as the ratio grows. A
    cheap start for the sampler, which then mixes ratios per group around it. Returns (index, accuracy
    drop) of the smallest ratio found to miss the budget; None when none did, or no trial was left."""
    groups = space.prunable_after_first()
    feasible, infeasible, missed = -1, len(ratios), None
    while groups and infeasible - feasible > 1:
        middle = (feasible + infeasible + 1) // 2
        tried = try_config(space.pruned(ratios[middle], groups, quant))
        if tried is None:  # out of time or trials
            return None
        held, drop = tried
        if held:
            feasible = middle
        else:
            infeasible, missed = middle, (middle, drop)
    return missed


def _try(config: dict, space, run_dir: Path, run_until, deadline: float, trials: int,
         distill_steps: int | None = None) -> tuple[bool, float] | None:
    """(whether `config` holds the budget, its accuracy drop), measured as the next trial (with
    `distill_steps` of distillation, when not the search's); None when no trial is left."""
    from .engine import DISTILL_STEPS
    from .study import done_count, open_study, storage_for

    study = open_study(storage_for(run_dir), ["minimize", "maximize"])
    done = done_count(study)
    if time.time() >= deadline or done >= trials:
        return None
    study.enqueue_trial(config, user_attrs={DISTILL_STEPS: distill_steps} if distill_steps else None)
    number = len(study.trials) - 1
    point = next((p for p in run_until(done + 1).all_points if p.trial == number), None)
    return (False, float("inf")) if point is None else (point.feasible, point.accuracy_drop)


def _feasible(front, pipeline: str) -> bool:
    return any(p.pipeline == pipeline and p.feasible for p in front.all_points)


def _front_row(point) -> dict:
    return {"trial": point.trial, "pipeline": point.pipeline, "speedup_vs_fp32": point.speedup,
            "latency_ms": point.latency_ms, "score": point.accuracy, "drop": point.accuracy_drop}


@dataclass
class KeptFastest:
    """The fastest candidate within the budget that this process built, kept (graph and program) so that
    the pick is not built again: its flash distillation alone takes minutes."""
    baseline: float
    budget: float
    best: tuple | None = None   # (Measurement, graph, program, distillation stats)

    def __call__(self, measurement, gm, program, distilled) -> None:
        if self.baseline - measurement.accuracy > self.budget:
            return
        if self.best is None or _speed(measurement) > _speed(self.best[0]):
            self.best = (measurement, gm, program, distilled)

    def get(self, pipeline: str) -> tuple | None:
        return self.best if self.best is not None and self.best[0].pipeline == pipeline else None


def _speed(measurement) -> float:
    """Speed-up over the reference timed in the same rounds, else 1 / ms (Ray trials time no reference)."""
    if measurement.reference_ms:
        return measurement.reference_ms / measurement.latency_ms
    return 1.0 / measurement.latency_ms


def _first_within(front, budget, kept: KeptFastest, base, example_inputs, data: "Data", evaluate, target, search,
                  space, run_dir, lower):
    """(graph, program, point, score, distillation stats) of the fastest front point within the budget: the
    one this process kept, or else (Ray workers, a resumed search) rebuilt and scored again, taking the next
    point when a rebuilt one misses the budget."""
    from ..pipeline import PassRecord, PipelineReport
    from .evaluate import Evaluator
    from .study import trial_params

    candidates = front.ranked(max_accuracy_drop=budget)
    if candidates and kept.get(candidates[0].pipeline):
        measurement, gm, program, distilled = kept.get(candidates[0].pipeline)
        gm.edge_report = PipelineReport(measurement.pipeline, [PassRecord(**r) for r in measurement.passes])
        return gm, program, candidates[0], measurement.accuracy, distilled
    evaluator = Evaluator(base, example_inputs, data.calibration, eval_fn=evaluate, target=target,
                          distill_steps=search.distill_steps, distill_data=data.distillation,
                          distill_lr=search.distill_lr, canonical=True)
    for point in candidates:
        head, tail = space.split({**space.uniform("float"), **trial_params(run_dir, point.trial)}, True)
        gm, records, distilled = evaluator.compress(head, tail, (point.distill or {}).get("steps"))
        program = lower(gm)
        score = evaluate(program)
        if front.baseline_accuracy - score <= budget:
            gm.edge_report = PipelineReport(point.pipeline, [PassRecord(**r) for r in records])
            return gm, program, point, score, distilled
        log.warning("edge: auto: trial %d (%s) scored %.4g when rebuilt, outside the budget (%.4g at most %.4g "
                    "below the float %.4g); trying the next front point", point.trial, point.pipeline, score,
                    front.baseline_accuracy - budget, budget, front.baseline_accuracy)
    return None


def _record_reference(run_dir: Path, result: AutoResult, reference) -> None:
    """The float program's figures from the final comparison, for `edgepasses report` on the run directory
    (its plot's float point, its speed-ups' reference)."""
    from .study import write_meta

    timing = result.latency_ms[FP32]
    write_meta(run_dir, {"reference": {"label": FP32, "latency_ms": timing["median"], "latency_min_ms": timing["min"],
                                       "latency_max_ms": timing["max"], "accuracy": result.baseline,
                                       "size_mb": reference.edge_lowering.weights_mb}})


def _warn_failures(run_dir: Path) -> None:
    from optuna.trial import TrialState

    from .study import STUDY_NAME, storage_for
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(run_dir))
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in t.user_attrs]
    if failed:
        log.warning("edge: auto: %d of %d trials failed (the search went on without them); the first, %s: %s",
                    len(failed), len(study.trials), failed[0].user_attrs.get("pipeline"),
                    failed[0].user_attrs["error"].splitlines()[0])


def _warn_float(front, result: AutoResult, budget: float) -> None:
    if not front.all_points:
        log.warning("edge: auto: no search trial finished within budget_s=%g s (%s); the float program runs: give "
                    "the search more time (search={'budget_s': ...})", result.budget_s, result.run_dir)
        return
    best = min(front.all_points, key=lambda p: p.accuracy_drop)
    log.warning("edge: auto: none of %d candidates kept %s within max_drop=%g of the float model's %.4g (the "
                "closest, %s, lost %.4g); the float program runs: allow a larger max_drop, a longer search, or "
                "another metric", len(front.all_points), result.metric, result.max_drop, result.baseline,
                best.pipeline, best.accuracy_drop)


def _confirm(result: AutoResult, program, reference, base, example_inputs, batches, evaluate, search) -> None:
    """The result timed beside the float program on the target (and OpenVINO fp32 and NNCF int8 where
    they are installed) in one interleaved run; their scores too."""
    from .evaluate import time_programs

    programs = {AUTO: program, FP32: reference, **(_peers(base, example_inputs, batches, result.target)
                                                   if search.compare else {})}
    timings = time_programs({name: (lambda fn=fn: fn(*example_inputs)) for name, fn in programs.items()},
                            search.warmup, search.confirm_rounds)
    result.latency_ms = {name: {"median": t.median_ms, "min": t.min_ms, "max": t.max_ms}
                         for name, t in timings.items()}
    result.scores = {name: evaluate(fn) for name, fn in programs.items() if name != AUTO}
    result.scores[AUTO] = result.score


def _peers(base, example_inputs, batches, resolved_target: str) -> dict[str, Callable]:
    """OpenVINO fp32 (where the target is not OpenVINO itself) and NNCF int8 of the float graph."""
    try:
        from ..measure.peers import nncf_int8, openvino_direct
    except ImportError as exc:
        log.warning("edge: auto: compare=True needs openvino and nncf (%s); only the float program is timed "
                    "beside the result", exc)
        return {}
    model_type = "TRANSFORMER" if _has_attention(base) else None
    on_openvino = resolved_target.split(",")[0] == "openvino"  # "openvino,reference": mixed placement
    peers = {} if on_openvino else {"openvino fp32": openvino_direct(base, example_inputs)}
    peers["nncf int8"] = nncf_int8(base, example_inputs, batches, model_type=model_type)
    return peers


def _has_attention(gm: torch.fx.GraphModule) -> bool:
    """Whether NNCF's TRANSFORMER preset is the fair peer: the graph has softmax or fused attention."""
    names = ("softmax", "scaled_dot_product")
    return any(node.op == "call_function" and any(n in str(node.target) for n in names) for node in gm.graph.nodes)
