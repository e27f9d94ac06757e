"""Textual pipelines: grammar, typed parsing, canonical printing, presets, running.

Grammar (whitespace between tokens is ignored)::

    pipeline := item ("," item)*
    item     := NAME | NAME "(" [option ("," option)*] ")"      NAME: a pass or a preset
    option   := KEY "=" value
    value    := INT | FLOAT | true | false | none | WORD | 'quoted' | "quoted"
              | "[" [value ("," value)*] "]"

`str(Pipeline.parse(s))` is the canonical text: presets expanded, options that equal
their default left out, in the order the options dataclass declares them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch.fx

from .errors import OptionError, PassVerificationError
from .graph_utils import dynamo_caches_kept
from .pass_base import PassContext, PassInfo, get_pass, registered_passes
from .state import state_kept, written_buffers

_PRESETS = {  # name: (passes, what a user reaches for it for)
    "edge-fp32": ("fold_bn,dce", "Exact clean-up only: the model as it is, on the target's fp32 path."),
    "edge-int8": ("fold_bn,quantize,dce", "Post-training int8 of weights and activations; needs calibration data."),
    "edge-sparse24": ("fold_bn,sparsify_24,dce",
                      "2:4-sparse Linear weights, which the reference target's kernels run sparse."),
    "edge-lowrank": ("fold_bn,lowrank,dce", "Linears and convs split into low-rank factors where MACs fall."),
}
PRESETS: dict[str, str] = {name: passes for name, (passes, _) in _PRESETS.items()}
PRESET_DOCS: dict[str, str] = {name: doc for name, (_, doc) in _PRESETS.items()}
DEFAULT_PIPELINE = "edge-fp32"

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.\-]))
    | (?P<word>[A-Za-z_][\w.\-*^$?+|\\]*)
    | (?P<punct>[(),=\[\]])
    )""", re.VERBOSE)
