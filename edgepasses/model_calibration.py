"""Calibrating every graph Dynamo hands the backend, whatever its inputs.

The `calibration` option holds inputs of the *model*. When Dynamo splits the model into several
graphs (a graph break, or a recompile after a guard fails), a later graph's inputs are whatever
Python computed between graphs, so the model's inputs cannot calibrate it directly. The backend
therefore compiles in two phases:

1. Each graph is first handed back as a `DeferredGraph`. On its first call, the calibration set
   runs through the whole compiled model (re-entering the `torch.compile` wrapper the user called),
   while every graph still waiting runs in float and records the inputs it really receives.
2. Then each waiting graph compresses and lowers with its own recorded inputs as calibration data,
   and the call that started it all goes on through the compiled program.

One `ModelCalibration` serves one `torch.compile(...)` call (keyed by Dynamo's callback for it), so
graphs compiled later (a new branch, a new shape) calibrate the same way on their first call.
"""
from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from .errors import EdgeError, OptionError
from .quant.calibration import as_batch, check_finite
from .state import state_kept

log = logging.getLogger("edgepasses")



@dataclass(frozen=True)
class GraphOrigin:
    """Where a graph sits in the model: its number (from 1) and why Dynamo ended it, if it broke."""
    index: int
    graph_break: str | None = None   # Dynamo's explanation and the user's line, when the graph ends at a break

    def __str__(self) -> str:
        return f"graph {self.index}" + (f" (ends at a graph break: {self.graph_break})" if self.graph_break else "")


def graph_break_of(gm: torch.fx.GraphModule) -> str | None:
    """Dynamo's reason for ending `gm` early and the user's line, or None if the graph ran to the end."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not reason.graph_break:
        return None
    explanation = next((ln.strip() for ln in reason.reason.splitlines() if ln.strip().startswith("Explanation:")),
                       "")
    first = reason.reason.strip().splitlines()[0] if reason.reason.strip() else "graph break"
    where = reason.user_stack[-1] if reason.user_stack else None
    line = f'File "{where.filename}", line {where.lineno}, in {where.name}' if where else "source line unknown"
    return f"{first}{' — ' + explanation if explanation else ''} at {line}"


def _dynamo_entry_frame():
    """The frame of the innermost `torch.compile` wrapper being run, or None outside one."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith("_dynamo/eval_frame.py"):
            return frame
        frame = frame.f_back
    return None


@dataclass
class DeferredGraph:
    """A graph that compiles once the calibration set has shown it its real inputs."""
    model: "ModelCalibration"
    origin: GraphOrigin
    user_positions: list[int]
    run_float: Callable                         # Dynamo's graph as it is (all its inputs)
    compile_with: Callable[[list[tuple]], Callable]  # recorded batches -> the compiled program
    recorded: list[tuple] = field(default_factory=list)
    compiled: Callable | None = None
    candidate: Callable | None = None           # runs in its place while a metric scores it

    def __call__(self, *args):
        if self.candidate is not None:
            return self.candidate(*args)
        if self.compiled is None:
            if self.model.trying:  # a metric scores another graph: this one in float, recording nothing
                return self.run_float(*args)
            if self.model.running:
                self.recorded.append(tuple(args[i].detach().clone() if isinstance(args[i], torch.Tensor)
                                           else args[i] for i in self.user_positions))
                return self.run_float(*args)
            self.model.calibrate()
        return self.compiled(*args)

    def finish(self, unlike: str = "") -> None:
        """Compile with the recorded batches; `unlike`: how the first batch differs from the call, the
        likely reason when none reached this graph."""
        if not self.recorded:
            raise OptionError(
                f"{self.origin} of the model was not reached by any calibration batch"
                f"{f' (batch 0: {unlike})' if unlike else ''}: add batches that take this call's path "
                "(branch, sizes), or compile with dynamic=True")
        self.compiled = self.compile_with(self.recorded)
        self.recorded = []


