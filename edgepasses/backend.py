"""The torch.compile backend `edge` (entry point `torch_dynamo_backends`).

    Dynamo graph -> freeze weights -> canonical form -> pipeline -> target lowering

Only inference graphs compile. Dynamo's `example_inputs` give shapes only; calibration
data comes from the `calibration` option and nowhere else.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
from torch._subclasses.fake_tensor import is_fake

from .canonical import check_no_grad_inputs, export_canonical_graph, frozen_copy
from .errors import GradientsNeededError, OptionError
from .pass_base import PassContext, build_options
from .pipeline import DEFAULT_PIPELINE, Pipeline

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class EdgeOptions:
    pipeline: str = DEFAULT_PIPELINE
    target: str = "auto"                # a target, or an ordered list: "tensorrt,openvino,reference"
    target_options: Any = None          # per target: {"tvm": {"trials": 64, "time_limit_s": 600}}
    calibration: Any = None             # an iterable of example input tuples
    strict: bool = False                # raise instead of running unsupported ops in PyTorch
    verify: bool = False                # lint + re-propagate fake tensors after every pass
    precision: Literal["f32", "bf16"] = "f32"
    cache_dir: str | None = None        # the target's compiled-model cache
    allow_training: bool = False        # run graphs that need gradients uncompiled in PyTorch
    on_compile: Any = None              # called with an EdgeCompilation after each graph compiles

    def __post_init__(self):
        from .backends import parse_target_names

        parse_target_names(self.target)
        if self.target_options is not None and not isinstance(self.target_options, dict):
            raise OptionError(f"target_options must be a dict of per-target options such as "
                              f"{{'tvm': {{'trials': 64}}}}; got {self.target_options!r}")
        if self.calibration is not None and iter(self.calibration) is self.calibration:
            # Dynamo may compile several graphs, and each would find an iterator already used up.
            raise OptionError("calibration must be re-iterable (a list of input tuples), not an iterator "
                              "or generator")


@dataclass(frozen=True)
class EdgeCompilation:
    """What one compile did: the pipeline report, the target's lowering, and the wall time."""
    report: Any        # pipeline.PipelineReport
    lowering: Any      # backends.Lowering
    seconds: float


def parse_options(options: dict | None) -> EdgeOptions:
    return build_options(EdgeOptions, options or {}, where="torch.compile(backend='edge')")


def _static_example(node: torch.fx.Node, value: Any) -> torch.Tensor:
    """A concrete tensor of the input's static shape; refuses symbolic shapes with what to do."""
    shape = getattr(node.meta.get("example_value", value), "shape", None)
    if not isinstance(value, torch.Tensor) or any(isinstance(s, torch.SymInt) for s in shape):
        raise OptionError(f"input {node.name} has a dynamic shape ({value!r}); the edge backend compiles "
                         "static shapes: pass dynamic=False to torch.compile (one compile per input shape)")
    return torch.zeros(value.shape, dtype=value.dtype) if is_fake(value) else value


def edge_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None, **unknown):
    if unknown:
        raise OptionError(f"unknown torch.compile argument(s) for the edge backend: {', '.join(unknown)}; "
                         "pass settings as options={...}")
    start = time.perf_counter()
    opts = parse_options(options)
    from .backends import get_target

    pipeline = Pipeline.parse(opts.pipeline)
    target = get_target(opts.target, opts.target_options)
    frozen, user_positions = frozen_copy(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = tuple(_static_example(placeholders[i], example_inputs[i]) for i in user_positions)
    try:
        check_no_grad_inputs(example_inputs, user_positions)
        canonical = export_canonical_graph(frozen, user_inputs)
    except GradientsNeededError:
        if not opts.allow_training:
            raise
        log.warning("edge: the graph needs gradients; allow_training=True runs it uncompiled in PyTorch")
        return gm.forward

    ctx = PassContext(example_inputs=user_inputs, calibration=opts.calibration, target=target)
    with torch.no_grad():
        canonical = pipeline.run(canonical, ctx, verify=opts.verify)
        lowered = target.lower(canonical, user_inputs, strict=opts.strict, precision=opts.precision,
                               cache_dir=opts.cache_dir)
    compilation = EdgeCompilation(canonical.edge_report, lowered.edge_lowering, time.perf_counter() - start)
    log.info("edge: %s on %s (%s)", str(canonical.edge_report).replace("\n", "\n  "),
             compilation.lowering.target, compilation.lowering.precision)
    if opts.on_compile is not None:
        opts.on_compile(compilation)

    def run(*args):
        return lowered(*(args[i] for i in user_positions))

    run.edge_compilation = compilation
    return run
