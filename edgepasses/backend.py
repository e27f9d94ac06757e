"""The torch.compile backend `edge` (entry point `torch_dynamo_backends`).

    Dynamo graph -> freeze weights -> canonical form -> pipeline -> target lowering

Only inference graphs compile. Dynamo's `example_inputs` give shapes only; calibration
data comes from the `calibration` option and nowhere else: those are inputs of the model, which
reach each of Dynamo's graphs by running through the model (`model_calibration.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import operator
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
import torch.fx

from . import model_calibration
from .canonical import (FROZEN_NUMBERS, WEIGHT_PATHS, check_no_grad_inputs, export_canonical_graph, frozen_copy,
                        is_dynamo_weight, source_path)
from .dynamic_shapes import describe, dynamic_dims, dynamo_input_shapes, range_check
from .errors import GradientsNeededError, NonFiniteInputError, OptionError, StaleWeightsError
from .graph_utils import drop_export_guards, dynamo_caches_kept
from .model_calibration import GraphOrigin
from .pass_base import PassContext, build_options, option
from .pipeline import DEFAULT_PIPELINE, Pipeline, PipelineReport
from .progress import warnings_held_back
from .state import remember_user_paths, written_buffers

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class EdgeOptions:
    """The options of `torch.compile(model, backend="edge", options={...})`."""

    pipeline: str = option(DEFAULT_PIPELINE, "The passes to run: pass names and presets, comma-separated, "
                                             "each pass with its options: 'fold_bn,quantize(bits=8)'.")
    target: str = option("auto", "Where the graph runs: a target, or an ordered list such as "
                                 "'tensorrt,openvino,reference' (each partition goes to the first that runs "
                                 "all its ops); auto: the list of those installed here.")
    target_options: Any = option(None, "Per target, the keywords it is built with: "
                                       "{'tvm': {'trials': 64, 'time_limit_s': 600}}.")
    calibration: Any = option(None, "The model's example input tuples (or dicts of keyword arguments), a list: "
                                    "what quantize and the data-aware passes observe.")
    strict: bool = option(False, "Raise, naming op, node and source line, instead of running an op the target "
                                 "cannot run in PyTorch.")
    verify: bool = option(False, "Lint the graph and propagate fake tensors again after every pass; at call "
                                 "time, refuse NaN/Inf inputs (a program need not propagate them as eager does).")
    precision: Literal["f32", "bf16"] = option("f32", "The inference precision set on the runtime (and read back "
                                                      "into the report).")
    cache_dir: str | os.PathLike | None = option(None, "A directory for the compile cache (`<cache_dir>/compiled/"
                                                       "<key>/`) and the targets' own caches; none: nothing is "
                                                       "written.")
    allow_training: bool = option(False, "Run a graph that needs gradients uncompiled in PyTorch, with a WARNING, "
                                         "instead of refusing it.")
    on_compile: Any = option(None, "Called with an EdgeCompilation (pipeline report, lowering, seconds, cache hit) "
                                   "after each graph compiles.")
    metric: Any = option(None, "metric(model) -> float, higher is better: your validation, called with the "
                               "compiled model; quantize keeps layers in float until it holds, pipeline='auto' "
                               "searches against it (needs calibration).")
    max_drop: float = option(0.01, "With a metric or pipeline='auto': the share of the float model's score it may "
                                   "lose.")
    search: Any = option(None, "pipeline='auto' only: the search's settings, e.g. {'budget_s': 600} "
                               "(docs/search.md).")

    def __post_init__(self):
        from .backends import parse_target_names

        parse_target_names(self.target)
        if self.target_options is not None and not isinstance(self.target_options, dict):
            raise OptionError(f"target_options must be a dict of per-target options such as "
                              f"{{'tvm': {{'trials': 64}}}}; got {self.target_options!r}")
        from .quant.accuracy_control import check_max_drop, check_metric

        check_max_drop(self.max_drop)
        if self.metric is not None:
            check_metric(self.metric)
            if self.calibration is None:
                raise OptionError("metric needs calibration data: pass calibration=[...] too")
        _check_calibration(self.calibration)
        _check_auto(self)
        if self.on_compile is not None and not callable(self.on_compile):
            raise OptionError(f"on_compile must be a callable taking an EdgeCompilation (e.g. a list's append); "
                              f"got {self.on_compile!r} ({type(self.on_compile).__name__})")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", _checked_cache_dir(self.cache_dir))


def _check_calibration(calibration) -> None:
    if calibration is None:
        return
    expected = ("calibration must be a list of the model's input tuples (or dicts of keyword arguments), "
                "e.g. [(x1,), (x2,)]")
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise OptionError(f"{expected}; got {calibration!r:.80} ({type(calibration).__name__})")
    if iter(calibration) is calibration:
        # Dynamo may compile several graphs, and each would find an iterator already used up.
        raise OptionError(f"{expected}, re-iterable: not an iterator or generator (wrap it in list(...))")


def _check_auto(opts: "EdgeOptions") -> None:
    from .search.auto import AUTO, parse_search

    if opts.pipeline != AUTO:
        if opts.search is not None:
            raise OptionError(f"search settings apply to pipeline='auto'; the pipeline is {opts.pipeline!r}")
        return
    if opts.calibration is None:
        raise OptionError("pipeline='auto' needs calibration=[...] (the model's input tuples): the search "
                          "calibrates, distils and, without a metric, scores on them")
    object.__setattr__(opts, "search", parse_search(opts.search))


def _checked_cache_dir(cache_dir: str | os.PathLike) -> str:
    """`cache_dir` as a str; refused when it exists and is not a directory (compiling would fail there)."""
    path = os.fspath(cache_dir)
    if not path:
        raise OptionError("cache_dir must name a directory; got an empty path (pass None for no cache)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"cache_dir {path!r} is a file, not a directory: name a directory (it is created "
                          "if missing) or pass None for no cache")
    return path


@dataclass(frozen=True)
class EdgeCompilation:
    """What one compile did: the pipeline report, the target's lowering, and the wall time."""
    report: Any        # pipeline.PipelineReport (on a cache hit: of the compile that stored the entry)
    lowering: Any      # backends.Lowering
    seconds: float
    cache: Literal["hit", "miss"] | None = None  # None: no cache_dir, so no compile cache
    cache_entry: str | None = None               # the entry's directory (on a miss: where it was stored)
    graph: GraphOrigin = GraphOrigin(1)          # which of the model's graphs, and the break that ends it
    auto: Any = None                             # pipeline="auto": the search.auto.AutoResult
    dynamic: tuple = ()                          # dynamic_shapes.DynamicDim: the inputs' dynamic dims, ranges


