"""The pass API: `register_pass`, `option`, `PassResult`, `PassContext` and option validation.

A pass is a function `(gm, opts, ctx) -> PassResult` over the canonical graph form
(see DESIGN.md). Its options are a frozen dataclass whose every field is declared with
`option(default, "description")`: `edgepasses passes` and docs/passes.md print the
descriptions. Values are validated against the field types when the dataclass is built,
so a pipeline string and a Python call fail the same way.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

import torch.fx

from .errors import OptionError


def option(default: Any, doc: str) -> Any:
    """A pass option: its default and its description, which `register_pass` requires."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def ignore_option(matches: str) -> Any:
    """The `ignore` option of a pass that rewrites layers; `matches`: what becomes of the matched layers."""
    return option((), "Layer names or regular expressions, each matching a whole name (the names the "
                      f"pass's stats print); the layers they match {matches}.")


@dataclass(frozen=True)
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What every pass may read: inputs, calibration data, the target. Never per-pass settings."""

    example_inputs: tuple = ()
    calibration: Iterable[tuple] | None = None
    target: Any = None  # a backends.Target: capabilities of the runtime the graph goes to
    accuracy: Any = None  # quant.accuracy_control.AccuracyControl: the user's metric and allowed drop


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., PassResult]
    options: type
    requires: tuple[str, ...]
    before: tuple[str, ...]
    version: int
    doc: str

    def make_options(self, values: Mapping[str, Any]):
        options = build_options(self.options, values, where=f"pass {self.name!r}")
        check_patterns(getattr(options, "ignore", ()), where=f"pass {self.name!r} option 'ignore'")
        return options


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, options: type = NoOptions, requires: Iterable[str] = (),
                  before: Iterable[str] = (), version: int = 1):
    """Register `fn` as pass `name`. `requires`: passes that must run earlier in a pipeline; `before`:
    passes that, where a pipeline has them too, must run later. Both are checked when a pipeline is built."""
    if not dataclasses.is_dataclass(options) or not options.__dataclass_params__.frozen:
        raise TypeError(f"options of pass {name!r} must be a frozen dataclass, got {options!r}")
    if isinstance(requires, str) or isinstance(before, str):
        raise TypeError(f"requires and before of pass {name!r} are tuples of pass names, such as ('quantize',)")
    for f in dataclasses.fields(options):
        if not isinstance(f.metadata.get("doc"), str) or not f.metadata["doc"].strip():
            raise TypeError(f"option {f.name!r} of pass {name!r} has no description: declare it as "
                            f"`{f.name}: ... = option(default, \"what it does\")` (edgepasses.pass_base.option)")

    def wrap(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise OptionError(f"pass {name!r} is already registered by {_REGISTRY[name].fn!r}")
        summary = inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0]  # the first paragraph, on one line
        _REGISTRY[name] = PassInfo(name, fn, options, tuple(requires), tuple(before), version,
                                   " ".join(summary.split()))
        return fn

    return wrap


def registered_passes() -> dict[str, PassInfo]:
    from . import passes  # noqa: F401  (importing the package registers the built-in passes)
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> PassInfo:
    known = registered_passes()
    if name not in known:
        raise OptionError(f"unknown pass {name!r}; registered passes: {', '.join(known)}")
    return known[name]


# ---------------------------------------------------------------- option validation

def build_options(cls: type, values: Mapping[str, Any], *, where: str):
    """Build the frozen dataclass `cls` from `values`, checking keys and types."""
    hints = field_types(cls)
    unknown = sorted(str(k) for k in values if k not in hints)  # str(): a key may be anything hashable
    if unknown:
        valid = ", ".join(f"{n}: {type_name(tp)}" for n, tp in hints.items()) or "none"
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for {where}; valid options: {valid}")
    checked = {k: check_value(v, hints[k], f"{where} option {k!r}") for k, v in values.items()}
    return cls(**checked)


def check_patterns(patterns, *, where: str) -> None:
    """Layer-name regexes (every pass's `ignore` option) must compile: checked when the options are
    parsed, not when the pass reaches them after calibration."""
    for pattern in patterns if isinstance(patterns, tuple) else ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionError(f"{where}: {pattern!r} is not a valid regular expression ({exc}); escape "
                              f"special characters (re.escape) to match a name literally") from None


def check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` coerced to `tp` (int -> float, list -> tuple) or raise ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise OptionError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return check_value(value, arm, where)
            except ValueError:
                pass
        raise OptionError(f"{where} must be {type_name(tp)}; got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise OptionError(f"{where} must be None; got {value!r}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = (value,)
        elem = args[0] if args else Any
        return tuple(check_value(v, elem, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise OptionError(f"{where} must be {tp.__name__}; got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise OptionError(f"{where} must be {type_name(tp)}; got {value!r} ({type(value).__name__})")


def field_types(cls: type) -> dict[str, Any]:
    """The dataclass `cls`'s field types in declared order, postponed annotations resolved."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """`tp` as an option's type reads: `int or none`, `auto|minmax`, `list of str`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "none"  # as a pipeline writes it
    if args:
        return " or ".join(type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))
