"""Options: every torch.compile(backend='edge') option key with wrong types and values, the options
object itself, and every pass's options (from the registry: each field with a wrong type, the
range checks, an unknown key, an invalid `ignore` regex)."""
from __future__ import annotations

import dataclasses
import math
import typing

from hostile_common import compile_run, matches_eager, mlp, scratch, x_mlp

from edgepasses.bench.hostile import Case, clear_error, correct
from edgepasses.errors import OptionError

def _compile(options):
    return lambda: compile_run(mlp(), options, x_mlp())


def _file() -> str:
    path = scratch("file") / "not-a-dir"
    path.write_text("a file")
    return str(path)


def _generator():
    return ((x_mlp(s),) for s in range(3))


def _metric(model) -> float:
    return 1.0


# (key, label, value or a zero-argument maker of it, regex the error must match)
BACKEND_BAD = [
    ("pipeline", "int", 5, r"pipeline"),
    ("pipeline", "unknown pass", "nope", r"unknown pass 'nope'"),
    ("pipeline", "unclosed parenthesis", "prune(ratio=0.3", r"syntax error"),
    ("pipeline", "list of names", ["fold_bn", "dce"], r"pipeline"),
    ("pipeline", "preset with options", "edge-fp32(x=1)", r"takes no options"),
    ("pipeline", "trailing comma", "fold_bn,", r"pipeline"),
    ("target", "unknown", "nope", r"unknown target 'nope'"),
    ("target", "int", 5, r"target"),
    ("target", "unknown in a list", "openvino,nope", r"unknown target"),
    ("target", "named twice", "reference,reference", r"twice"),
    ("target", "auto in a list", "auto,reference", r"auto"),
    ("target_options", "a string", "tvm", r"target_options must be a dict"),
    ("target_options", "unknown target", {"nope": {}}, r"unknown target"),
    ("target_options", "a list for the target", {"reference": [1, 2]}, r"target_options"),
    ("calibration", "int", 5, r"calibration"),
    ("calibration", "a string", "abc", r"calibration"),
    ("calibration", "a generator", _generator, r"calibration.*(re-iterable|iterator|generator)"),
    ("calibration", "an iterator", lambda: iter([(x_mlp(),)]), r"calibration.*(re-iterable|iterator)"),
    ("strict", "a string", "yes", r"strict"),
    ("strict", "an int", 1, r"strict"),
    ("verify", "a string", "no", r"verify"),
    ("precision", "unknown", "f16", r"precision"),
    ("precision", "int", 16, r"precision"),
    ("cache_dir", "int", 5, r"cache_dir"),
    ("cache_dir", "a file", _file, r"cache_dir"),
    ("allow_training", "a string", "yes", r"allow_training"),
    ("on_compile", "int", 5, r"on_compile"),
    ("on_compile", "a string", "print", r"on_compile"),
    ("metric", "int", 5, r"metric"),
    ("metric", "without calibration", lambda: _metric, r"calibration"),
    ("max_drop", "negative", -0.1, r"max_drop"),
    ("max_drop", "above 1", 1.5, r"max_drop"),
    ("max_drop", "a string", "x", r"max_drop"),
    ("max_drop", "NaN", math.nan, r"max_drop"),
]


def _value(value):
    return value() if callable(value) else value