def parse_options(options: dict | None) -> EdgeOptions:
    if options is not None and not isinstance(options, Mapping):
        hint = f" (options={{'pipeline': {options!r}}}?)" if isinstance(options, str) else ""
        raise OptionError(f"torch.compile(backend='edge') options must be a dict such as "
                          f"{{'pipeline': 'fold_bn,quantize', 'target': 'openvino'}}; got {options!r:.80} "
                          f"({type(options).__name__}){hint}")
    return build_options(EdgeOptions, options or {}, where="torch.compile(backend='edge')")


def _numbers_check(frozen: torch.fx.GraphModule, placeholders: list[torch.fx.Node]) -> Callable[[tuple], None]:
    """A check, for each call, that the Python numbers compiled as constants keep their values.

    Dynamo passes a number the model reads (`self.scale`, an int argument) as a graph input once it
    changed between calls, and under dynamic=True every float from the start; the program holds the
    value of the compile, so another one must not run silently."""
    numbers = frozen.meta.get(FROZEN_NUMBERS, {})
    if not numbers:
        return lambda args: None
    names = {i: _python_name(placeholders[i].meta["grapharg"].source.name) for i in numbers}

    def check(args: tuple) -> None:
        for i, value in numbers.items():
            given = args[i].item() if isinstance(args[i], torch.Tensor) else args[i]
            if given != value:
                raise OptionError(
                    f"the Python number {names[i]} is {given!r} where the edge backend compiled it as the constant "
                    f"{value!r} (Dynamo passes a number that changed between calls, or under dynamic=True any "
                    "float, as a graph input): compile again (torch._dynamo.reset(), then torch.compile), or pass "
                    "it to forward as a tensor")
    return check


