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
    sparse24_ops: int = 0               # layers running on a 2:4-sparse kernel (reference: edge::sparse24_linear)
    weights_mb: float = 0.0             # MB (1e6 bytes) of constants the lowered program holds, in the
                                        # dtype it stores them (OpenVINO: i8 for quantised weights)
    placements: list = field(default_factory=list)  # chain.Placement: which target runs which partition

    def placement_text(self) -> str:
        """One line per partition: its name, the target that runs it, its op count."""
        return "\n".join(str(p) for p in self.placements) or f"whole graph -> {self.target}"


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


TARGET_NAMES = ("auto", "openvino", "tensorrt", "reference", "tvm")
# `auto`: the chain of these that run here; TVM is left out (fast only once tuned for a model).
AUTO_ORDER = ("tensorrt", "openvino", "reference")


def _target_classes() -> dict[str, type]:
    from .openvino import OpenVINOTarget
    from .reference import ReferenceTarget
    from .tensorrt import TensorRTTarget
    from .tvm import TVMTarget

    return {"tensorrt": TensorRTTarget, "openvino": OpenVINOTarget, "reference": ReferenceTarget, "tvm": TVMTarget}


def parse_target_names(spec: str) -> list[str]:
    """`"auto"`, one target name, or an ordered comma-separated list ("tensorrt,openvino,reference")."""
    names = [n.strip() for n in str(spec).split(",")]
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown or not all(names):
        raise OptionError(f"unknown target {spec!r}; valid targets: {', '.join(TARGET_NAMES)}, or an ordered "
                          "comma-separated list of them such as 'tensorrt,openvino,reference'")
    if "auto" in names and len(names) > 1:
        raise OptionError(f"target {spec!r}: 'auto' stands alone (it is the list {','.join(AUTO_ORDER)})")
    if len(set(names)) != len(names):
        raise OptionError(f"target {spec!r} names a target twice")
    return list(AUTO_ORDER) if names == ["auto"] else names


def _make(name: str, options: dict) -> Target:
    cls = _target_classes()[name]
    try:
        return cls(**options.get(name, {}))
    except TypeError as exc:
        raise OptionError(f"target_options[{name!r}]: {exc}; see {cls.__module__}.{cls.__name__}") from exc


def get_target(spec: str, target_options: dict[str, dict] | None = None) -> Target:
    """The target `spec` names, built with `target_options[name]` (e.g. {"tvm": {"trials": 64}}).

    One name: that target, or an error saying why it cannot run here. An ordered list or `auto`:
    the targets of the list that run here, each partition going to the first that runs all its ops
    (`chain.TargetChain`)."""
    names = parse_target_names(spec)
    options = dict(target_options or {})
    stray = set(options) - set(_target_classes())
    if stray:
        raise OptionError(f"target_options for unknown target(s) {sorted(stray)}; valid: {sorted(_target_classes())}")
    targets = [_make(name, options) for name in names]
    if len(targets) == 1 and spec != "auto":
        reason = targets[0].unavailable_reason()
        if reason:
            raise RuntimeError(f"target {spec!r} cannot run here: {reason}")
        return targets[0]
    from .chain import TargetChain

    return TargetChain.of_available(targets, spec)
