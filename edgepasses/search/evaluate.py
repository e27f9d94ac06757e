"""Building and measuring one candidate: compress with a pipeline, lower to the target, then latency
(interleaved rounds, median), size (`edge_lowering.weights_mb`) and accuracy (the user's `eval_fn`,
or output SQNR vs the float model as a proxy)."""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..canonical import export_canonical
from ..pass_base import PassContext
from ..pipeline import Pipeline

EvalFn = Callable[[Callable[..., torch.Tensor]], float]


@dataclass
class Measurement:
    pipeline: str
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    size_mb: float
    accuracy: float
    reference_ms: float | None = None   # the reference timed in the same interleaved rounds
    fallbacks: list[str] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)  # PipelineReport records
    distill: dict[str, Any] | None = None
    build_s: float = 0.0

    def to_attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def time_programs(programs: dict[str, Callable[[], Any]], warmup: int, rounds: int):
    from ..measure.timing import measure_side_by_side

    return measure_side_by_side(programs, warmup, rounds)


class Evaluator:
    """Holds the exported model once; `measure(pipeline)` builds, lowers and measures a candidate."""

    def __init__(self, model: torch.nn.Module, example_inputs: tuple, data: Sequence[tuple], *,
                 eval_fn: EvalFn | None = None, target: str = "openvino", warmup: int = 2, rounds: int = 5,
                 distill_steps: int = 0, distill_data: Sequence | None = None,
                 reference: Callable[..., Any] | None = None, distill_lr: float = 1e-4, canonical: bool = False,
                 on_built: Callable[..., None] | None = None):
        """`canonical`: `model` is a canonical GraphModule already (the `edge` backend's graph), not exported
        again. `on_built(measurement, graph, program, distilled)` hears of every measured candidate (auto keeps
        the one it will pick rather than build it again)."""
        from ..backends import get_target

        if canonical:  # an exported graph refuses .eval(); its modules say training (distill checks it)
            for module in model.modules():
                module.training = False
        self.model, self.example_inputs = (model if canonical else model.eval()), tuple(example_inputs)
        self.data = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
        self.target = get_target(target) if isinstance(target, str) else target  # a name, or a built Target
        self.eval_fn, self.target_name = eval_fn, self.target.name
        self.warmup, self.rounds = warmup, rounds
        self.distill_steps, self.distill_lr = distill_steps, distill_lr
        self.distill_data = list(distill_data) if distill_data is not None else [b[0] for b in self.data]
        self.reference, self.on_built = reference, on_built
        with torch.no_grad():
            self.base = model if canonical else export_canonical(self.model, self.example_inputs)

    def accuracy(self, fn: Callable[..., Any]) -> float:
        if self.eval_fn is not None:
            return float(self.eval_fn(fn))
        from ..quant.sensitivity import output_sqnr

        return output_sqnr(self.model, fn, self.data)

    def baseline_accuracy(self) -> float:
        return self.accuracy(self.model)

    def _run(self, gm: torch.fx.GraphModule, pipeline: str) -> torch.fx.GraphModule:
        ctx = PassContext(example_inputs=self.example_inputs, calibration=self.data, target=self.target)
        with torch.no_grad():
            return Pipeline.parse(pipeline).run(gm, ctx)

    def compress(self, head: str, tail: str | None = None,
                 distill_steps: int | None = None) -> tuple[torch.fx.GraphModule, list, dict | None]:
        """Run `head`, flash-distil (when asked and `head` changed the structure), then `tail`;
        `distill_steps`: this candidate's distillation length, when not the evaluator's."""
        gm = self._run(copy.deepcopy(self.base), head)
        records = [dataclasses.asdict(r) for r in gm.edge_report.records]
        distilled = None
        steps = self.distill_steps if distill_steps is None else distill_steps
        if steps and any(s.name in ("prune", "lowrank", "sparsify_24") for s in Pipeline.parse(head)):
            from ..distill import distill

            # Seeded: the same candidate again (auto rebuilds the one it picks); gradients even when the
            # caller runs under no_grad (the edge backend compiles under it).
            with torch.random.fork_rng(), torch.enable_grad():
                torch.manual_seed(0)
                gm = distill(gm, self.model, self.distill_data, steps=steps, lr=self.distill_lr)
            distilled = dict(gm.edge_distill)
        if tail:
            gm = self._run(gm, tail)
            records += [dataclasses.asdict(r) for r in gm.edge_report.records]
        return gm, records, distilled

    def measure(self, head: str, tail: str | None = None, distill_steps: int | None = None) -> Measurement:
        start = time.perf_counter()
        gm, records, distilled = self.compress(head, tail, distill_steps)
        program = self.target.lower(gm, self.example_inputs)
        build_s = time.perf_counter() - start
        lowering = program.edge_lowering
        programs = {"candidate": lambda: program(*self.example_inputs)}
        if self.reference is not None:
            programs["reference"] = lambda: self.reference(*self.example_inputs)
        timings = time_programs(programs, self.warmup, self.rounds)
        t = timings["candidate"]
        pipeline = str(Pipeline.parse(head + ("," + tail if tail else "")))
        measurement = Measurement(pipeline, t.median_ms, t.min_ms, t.max_ms, lowering.weights_mb,
                                  self.accuracy(program),
                                  timings["reference"].median_ms if "reference" in timings else None,
                                  [str(f) for f in lowering.fallbacks], records, distilled, build_s)
        if self.on_built is not None:
            self.on_built(measurement, gm, program, distilled)
        return measurement