def _python_name(source_name: str) -> str:
    """A Dynamo source as the user wrote it: `L['self']._modules['sub'].scale` -> `self.sub.scale`."""
    name = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", source_name)
    return re.sub(r"^L\[['\"]([^'\"]+)['\"]\]", r"\1", name)


def edge_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None, **unknown):
    if unknown:
        raise OptionError(f"unknown torch.compile argument(s) for the edge backend: {', '.join(unknown)}; "
                         "pass settings as options={...}")
    start = time.perf_counter()
    opts = parse_options(options)
    from .backends import get_target

    auto = opts.pipeline == "auto"
    pipeline = None if auto else Pipeline.parse(opts.pipeline)
    target = get_target(opts.target, opts.target_options)
    frozen, user_positions = frozen_copy(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    check_numbers = _numbers_check(frozen, placeholders)
    user_inputs, dynamic_shapes = dynamo_input_shapes(placeholders, example_inputs, user_positions)
    try:
        check_no_grad_inputs(example_inputs, user_positions)
        canonical = export_canonical_graph(frozen, user_inputs, dynamic_shapes)
        # torch.export's input check of a graph exported within Dynamo's compile names Dynamo's sources
        # (`L['x']`) and fails in any later export; Dynamo guards the shapes, and range_check the ranges.
        drop_export_guards(canonical)
    except GradientsNeededError:
        if not opts.allow_training:
            raise
        log.warning("edge: the graph needs gradients; allow_training=True runs it uncompiled in PyTorch")
        return gm.forward

    check_ranges = range_check(canonical)
    state = written_buffers(canonical)
    remember_user_paths(frozen, frozen.meta[WEIGHT_PATHS], state)
    check_weights = _weights_check(placeholders, user_positions)
    prepared_s = time.perf_counter() - start  # Dynamo's graph to the canonical form
    model = model_calibration.for_current_compile(opts.calibration)
    origin = model.next_origin(gm) if model else GraphOrigin(1, model_calibration.graph_break_of(gm))

    def compile_with(calibration) -> Callable:
        """The compiled program of this graph, calibrated on `calibration` (batches of its own inputs)."""
        compiled_opts = dataclasses.replace(opts, calibration=calibration)
        scored = _scored_in_model(opts, model, deferred, user_positions) if opts.metric else None
        with dynamo_caches_kept():  # a strict torch.export on the way would drop this very model's code
            if auto:
                lowered, compilation = _compile_auto(canonical, user_inputs, compiled_opts, target, origin,
                                                     prepared_s, scored)
            else:
                accuracy = _accuracy_control(opts, scored, target, user_inputs) if scored else None
                lowered, compilation = _compile_graph(canonical, user_inputs, compiled_opts, pipeline, target,
                                                      origin, prepared_s, accuracy)

        check_finite = _finite_inputs_check(origin) if opts.verify else None

        def run(*args):
            check_weights(args)
            check_numbers(args)
            inputs = [args[i] for i in user_positions]
            check_ranges(inputs)
            if check_finite is not None:
                check_finite(inputs)
            return lowered(*inputs)

        run.edge_compilation = compilation
        return run

    if opts.metric is not None and model is None:
        raise OptionError("metric: the edge backend scores the whole model, so it must be called through "
                          "torch.compile(model, backend='edge', ...); or use edgepasses.compress(metric=...)")
    if model is None or opts.calibration is None:
        return compile_with(opts.calibration)
    # Calibrated graphs wait for their first call: the calibration set then runs through the whole
    # model, so that each graph is calibrated on the inputs it really gets (model_calibration.py).
    deferred = model.defer(origin, user_positions, gm.forward, compile_with, state=state)
    return deferred



def _weights_check(placeholders: list[torch.fx.Node], user_positions: list[int]) -> Callable[[tuple], None]:
    """A check, for each call, that Dynamo hands the graph the weight tensors it froze.

    Dynamo passes parameters as graph inputs and does not guard their identity, so a parameter
    reassigned after compiling (`model.fc.weight = nn.Parameter(w)`) reaches the graph without a
    recompile, and the frozen program would silently keep using the old one. (In-place changes keep
    the tensor and stay frozen, as documented.)"""
    frozen = [(i, n) for i, n in enumerate(placeholders) if i not in set(user_positions) and is_dynamo_weight(n)]
    if not frozen:
        return lambda args: None
    positions = [i for i, _ in frozen]
    originals = tuple(n.meta["grapharg"].example for _, n in frozen)  # strong refs: Dynamo keeps weak ones
    paths = [source_path(n.meta["grapharg"].source.name) for _, n in frozen]  # Dynamo clears meta later
    take = operator.itemgetter(*positions) if len(positions) > 1 else (lambda args: (args[positions[0]],))

    def check(args: tuple) -> None:
        if all(map(operator.is_, take(args), originals)):
            return
        replaced = [path for i, old, path in zip(positions, originals, paths) if not _same_tensor(args[i], old)]
        if not replaced:
            return
        named = ", ".join(replaced[:4]) + (f" and {len(replaced) - 4} more" if len(replaced) > 4 else "")
        raise StaleWeightsError(
            f"{named} replaced by another tensor after torch.compile(backend='edge') froze the "
            "model's weights and buffers: compile again (torch._dynamo.reset(), then torch.compile) to run the "
            "new ones")
    return check



def _finite_inputs_check(origin: GraphOrigin) -> Callable[[list], None]:
    """verify=True's check at call time. Compiled programs do not propagate NaN/Inf as eager does:
    quantize ops clamp (NaN and -Inf become the bottom of the calibrated range, +Inf the top), and
    OpenVINO's and TVM's ReLU and max-pool turn NaN into a number; the outputs look plausible."""
    def check(inputs: list) -> None:
        for position, x in enumerate(inputs):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
                bad = "NaN" if torch.isnan(x).any() else "Inf"
                raise NonFiniteInputError(
                    f"verify: input {position} of {origin} contains {bad}, which compiled programs need not "
                    "propagate as eager PyTorch does (int8 clamps it into range; OpenVINO and TVM turn NaN into a "
                    "number at ReLU and max-pool): clean the input, or pass verify=False to run it anyway")
    return check


def _same_tensor(given: torch.Tensor, frozen: torch.Tensor) -> bool:
    """The frozen tensor, or a new object on its memory: Dynamo replays `self.cnt += 1` as setting the
    attribute to the graph's result, an alias of the buffer, so a written buffer changes identity."""
    return given is frozen or (given.data_ptr() == frozen.data_ptr() and given.shape == frozen.shape)


def _scored_in_model(opts: EdgeOptions, model, deferred, user_positions: list[int]) -> Callable[[Callable], float]:
    """The user's metric on the whole compiled model with a program of this graph (taking its user inputs)
    in the graph's place; graphs not compiled yet run in float."""
    from .quant.accuracy_control import score

    def scored(program: Callable) -> float:
        def run(*args):
            return program(*(args[i] for i in user_positions))

        return model.trial(deferred, run, lambda compiled: score(opts.metric, compiled, f"model ({deferred.origin})"))

    return scored


def _accuracy_control(opts: EdgeOptions, scored: Callable[[Callable], float], target, user_inputs: tuple):
    """The metric of each candidate lowered to the target: the metric sees the runtime's own int8
    arithmetic (OpenVINO's differs a little from PyTorch's fake-quant), as what ships will."""
    from .analysis.shape_prop import propagate_fake
    from .graph_utils import copy_sharing_weights
    from .quant.accuracy_control import AccuracyControl

    def evaluate(candidate: torch.fx.GraphModule) -> float:
        candidate = copy_sharing_weights(candidate)  # lowering may rewrite it; the search may return it
        propagate_fake(candidate, user_inputs)
        with warnings_held_back():  # the chosen graph's own lowering says them, once
            program = target.lower(candidate, user_inputs, strict=opts.strict, precision=opts.precision)
        return scored(program)

    return AccuracyControl(evaluate, opts.max_drop)


def _compile_graph(canonical, user_inputs: tuple, opts: EdgeOptions, pipeline: Pipeline, target,
                   origin: GraphOrigin, seconds_before: float, accuracy=None):
    """(lowered program, EdgeCompilation): the pipeline and the lowering, through the compile cache
    when there is a cache_dir; `on_compile` hears of it."""
    start = time.perf_counter()
    # Outside Dynamo's tracing context (still current while Dynamo calls a backend): a target's own
    # torch.export would otherwise trace with Dynamo's fake mode, which rejects a real tensor constant
    # such as a KV cache's plain-attribute `torch.tensor([])`.
    with torch.no_grad(), torch._guards.tracing(None):
        if opts.cache_dir:
            if accuracy is not None:
                raise OptionError("metric and cache_dir: a cached compile cannot know the metric; give one")
            lowered, report, cache, entry = _compile_cached(canonical, user_inputs, opts, pipeline, target)
        else:
            lowered, report, _ = _compile(canonical, user_inputs, opts, pipeline, target, accuracy)
            cache = entry = None
    compilation = EdgeCompilation(report, lowered.edge_lowering, seconds_before + time.perf_counter() - start,
                                  cache, entry and str(entry), origin, dynamic=tuple(dynamic_dims(canonical)))
    log.info("edge: %s: %s on %s (%s)%s", origin, str(report).replace("\n", "\n  "),
             compilation.lowering.target, compilation.lowering.precision,
             f"; dynamic: {describe(compilation.dynamic)}" if compilation.dynamic else "")
    if cache:
        log.info("edge: compile cache %s, %s (%.2f s)", cache, entry or "not stored", compilation.seconds)
    if opts.on_compile is not None:
        opts.on_compile(compilation)
    return lowered, compilation


def _compile(canonical, user_inputs: tuple, opts: EdgeOptions, pipeline: Pipeline, target, accuracy=None):
    """(lowered program, pipeline report, compressed graph): the pipeline, then the target's lowering."""
    ctx = PassContext(example_inputs=user_inputs, calibration=opts.calibration, target=target, accuracy=accuracy)
    compressed = pipeline.run(canonical, ctx, verify=opts.verify)
    _check_dims_kept(canonical, compressed, pipeline)
    lowered = target.lower(compressed, user_inputs, strict=opts.strict, precision=opts.precision,
                           cache_dir=opts.cache_dir)
    return lowered, compressed.edge_report, compressed


def _check_dims_kept(canonical, compressed, pipeline: Pipeline) -> None:
    """A pass that made a dynamic dim static would leave a program that fails on every other size."""
    dims = {(d.input, d.dim) for d in dynamic_dims(compressed)}
    lost = [str(d) for d in dynamic_dims(canonical) if (d.input, d.dim) not in dims]
    if lost:
        raise RuntimeError(f"the pipeline {pipeline} made the dynamic dim(s) {', '.join(lost)} static (a bug in a "
                           "pass: please report it); compile with dynamic=False meanwhile")


def _compile_cached(canonical, user_inputs: tuple, opts: EdgeOptions, pipeline: Pipeline, target):
    """(lowered, report, "hit" | "miss", entry directory or None): the compile cache in cache_dir first."""
    from . import compile_cache

    parts = compile_cache.key_parts(canonical, opts, target)
    key = compile_cache.cache_key(parts)
    hit = compile_cache.lookup(opts.cache_dir, key, target, user_inputs, strict=opts.strict,
                               precision=opts.precision)
    if hit is not None:
        return *hit[:2], "hit", compile_cache.entry_path(opts.cache_dir, key)
    lowered, report, compressed = _compile(canonical, user_inputs, opts, pipeline, target)
    entry = compile_cache.store(opts.cache_dir, key, parts, compressed, lowered, user_inputs)
    return lowered, report, "miss", entry


def _compile_auto(canonical, user_inputs: tuple, opts: EdgeOptions, target, origin: GraphOrigin,
                  seconds_before: float, scored: Callable[[Callable], float] | None):
    """(lowered program, EdgeCompilation) of pipeline="auto": the search's pick, through the compile cache
    (whose entry also keeps the search's run directory, to resume it) when there is a cache_dir."""
    from . import compile_cache
    from .search.auto import AutoResult, auto_compress, check_auto_inputs, with_2_4_kernel

    start = time.perf_counter()
    batches = check_auto_inputs(opts.calibration)
    target = with_2_4_kernel(target, opts.search)
    with torch.no_grad(), torch._guards.tracing(None):
        key = parts = None
        # The metric's score of the float graph: part of the cache key, and the search's baseline.
        baseline = scored(canonical) if scored is not None else None
        if opts.cache_dir:
            parts = {**compile_cache.key_parts(canonical, opts, target), **_auto_key_parts(opts, baseline)}
            key = compile_cache.cache_key(parts)
            hit = compile_cache.lookup(opts.cache_dir, key, target, user_inputs, strict=opts.strict,
                                       precision=opts.precision)
            if hit is not None and "auto" in hit[2]:
                lowered, report, extra = hit
                return _auto_compiled(canonical, lowered, report, AutoResult.from_dict(extra["auto"]), opts, origin,
                                      seconds_before + time.perf_counter() - start, "hit",
                                      compile_cache.entry_path(opts.cache_dir, key))
        run_dir = os.path.join(opts.cache_dir, "auto", key) if key else None
        gm, lowered, result = auto_compress(canonical, user_inputs, batches, target=target, evaluate=scored,
                                            max_drop=opts.max_drop, search=opts.search, run_dir=run_dir,
                                            lower_kwargs={"strict": opts.strict, "precision": opts.precision},
                                            baseline=baseline)
        report = getattr(gm, "edge_report", None) or PipelineReport("float (auto kept none)", [])
        entry = compile_cache.store(opts.cache_dir, key, parts, gm, lowered, user_inputs,
                                    extra={"auto": result.to_dict()}) if key else None
    return _auto_compiled(canonical, lowered, report, result, opts, origin, seconds_before + time.perf_counter() - start,
                          "miss" if key else None, entry)


def _auto_compiled(canonical, lowered, report, result, opts: EdgeOptions, origin: GraphOrigin, seconds: float, cache,
                   entry):
    compilation = EdgeCompilation(report, lowered.edge_lowering, seconds, cache, entry and str(entry), origin,
                                  auto=result, dynamic=tuple(dynamic_dims(canonical)))
    log.info("edge: %s: %s (%.1f s%s)", origin, str(result).replace("\n", "\n  "), seconds,
             f", compile cache {cache}" if cache else "")
    if opts.on_compile is not None:
        opts.on_compile(compilation)
    return lowered, compilation


def _auto_key_parts(opts: EdgeOptions, float_score: float | None) -> dict[str, str]:
    """What else decides auto's pick: its settings, and the metric (its code, and the float model's score on
    it, which changes with the validation data behind it)."""
    import json

    metric = None
    if opts.metric is not None:
        code = getattr(opts.metric, "__code__", None)
        metric = {"name": getattr(opts.metric, "__qualname__", type(opts.metric).__qualname__),
                  "code": code and hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest(),
                  "float_score": float_score}
    return {"auto": json.dumps({"search": dataclasses.asdict(opts.search), "max_drop": opts.max_drop,
                                "metric": metric}, sort_keys=True, default=repr)}
