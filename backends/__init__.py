"""Targets: the runtimes a canonical graph lowers to. One folder per target.

A target declares whether it is usable here, and lowers a canonical GraphModule to a
callable that takes the same inputs. What a target cannot run stays in PyTorch through
`partition.lower_by_partition`, which warns (or, with strict, raises) naming each op.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch.fx

from edgepasses.errors import OptionError


@dataclass
class Lowering:
    """What a target did; the callable `lower` returns carries it as `.edge_lowering`."""
    target: str
    precision: str                      # as the runtime reports it, not as requested
    partitions: int                     # pieces the target runs
    fallbacks: list = field(default_factory=list)  # partition.Fallback: ops left to PyTorch
    int8_ops: int = 0                   # compute ops the runtime reports running in integer precision
    weights_mb: float = 0.0             # MB (1e6 bytes) of constants the lowered program holds, in the
                                        # dtype it stores them (OpenVINO: i8 for quantised weights)


def tensors_mb(module: torch.nn.Module) -> float:
    """MB of a module's parameters and buffers (a GraphModule's constants included)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


class Target(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when the target runs on this machine, else why not and what to install."""

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        """A callable taking the same inputs as `gm`; `cache_dir` keeps compiled artefacts."""


def _targets() -> dict[str, Target]:
    from .openvino import OpenVINOTarget
    from .reference import ReferenceTarget
    from .tensorrt import TensorRTTarget
    from .tvm import TVMTarget

    return {"tensorrt": TensorRTTarget(), "openvino": OpenVINOTarget(), "reference": ReferenceTarget(),
            "tvm": TVMTarget()}


TARGET_NAMES = ("auto", "openvino", "tensorrt", "reference", "tvm")


def get_target(name: str) -> Target:
    """The target called `name`; `auto` picks the best one usable on this machine."""
    targets = _targets()
    if name == "auto":
        return next(t for t in targets.values() if t.unavailable_reason() is None)
    if name not in targets:
        raise OptionError(f"unknown target {name!r}; valid targets: {', '.join(TARGET_NAMES)}")
    target = targets[name]
    reason = target.unavailable_reason()
    if reason:
        raise RuntimeError(f"target {name!r} cannot run here: {reason}")
    return target