class ModelCalibration:
    """The graphs of one `torch.compile(model, backend="edge")` call, and its calibration set."""

    def __init__(self, calibration, entry: Callable[[], Callable]):
        self.calibration = calibration
        self.entry = entry          # -> the compiled model, callable like the user's own call
        self.graphs = 0
        self.breaks: list[str] = []
        self.waiting: list[DeferredGraph] = []
        self.running = False
        self.trying = False
        self.state: list[torch.Tensor] = []  # buffers the graphs write: calibration leaves them as they were

    def next_origin(self, gm: torch.fx.GraphModule) -> GraphOrigin:
        self.graphs += 1
        origin = GraphOrigin(self.graphs, graph_break_of(gm))
        if origin.graph_break:
            self.breaks.append(origin.graph_break)
        return origin

    def defer(self, origin: GraphOrigin, user_positions: list[int], run_float: Callable,
              compile_with: Callable[[list[tuple]], Callable], state: list[torch.Tensor] = ()) -> DeferredGraph:
        """`state`: the buffers the graph writes (the model's own tensors)."""
        graph = DeferredGraph(self, origin, user_positions, run_float, compile_with)
        self.state += [t for t in state if not any(t is kept for kept in self.state)]
        self.waiting.append(graph)
        return graph

    def trial(self, graph: DeferredGraph, candidate: Callable, measure: Callable[[Callable], float]) -> float:
        """`measure` of the whole compiled model with `candidate` running in `graph`'s place."""
        graph.candidate, self.trying = candidate, True
        try:
            return measure(self.entry())
        finally:
            graph.candidate, self.trying = None, False

    def calibrate(self) -> None:
        """Run the calibration set through the whole model, then compile every waiting graph. Buffers
        the graphs write hold the same values after as before (tensor state only: Python attributes the
        model changes between graphs are the model's own business)."""
        with state_kept(self.state):
            self._calibrate(_current_call())

    def _calibrate(self, call: tuple[tuple, dict] | None) -> None:
        model = self.entry()
        self.running = True
        try:
            batches, first = 0, None
            # In the grad mode of the call that started it: Dynamo guards on it, and under another mode
            # the batches would reach a recompiled graph instead of the graphs waiting here.
            for batches, batch in enumerate(self.calibration, start=1):
                first = batch if first is None else first
                _check_finite(batches - 1, batch)
                _call_naming_batch(model, batch, batches - 1, call)
        finally:
            self.running = False
        if batches == 0:
            raise OptionError("the calibration iterable is empty")
        log.info("edge: %d calibration batch(es) ran through the model: %d graph(s), %d graph break(s)%s",
                 batches, self.graphs, len(self.breaks), "".join(f"\n  - {b}" for b in self.breaks))
        for graph in list(self.waiting):  # one that fails stays waiting, to fail the same way next call
            graph.finish(_unlike_call(first, call))
            self.waiting.remove(graph)


def _check_finite(index: int, batch: Any) -> None:
    """A model's calibration batch with NaN/Inf is refused before it runs, named as the user wrote it
    (after a graph break, a graph's own inputs would be numbered differently)."""
    named = batch.items() if isinstance(batch, dict) else enumerate(as_batch(batch))
    for name, value in named:
        for leaf in pytree.tree_leaves(value):
            check_finite(leaf, f"calibration batch {index}, input {name!r}" if isinstance(name, str)
                         else f"calibration batch {index}, input {name}")


def _current_call() -> tuple[tuple, dict] | None:
    """(args, kwargs) of the user's call into the compiled model that is running, or None."""
    frame = _dynamo_entry_frame()
    return None if frame is None else (frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}))


def _describe(value: Any) -> str:
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _unlike_call(batch: Any, call: tuple[tuple, dict] | None) -> str:
    """How a batch differs from the call that started calibration ("" when it does not, or when they
    cannot be compared): the likely reason it failed. Batches may legitimately take other shapes or
    branches (with dynamic=False each compiles its own graph), so this is said only on a failure."""
    if call is None:
        return ""
    args, kwargs = call
    if isinstance(batch, dict):
        pairs = [(repr(k), v, kwargs[k]) for k, v in batch.items() if k in kwargs]
    else:
        batch = as_batch(batch)
        if kwargs:  # called with keywords, calibrated positionally: nothing to compare one to one
            return ""
        if len(batch) != len(args):
            return f"it has {len(batch)} input(s) where the call has {len(args)}"
        pairs = [(str(i), got, want) for i, (got, want) in enumerate(zip(batch, args))]
    for name, got, want in pairs:
        if isinstance(want, torch.Tensor) and not (isinstance(got, torch.Tensor) and got.shape == want.shape
                                                   and got.dtype == want.dtype):
            return f"its input {name} is {_describe(got)} where the call has {_describe(want)}"
    return ""


def _call_naming_batch(model: Callable, batch: Any, index: int, call: tuple[tuple, dict] | None) -> None:
    """One calibration batch into the model; a failure names the batch and how it differs from the call."""
    try:
        _call(model, batch)
    except Exception as exc:  # the model's own code, or a graph compiled for it: any type
        unlike = _unlike_call(batch, call)
        if isinstance(exc, EdgeError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        first = first if len(first) <= 120 else first[:117] + "..."
        raise OptionError(f"calibration batch {index} failed in the model{f' ({unlike})' if unlike else ''}: "
                          f"{type(exc).__name__}: {first} (each batch is a tuple of the model's inputs, or a dict of "
                          "keyword arguments, like the calls)") from exc


def _call(model: Callable, batch: Any) -> None:
    """One calibration batch into the model: a dict as keyword arguments, else positional ones."""
    if isinstance(batch, dict):
        model(**batch)
    else:
        model(*as_batch(batch))


# One ModelCalibration per Dynamo callback: that is, per torch.compile(...) call.
_BY_CALLBACK: "weakref.WeakKeyDictionary[Any, ModelCalibration]" = weakref.WeakKeyDictionary()


def for_current_compile(calibration) -> ModelCalibration | None:
    """The ModelCalibration of the torch.compile call whose graph is being compiled; None when the
    backend is called outside a torch.compile wrapper (then calibration batches are the graph's inputs)."""
    frame = _dynamo_entry_frame()
    if frame is None:
        return None
    callback = frame.f_locals["callback"]
    found = _BY_CALLBACK.get(callback)
    if found is None:
        context, fn = frame.f_locals["self"], frame.f_locals["fn"]
        # The wrapper built again from the same Dynamo context runs with the same callback, so it reuses
        # the graphs compiled so far and hands new ones to the same ModelCalibration.
        found = _BY_CALLBACK[callback] = ModelCalibration(calibration, lambda: context(fn))
    return found
