"""Latency measurement that compares candidates fairly on a noisy, shared machine.

Candidates are timed interleaved: each round calls every candidate once, in an order rotated
by one each round. Drift in machine load (other jobs, frequency scaling) then hits all
candidates alike instead of whichever happened to be timed during a busy stretch, and no
candidate always runs right after the same neighbour (cache and thread-pool warmth).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    samples: tuple[float, ...]  # milliseconds, in the order measured

    @classmethod
    def of(cls, samples_ms: list[float]) -> "Timing":
        return cls(statistics.median(samples_ms), min(samples_ms), max(samples_ms), tuple(samples_ms))


def rotated(names: list[str], shift: int) -> list[str]:
    """`names` rotated left by `shift`, so each candidate takes each position in turn."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def measure_side_by_side(candidates: dict[str, Callable[[], Any]], warmup: int, rounds: int, *,
                         on_round: Callable[[], None] | None = None, settle: int = 0) -> dict[str, Timing]:
    """Warm each candidate up `warmup` times, then time `rounds` interleaved rounds.

    `on_round` is called after each timed round (progress display) and is not timed. `settle`: untimed
    calls of a candidate right before its timed one, for candidates of different runtimes in one process:
    the worker threads one runtime leaves spinning after a call (PyTorch's OpenMP, TVM's pool) otherwise
    take the cores from the next candidate, whose time then carries its predecessor's habits.
    """
    if not candidates or rounds < 1 or warmup < 0:
        raise ValueError(f"need at least one candidate, rounds >= 1 and warmup >= 0; got "
                         f"{len(candidates)} candidates, rounds={rounds}, warmup={warmup}")
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                candidates[name]()
        for round_index in range(rounds):
            for name in rotated(names, round_index):
                for _ in range(settle):
                    candidates[name]()
                start = time.perf_counter()
                candidates[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
            if on_round is not None:
                on_round()
    return {name: Timing.of(samples[name]) for name in names}
