"""The Pareto front of finished trials, and picking a point from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .objectives import OBJECTIVES


@dataclass
class Point:
    trial: int
    pipeline: str
    target: str
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    size_mb: float
    accuracy: float
    accuracy_drop: float
    feasible: bool
    reference_ms: float | None = None
    passes: list[dict[str, Any]] = field(default_factory=list, repr=False)
    fallbacks: list[str] = field(default_factory=list, repr=False)
    distill: dict[str, Any] | None = field(default=None, repr=False)
    load_avg: float | None = None

    @property
    def speedup(self) -> float | None:
        """The reference's median over the same interleaved rounds / this point's, when timed with one."""
        return self.reference_ms / self.latency_ms if self.reference_ms else None

    @property
    def options(self) -> dict[str, Any]:
        """torch.compile(model, backend="edge", options=point.options) — add "calibration" when the
        pipeline quantizes or is data-aware."""
        return {"pipeline": self.pipeline, "target": self.target}

    @classmethod
    def from_trial(cls, trial: Any, target: str, baseline_accuracy: float) -> "Point":
        a = trial.user_attrs
        return cls(trial.number, a["pipeline"], target, a["latency_ms"], a["latency_min_ms"], a["latency_max_ms"],
                   a["size_mb"], a["accuracy"], baseline_accuracy - a["accuracy"],
                   all(c <= 0 for c in a.get("constraints", [])), a.get("reference_ms"),
                   a.get("passes", []), a.get("fallbacks", []), a.get("distill"),
                   a.get("load_avg"))


def timed_with_reference(points: list[Point]) -> bool:
    """Whether latency can be compared as speed-up over the reference timed in each point's own rounds."""
    return bool(points) and all(p.speedup for p in points)


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


@dataclass
class Front:
    points: list[Point]                 # the Pareto-optimal feasible points, fastest first (vs the reference)
    all_points: list[Point]             # every finished trial
    objectives: tuple[str, ...]
    baseline_accuracy: float
    reference: dict[str, Any] | None = None  # e.g. NNCF int8: latency, size, accuracy

    @classmethod
    def from_points(cls, points: list[Point], objectives: tuple[str, ...], baseline_accuracy: float,
                    reference: dict[str, Any] | None = None) -> "Front":
        feasible = [p for p in points if p.feasible]
        # Latency relative to the reference timed in the same rounds when every trial has one (see pick).
        relative = timed_with_reference(feasible)

        def value(p: Point, attr: str) -> float:
            return 1 / p.speedup if attr == "latency_ms" and relative else getattr(p, attr)

        def key(p: Point) -> list[float]:
            return [value(p, OBJECTIVES[o][0]) * (-1 if OBJECTIVES[o][1] == "maximize" else 1) for o in objectives]

        front = [p for p in feasible if not any(_dominates(key(q), key(p)) for q in feasible)]
        seen, unique = set(), []
        for p in sorted(front, key=lambda p: (value(p, "latency_ms"), -p.accuracy)):
            if p.pipeline not in seen:
                seen.add(p.pipeline)
                unique.append(p)
        return cls(unique, points, objectives, baseline_accuracy, reference)

    def ranked(self, max_accuracy_drop: float | None = None, max_latency_ms: float | None = None,
               max_size_mb: float | None = None) -> list[Point]:
        """The front points within the limits (accuracy drop in eval_fn's units: points for %), fastest first.

        Fastest relative to the reference timed in the same rounds when every candidate has one: trials
        run minutes apart under whatever else loads the machine, and the ratio does not drift with it."""
        ok = [p for p in self.points
              if (max_accuracy_drop is None or p.accuracy_drop <= max_accuracy_drop)
              and (max_latency_ms is None or p.latency_ms <= max_latency_ms)
              and (max_size_mb is None or p.size_mb <= max_size_mb)]
        if timed_with_reference(ok):
            return sorted(ok, key=lambda p: (-p.speedup, -p.accuracy))
        return sorted(ok, key=lambda p: (p.latency_ms, -p.accuracy))

    def pick(self, max_accuracy_drop: float | None = None, max_latency_ms: float | None = None,
             max_size_mb: float | None = None) -> Point:
        """The fastest front point within the limits (see `ranked`)."""
        ok = self.ranked(max_accuracy_drop, max_latency_ms, max_size_mb)
        if not ok:
            raise ValueError(f"no front point within max_accuracy_drop={max_accuracy_drop}, "
                             f"max_latency_ms={max_latency_ms}, max_size_mb={max_size_mb}; front: "
                             + "; ".join(f"{p.latency_ms:.3g} ms, drop {p.accuracy_drop:.3g}" for p in self.points))
        return ok[0]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)
