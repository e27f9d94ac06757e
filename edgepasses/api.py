"""The public surface: compress() a model to an inspectable GraphModule, lower() it to a target."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx

from .canonical import export_canonical
from .pass_base import PassContext
from .pipeline import DEFAULT_PIPELINE, Pipeline


def compress(model: torch.nn.Module, example_inputs: tuple, pipeline: "str | Pipeline" = DEFAULT_PIPELINE, *,
             calibration: Iterable[tuple] | None = None, target: str = "auto",
             verify: bool = False) -> torch.fx.GraphModule:
    """Export `model` to the canonical form and run `pipeline` over it.

    Returns the transformed GraphModule; `gm.edge_report` says what each pass did and how long it took.
    `calibration` (an iterable of input tuples) is the only data data-aware passes see.
    """
    from .backends import get_target

    parsed = Pipeline.parse(pipeline)  # fail on a bad pipeline before the (slow) export
    example_inputs = tuple(example_inputs)
    gm = export_canonical(model, example_inputs)
    ctx = PassContext(example_inputs=example_inputs, calibration=calibration, target=get_target(target))
    with torch.no_grad():
        return parsed.run(gm, ctx, verify=verify)


def lower(gm: torch.fx.GraphModule, example_inputs: tuple, target: str = "auto", *,
          strict: bool = False, precision: str = "f32", cache_dir: str | None = None) -> Callable:
    """Lower a canonical GraphModule to `target`; returns a callable taking the same inputs."""
    from .backends import get_target

    return get_target(target).lower(gm, tuple(example_inputs), strict=strict, precision=precision,
                                      cache_dir=cache_dir)