def backend_cases() -> list[Case]:
    cases = []
    for key, label, value, pattern in BACKEND_BAD:
        options = (lambda k, v: lambda: {"target": "reference", "pipeline": "fold_bn", k: _value(v)})(key, value)
        cases.append(Case(f"option {key}: {label}", "options",
                          (lambda o: lambda: compile_run(mlp(), o(), x_mlp()))(options),
                          clear_error(OptionError, pattern)))
    cases += [
        Case("options: a string instead of a dict", "options", _compile("fold_bn"),
             clear_error(OptionError, r"options must be a dict")),
        Case("options: a list of pairs", "options", _compile([("pipeline", "fold_bn")]),
             clear_error(OptionError, r"options must be a dict")),
        Case("options: misspelt key", "options", _compile({"pipline": "fold_bn", "target": "reference"}),
             clear_error(OptionError, r"unknown option\(s\) pipline")),
        Case("options: non-string key", "options", _compile({5: 1, "target": "reference"}),
             clear_error(OptionError, r"unknown option\(s\) 5")),
        Case("options: None", "options", lambda: compile_run(mlp(), None, x_mlp()), correct(matches_eager(mlp, x_mlp()))),
        Case("options: every key valid at once", "options",
             lambda: compile_run(mlp(), {"pipeline": "fold_bn,dce", "target": "reference", "strict": True,
                                         "verify": True, "precision": "f32", "target_options": {},
                                         "allow_training": False, "on_compile": lambda c: None,
                                         "cache_dir": str(scratch("cache"))}, x_mlp()),
             correct(matches_eager(mlp, x_mlp()))),
        Case("options: empty pipeline", "options", _compile({"pipeline": "", "target": "reference"}),
             clear_error(OptionError, r"pipeline")),
        Case("options: preset by name", "options", _compile({"pipeline": "edge-fp32", "target": "reference"}),
             correct(matches_eager(mlp, x_mlp()))),
    ]
    return cases


# ---- pass options, from the registry ----------------------------------------------------------------

def _wrong_type(tp):
    """A pipeline-text value of the wrong type for `tp`, or None when every text value is accepted."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "bogus"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        arms = [a for a in args if a is not type(None)]
        return _wrong_type(arms[0]) if len(arms) == 1 else None
    if origin is tuple:
        return "[1, 2]"
    return {int: "2.5", float: "abc", bool: "3", str: "1"}.get(tp)


# (pass, options text, regex): values out of range or contradicting each other
OUT_OF_RANGE = [
    ("lowrank", "rank=0", r"rank"),
    ("lowrank", "ratio=0", r"ratio"),
    ("lowrank", "ratio=1.5", r"ratio"),
    ("lowrank", "energy=0", r"energy"),
    ("lowrank", "energy=1.5", r"energy"),
    ("lowrank", "min_saving=1", r"min_saving"),
    ("lowrank", "round_to=0", r"round_to"),
    ("lowrank", "damping=-1", r"damping"),
    ("lowrank", "rank=4,energy=0.9", r"one of rank, ratio or energy"),
    ("prune", "ratio=1", r"ratio"),
    ("prune", "ratio=-0.1", r"ratio"),
    ("prune", "round_to=0", r"round_to"),
    ("quantize", "bits=3", r"bits"),
    ("quantize", "percentile=10", r"percentile"),
    ("quantize", "percentile=101", r"percentile"),
    ("quantize", "smooth_alpha=2", r"smooth_alpha"),
    ("quantize", "weight_only=true,group_size=0", r"group_size"),
    ("quantize", "group_size=32", r"group_size"),
    ("quantize", "awq=true", r"awq"),
    ("smooth", "alpha=1.5", r"alpha"),
    ("smooth", "alpha=-0.5", r"alpha"),
]

def _compress(pipeline: str):
    import edgepasses

    return lambda: edgepasses.compress(mlp(), (x_mlp(),), pipeline, calibration=[(x_mlp(),)])


def pass_cases() -> list[Case]:
    from edgepasses.pass_base import registered_passes

    cases = []
    for name, info in registered_passes().items():
        hints = typing.get_type_hints(info.options)
        for f in dataclasses.fields(info.options):
            bad = _wrong_type(hints[f.name])
            if bad is None:
                continue
            text = f"{name}({f.name}={bad})"
            cases.append(Case(f"pass {name}: {f.name} of the wrong type", "options", _compress(text),
                              clear_error(OptionError, rf"{f.name}")))
        cases.append(Case(f"pass {name}: unknown option", "options", _compress(f"{name}(bogus_key=1)"),
                          clear_error(OptionError, r"unknown option\(s\) bogus_key")))
        if "ignore" in hints:
            cases.append(Case(f"pass {name}: invalid ignore regex", "options", _compress(f"{name}(ignore='(')"),
                              clear_error(OptionError, r"ignore")))
    for name, text, pattern in OUT_OF_RANGE:
        cases.append(Case(f"pass {name}: {text}", "options", _compress(f"{name}({text})"),
                          clear_error(OptionError, pattern)))
    return cases


def cases() -> list[Case]:
    return backend_cases() + pass_cases()
