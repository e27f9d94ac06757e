"""Objectives and budgets: what a trial's measurement is scored on, and the hard constraints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OBJECTIVES = {"latency": ("latency_ms", "minimize"), "accuracy": ("accuracy", "maximize"),
              "size": ("size_mb", "minimize")}
BUDGETS = ("latency_ms", "size_mb", "accuracy_drop")  # each an upper bound


def parse_objectives(text: "str | tuple[str, ...] | list[str]") -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",")) if isinstance(text, str) else tuple(text)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"objectives are distinct names of {', '.join(OBJECTIVES)}; got {names}")
    return names


def parse_budget(items: "dict[str, float] | list[str] | None") -> dict[str, float]:
    """`["latency_ms=3", "accuracy_drop=1"]` or a dict -> {name: upper bound}."""
    if not items:
        return {}
    if isinstance(items, dict):
        budget = {k: float(v) for k, v in items.items()}
    else:
        budget = {}
        for item in items:
            for part in item.split(","):
                key, sep, value = part.partition("=")
                if not sep:
                    raise ValueError(f"a budget is NAME=VALUE ({', '.join(BUDGETS)}); got {part!r}")
                budget[key.strip()] = float(value)
    unknown = [k for k in budget if k not in BUDGETS]
    if unknown:
        raise ValueError(f"unknown budget(s) {', '.join(unknown)}; valid: {', '.join(BUDGETS)} (upper bounds)")
    return budget


@dataclass(frozen=True)
class Scoring:
    objectives: tuple[str, ...]
    budget: dict[str, float]
    baseline_accuracy: float

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][1] for o in self.objectives]

    def values(self, m: dict[str, Any]) -> list[float]:
        return [float(m[OBJECTIVES[o][0]]) for o in self.objectives]

    def constraints(self, m: dict[str, Any]) -> list[float]:
        """Optuna's convention: feasible when every value is <= 0."""
        measured = {"latency_ms": m["latency_ms"], "size_mb": m["size_mb"],
                    "accuracy_drop": self.baseline_accuracy - m["accuracy"]}
        return [float(measured[k] - bound) for k, bound in sorted(self.budget.items())]


def constraints_func(trial: Any) -> list[float]:
    return trial.user_attrs.get("constraints", [])
