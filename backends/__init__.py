"""Targets: the runtimes a canonical graph lowers to. One folder per target, registered by name.

A target declares whether it is usable here, and lowers a canonical GraphModule to a
callable that takes the same inputs. What a target cannot run stays in PyTorch through
`partition.lower_by_partition`, which warns (or, with strict, raises) naming each op.

The core (the backend, the compile cache, artifacts, the CLI) knows targets only through the
`Target` protocol and this registry: the built-in targets are registered here like any other,
and another package adds one with `register_target` or the `edgepasses.targets` entry point.
"""
from __future__ import annotations

import collections
import importlib
import itertools
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Any, Callable, Protocol

import torch.fx

from edgepasses.errors import ArtifactError, OptionError
from edgepasses.quant import QuantCaps

ENTRY_POINT_GROUP = "edgepasses.targets"


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
    kernels: dict = field(default_factory=dict)     # layer name -> the kernel and integer form it runs on
                                                    # (targets that run our kernels: reference)
    compile_s: float = field(default=0.0, compare=False)  # seconds the target's own compiler took (Inductor)

    def kernel_summary(self) -> str:
        """How many layers run on each kernel form, most used first ("" when the target says nothing)."""
        counts = collections.Counter(self.kernels.values())
        return "; ".join(f"{n} x {form}" for form, n in counts.most_common())

    def placement_text(self) -> str:
        """One line per partition: its name, the target that runs it, its op count."""
        return "\n".join(str(p) for p in self.placements) or f"whole graph -> {self.target}"


def tensors_mb(module: torch.nn.Module) -> float:
    """MB of a module's parameters and buffers (a GraphModule's constants included)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


class Target(Protocol):
    """What the core asks of a target. `TargetBase` gives the optional parts their defaults."""

    name: str
    quant_caps: QuantCaps  # the integer forms it runs: the quantizer stays inside them

    def unavailable_reason(self) -> str | None:
        """None when the target runs on this machine, else why not and what to install."""

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        """A callable taking the same inputs as `gm`, carrying a `Lowering` as `.edge_lowering`;
        `cache_dir` keeps compiled artefacts."""

    def cache_key(self) -> str:
        """What else changes the program `lower` builds here (runtime versions, this CPU): part of the
        compile cache's key."""

    # Artifacts: a target that can store its program writes `artifact_files` into its own folder
    # `<artifact>/<name>/` and reads them back. They are data unless `native_code` says loading runs them.
    artifact_files: tuple[str, ...]
    native_code: bool

    def can_save(self, program: Any) -> bool:
        """Whether `save_program` can store `program` (a whole-graph program `lower` returned; None:
        the exported graph alone)."""

    def save_program(self, folder: Path, exported: torch.export.ExportedProgram, program: Any, *,
                     required: bool, **options) -> dict | None:
        """Write `artifact_files` into `folder`; return what `load_program` needs (JSON-able), or None
        when nothing could be written and `required` is False (say why in a WARNING)."""

    def load_program(self, folder: Path, info: dict, exported: torch.export.ExportedProgram, *,
                     precision: str, cache_dir: str | None, notes: list[str]) -> Callable | None:
        """The program stored in `folder`, or None with a line in `notes` where it cannot run here."""


class TargetBase:
    """Defaults for a target's optional parts: no cache key of its own, no stored program."""

    name = ""
    quant_caps = QuantCaps()
    artifact_files: tuple[str, ...] = ()
    native_code = False
    sparse24_kernels = False  # runs 2:4-sparse Linears on a kernel that skips the zeros

    def unavailable_reason(self) -> str | None:
        return None

    def cache_key(self) -> str:
        return ""

    def can_save(self, program: Any) -> bool:
        return False

    def save_program(self, folder: Path, exported, program: Any, *, required: bool, **options) -> dict | None:
        raise ArtifactError(f"save: target {self.name!r} stores no program in an artifact; save the graph alone "
                            f"(target_artifact=False)")

    def load_program(self, folder: Path, info: dict, exported, *, precision: str, cache_dir: str | None,
                     notes: list[str]) -> Callable | None:
        return None