_BARE_WORD = re.compile(r"[A-Za-z_][\w.\-]*\Z")


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise OptionError(f"pipeline syntax error at column {pos}: {text[pos:pos + 20]!r} in {text!r}")
        kind = m.lastgroup
        raw = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elif kind == "num":
            value = float(raw) if re.search(r"[.eE]", raw) else int(raw)
        else:
            value = raw
        tokens.append((kind, value, m.start(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self, value=None):
        if self.i >= len(self.tokens):
            return None
        tok = self.tokens[self.i]
        return tok if value is None or (tok[0] == "punct" and tok[1] == value) else None

    def expect(self, what: str):
        tok = self.peek()
        if tok is None:
            raise OptionError(f"pipeline syntax error: expected {what} at the end of {self.text!r}")
        if what in "(),=[]" and not (tok[0] == "punct" and tok[1] == what):
            raise OptionError(f"pipeline syntax error at column {tok[2]}: expected {what!r}, got {tok[1]!r} in {self.text!r}")
        if what == "name" and tok[0] != "word":
            raise OptionError(f"pipeline syntax error at column {tok[2]}: expected a pass name, got {tok[1]!r} in {self.text!r}")
        self.i += 1
        return tok[1]

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        items = [self.item()]
        while self.peek(","):
            self.i += 1
            items.append(self.item())
        if self.peek() is not None:
            raise OptionError(f"pipeline syntax error at column {self.peek()[2]}: unexpected {self.peek()[1]!r} in {self.text!r}")
        return items

    def item(self):
        name, options = self.expect("name"), {}
        if self.peek("("):
            self.i += 1
            while not self.peek(")"):
                key = self.expect("name")
                self.expect("=")
                if key in options:
                    raise OptionError(f"option {key!r} given twice for {name!r} in {self.text!r}")
                options[key] = self.value()
                if not self.peek(")"):
                    self.expect(",")
            self.expect(")")
        return name, options

    def value(self):
        tok = self.peek()
        if tok is None:
            raise OptionError(f"pipeline syntax error: expected a value at the end of {self.text!r}")
        if self.peek("["):
            self.i += 1
            values = []
            while not self.peek("]"):
                values.append(self.value())
                if not self.peek("]"):
                    self.expect(",")
            self.expect("]")
            return tuple(values)
        self.i += 1
        kind, value, col = tok
        if kind == "punct":
            raise OptionError(f"pipeline syntax error at column {col}: expected a value, got {value!r} in {self.text!r}")
        if kind == "word":
            return {"true": True, "false": False, "none": None}.get(value.lower(), value)
        return value


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        if _BARE_WORD.match(value) and value.lower() not in ("true", "false", "none"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value)


@dataclass(frozen=True)
class Step:
    info: PassInfo
    options: Any

    @property
    def name(self) -> str:
        return self.info.name

    def non_default_options(self) -> dict[str, Any]:
        default = self.info.options()
        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)
                if getattr(self.options, f.name) != getattr(default, f.name)}

    def __str__(self) -> str:
        opts = self.non_default_options()
        if not opts:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + ")"


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: "str | Pipeline") -> "Pipeline":
        if isinstance(text, Pipeline):
            return text
        if not isinstance(text, str) or not text.strip():
            raise OptionError(f"a pipeline is a non-empty string such as 'fold_bn,dce' or a preset "
                             f"({', '.join(PRESETS)}); got {text!r}")
        steps = []
        for name, options in _Parser(text).items():
            if name in PRESETS:
                if options:
                    raise OptionError(f"preset {name!r} takes no options; write its passes out: {PRESETS[name]}")
                steps.extend(cls.parse(PRESETS[name]).steps)
                continue
            if name not in registered_passes():
                raise OptionError(f"unknown pass {name!r} in pipeline {text!r}; registered passes: "
                                 f"{', '.join(registered_passes())}; presets: {', '.join(PRESETS)}")
            info = get_pass(name)
            steps.append(Step(info, info.make_options(options)))
        pipeline = cls(tuple(steps))
        pipeline.check_order()
        return pipeline

    def check_order(self) -> None:
        """Each pass's declared `requires` (earlier passes it needs) and `before` (passes it must precede)."""
        for i, step in enumerate(self.steps):
            earlier = [s.name for s in self.steps[:i]]
            missing = [r for r in step.info.requires if r not in earlier]
            if missing:
                raise OptionError(f"pass {step.name!r} requires {', '.join(missing)} earlier in the "
                                 f"pipeline; got {str(self)!r}")
            later = next((j for j, s in enumerate(self.steps[:i]) if s.name in step.info.before), None)
            if later is not None:
                fixed = Pipeline((*self.steps[:later], step, *self.steps[later:i], *self.steps[i + 1:]))
                raise OptionError(f"pass {step.name!r} must run before {self.steps[later].name!r}; write "
                                  f"{str(fixed)!r} instead of {str(self)!r}")

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def uuid(self) -> str:
        """A hash of the canonical text, each pass's version and all its options (defaults too)."""
        payload = [(s.name, s.info.version, {k: format_value(v) for k, v in dataclasses.asdict(s.options).items()})
                   for s in self.steps]
        return hashlib.sha256(json.dumps([str(self), payload], sort_keys=True).encode()).hexdigest()[:16]

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext, *, verify: bool = False) -> torch.fx.GraphModule:
        """Run every step in order; attach the `PipelineReport` as `gm.edge_report`. Buffers the graph
        writes (a step counter) hold the same values after as before."""
        # Passes run calibration data through the graph; some reach a strict torch.export.
        with state_kept(written_buffers(gm)), dynamo_caches_kept():
            gm = self._run_steps(gm, ctx, verify)
        return gm

    def _run_steps(self, gm: torch.fx.GraphModule, ctx: PassContext, verify: bool) -> torch.fx.GraphModule:
        from .analysis.shape_prop import verify_graph

        report = PipelineReport(str(self))
        done: list[str] = []
        for step in self.steps:
            start = time.perf_counter()
            result = step.info.fn(gm, step.options, ctx)
            seconds = time.perf_counter() - start
            gm = result.graph_module
            if verify:
                try:
                    verify_graph(gm, ctx.example_inputs)
                except Exception as exc:
                    before = ", ".join(done) or "none"
                    raise PassVerificationError(f"verify failed after pass {str(step)!r} (passes before it: {before}): "
                                       f"{exc}") from exc
            report.records.append(PassRecord(str(step), result.modified, dict(result.stats), seconds))
            done.append(str(step))
        gm.edge_report = report
        return gm


@dataclass
class PassRecord:
    step: str
    modified: bool
    stats: dict[str, Any]
    seconds: float


@dataclass
class PipelineReport:
    pipeline: str
    records: list[PassRecord] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"pipeline: {self.pipeline}", "| pass | modified | ms | stats |", "|---|---|---|---|"]
        for r in self.records:
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()) or "-"
            lines.append(f"| {r.step} | {'yes' if r.modified else 'no'} | {r.seconds * 1e3:.1f} | {stats} |")
        return "\n".join(lines)