def distribution_versions(*names: str) -> str:
    """'name version' of each installed distribution (package metadata: importing TVM takes seconds)."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


# --- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Registered:
    factory: Callable[..., Target] | str  # "module:attribute", imported when the target is first built
    auto_rank: int | None                  # place in `auto` (lower first); None: never in `auto`
    source: str                            # who registered it, for a clash's error


_REGISTRY: dict[str, _Registered] = {}
_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_entry_points_loaded = False


def register_target(name: str, factory: Callable[..., Target] | str | None = None, *,
                    auto_rank: int | None = None):
    """Register target `name`: `factory(**target_options[name])` builds it (a class, or "module:attr"
    imported on first use). `auto_rank`: its place in `target="auto"` (lower first; None: left out).
    Without `factory`, a class decorator."""
    if factory is None:
        return lambda cls: register_target(name, cls, auto_rank=auto_rank) or cls
    if not _NAME.fullmatch(name) or name == "auto":
        raise OptionError(f"target name {name!r}: lower-case letters, digits, '-' and '_', not 'auto'")
    source = factory if isinstance(factory, str) else f"{factory.__module__}.{factory.__qualname__}"
    known = _REGISTRY.get(name)
    if known is not None and known.source != source:
        raise OptionError(f"target {name!r} is already registered by {known.source}; {source} cannot take its name")
    _REGISTRY[name] = _Registered(factory, auto_rank, source)
    return None


for _name, _factory, _rank in (("tensorrt", "edgepasses.backends.tensorrt:TensorRTTarget", 10),
                               ("openvino", "edgepasses.backends.openvino:OpenVINOTarget", 20),
                               ("reference", "edgepasses.backends.reference:ReferenceTarget", 30),
                               # fast only once tuned for a model: never chosen by `auto`
                               ("tvm", "edgepasses.backends.tvm:TVMTarget", None)):
    register_target(_name, _factory, auto_rank=_rank)


def _registry() -> dict[str, _Registered]:
    """The registered targets, those of installed packages' `edgepasses.targets` entry points included."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            register_target(point.name, point.value)
    return _REGISTRY


def target_names() -> list[str]:
    """`auto` and every registered target."""
    return ["auto", *sorted(_registry())]


def auto_order() -> list[str]:
    ranked = [(entry.auto_rank, name) for name, entry in _registry().items() if entry.auto_rank is not None]
    return [name for _, name in sorted(ranked)]


def _factory(name: str) -> Callable[..., Target]:
    factory = _registry()[name].factory
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory


def parse_target_names(spec: str) -> list[str]:
    """`"auto"`, one target name, or an ordered comma-separated list ("tensorrt,openvino,reference")."""
    names = [n.strip() for n in str(spec).split(",")]
    valid = target_names()
    unknown = [n for n in names if n not in valid]
    if unknown or not all(names):
        raise OptionError(f"unknown target {spec!r}; valid targets: {', '.join(valid)}, or an ordered "
                          "comma-separated list of them such as 'tensorrt,openvino,reference'")
    if "auto" in names and len(names) > 1:
        raise OptionError(f"target {spec!r}: 'auto' stands alone (it is the list {','.join(auto_order())})")
    if len(set(names)) != len(names):
        raise OptionError(f"target {spec!r} names a target twice")
    return auto_order() if names == ["auto"] else names


def make_target(name: str, options: dict | None = None) -> Target:
    """Target `name` built with `options` (its entry of `target_options`)."""
    if name not in _registry():
        raise OptionError(f"target {name!r} is not registered here; registered: {', '.join(sorted(_REGISTRY))} "
                          f"(a plugin target needs its package installed)")
    factory = _factory(name)
    try:
        return factory(**(options or {}))
    except TypeError as exc:
        raise OptionError(f"target_options[{name!r}]: {exc}; see {_registry()[name].source}") from exc


def get_target(spec: str, target_options: dict[str, dict] | None = None) -> Target:
    """The target `spec` names, built with `target_options[name]` (e.g. {"tvm": {"trials": 64}}).

    One name: that target, or an error saying why it cannot run here. An ordered list or `auto`:
    the targets of the list that run here, each partition going to the first that runs all its ops
    (`chain.TargetChain`)."""
    names = parse_target_names(spec)
    options = dict(target_options or {})
    stray = set(options) - set(_registry())
    if stray:
        raise OptionError(f"target_options for unknown target(s) {sorted(stray)}; valid: {sorted(_REGISTRY)}")
    targets = [make_target(name, options.get(name)) for name in names]
    if len(targets) == 1 and spec != "auto":
        reason = targets[0].unavailable_reason()
        if reason:
            raise RuntimeError(f"target {spec!r} cannot run here: {reason}")
        return targets[0]
    from .chain import TargetChain

    return TargetChain.of_available(targets, spec)


def saving_target(program: Any) -> Target | None:
    """The target that can store `program` in an artifact: the one whose whole-graph program it is,
    with nothing left to PyTorch; None for anything else (a partitioned graph, a chain's result)."""
    lowering = getattr(program, "edge_lowering", None)
    if lowering is None or lowering.fallbacks or lowering.target not in _registry():
        return None
    target = make_target(lowering.target)
    return target if target.artifact_files and target.can_save(program) else None
