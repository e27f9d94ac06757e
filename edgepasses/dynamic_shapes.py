"""Symbolic input dims: from Dynamo's graph, through the canonical form, to every export after it.

A canonical graph is dynamic when some of its placeholders' `meta["val"]` have symbolic sizes
(`torch.export` with dynamic shapes gives them, their ranges in the fake mode's shape environment).
Those values are the one record of which dims are dynamic: `propagate_fake` starts from them, and
`export` derives its `dynamic_shapes` from them, so a pass or target that keeps the placeholders
keeps the dims dynamic without knowing about them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch.export import Dim
from torch.utils._sympy.numbers import int_oo

from .errors import DynamicShapesError, InputMismatchError


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic dim of an input: `input_ids[1] in 2..512` (max None: unbounded)."""
    input: str
    position: int   # of the input among the graph's inputs
    dim: int
    min: int
    max: int | None
    symbol: str = ""

    def __str__(self) -> str:
        return f"{self.input}[{self.dim}] in {self.min}..{'inf' if self.max is None else self.max}"

    def to_dict(self) -> dict:
        return {"input": self.input, "position": self.position, "dim": self.dim, "min": self.min, "max": self.max, "symbol": self.symbol}


def symbol_range(size: torch.SymInt) -> tuple[int, int | None]:
    """The range the shape environment knows for a symbolic size (what export and Dynamo derived)."""
    env, expr = size.node.shape_env, size.node.expr
    # A symbol's own range: bound_sympy narrows a size to 2.. where export allowed 0 and 1.
    bounds = env.var_to_range[expr] if expr in env.var_to_range else env.bound_sympy(expr)
    upper = None if bounds.upper in (int_oo, float("inf")) or not bounds.upper.is_finite else int(bounds.upper)
    return max(int(bounds.lower), 0), upper


def _symbolic_dims(value) -> dict[int, torch.SymInt]:
    if not isinstance(value, torch.Tensor):
        return {}
    return {d: s for d, s in enumerate(value.shape) if isinstance(s, torch.SymInt) and not s.node.is_nested_int()
            and s.node.expr.free_symbols}


def _input_name(node: torch.fx.Node) -> str:
    """The input's name in the user's call: Dynamo names `x` l_x_, a keyword argument l_kwargs_x_, and the
    first of `*args` l_args_0_ (args[0])."""
    if not node.name.startswith("l_"):
        return node.name
    name = node.name.removeprefix("l_").removesuffix("_").removeprefix("kwargs_")
    return re.sub(r"^args_(\d+)$", r"args[\1]", name)


def dynamic_dims(gm: torch.fx.GraphModule) -> list[DynamicDim]:
    """The dynamic dims of `gm`'s inputs, from its placeholders' symbolic values; [] when static."""
    found = []
    for position, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        for dim, size in _symbolic_dims(node.meta.get("val")).items():
            low, high = symbol_range(size)
            found.append(DynamicDim(_input_name(node), position, dim, low, high, str(size.node.expr)))
    return found


def symbolic_inputs(gm: torch.fx.GraphModule) -> list | None:
    """The placeholders' symbolic values (fake tensors sharing one shape environment), to propagate
    from instead of example inputs; None when `gm` is static."""
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return values if any(_symbolic_dims(v) for v in values) else None


def export_shapes(gm: torch.fx.GraphModule) -> tuple | None:
    """`dynamic_shapes` for `torch.export.export(gm, ...)`: each dynamic dim with its range, so that an
    export of a rewritten graph keeps the dims the canonical form has; None when static."""
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = tuple({d: Dim.DYNAMIC(min=low, max=high) for d, (low, high) in
                    ((d, symbol_range(s)) for d, s in _symbolic_dims(v).items())} or None for v in values)
    return shapes if any(shapes) else None


def export(module: torch.nn.Module, example_inputs: tuple, shapes_of: torch.fx.GraphModule | None = None):
    """`torch.export.export` keeping the dynamic dims of `shapes_of` (by default `module`, a graph)."""
    graph = shapes_of if shapes_of is not None else module
    shapes = export_shapes(graph) if isinstance(graph, torch.fx.GraphModule) else None
    return export_with_shapes(module, example_inputs, shapes)


def export_with_shapes(module: torch.nn.Module, example_inputs: tuple, shapes: tuple | None,
                       decompositions: dict | None = None):
    """`torch.export.export` with `dynamic_shapes` (then `run_decompositions(decompositions)`, if given).
    A range that takes sizes 0 or 1 (Dynamo's with mark_unbacked or backed_size_oblivious: it traced the
    model for them) is exported size-obliviously, as Dynamo traced it; export would otherwise claim 2 as
    the least size."""
    takes_size_one = any(getattr(hint, "min", 2) is not None and getattr(hint, "min", 2) < 2
                         for dims in shapes or () for hint in (dims or {}).values())
    with torch._guards.tracing(None), \
            torch.fx.experimental._config.patch(backed_size_oblivious=takes_size_one or _oblivious_now()):
        # Outside any enclosing trace: its fake mode must not take in the export's guards.
        exported = torch.export.export(module, tuple(example_inputs), dynamic_shapes=shapes)
        return exported if decompositions is None else exported.run_decompositions(decompositions)


def _oblivious_now() -> bool:
    return bool(torch.fx.experimental._config.backed_size_oblivious)


def describe(dims: list[DynamicDim]) -> str:
    return ", ".join(map(str, dims)) or "static"


# The attribute of an example input that says which of its dims are dynamic: {dim: (min, max)}. Checks of
# calibration batches against the example inputs read it (any size in range is fine in those dims).
EXAMPLE_DIMS = "_edge_dynamic_dims"


def fits(given: torch.Tensor, example: torch.Tensor) -> bool:
    """Whether `given` has `example`'s shape, where dims marked dynamic on it may take any size in range."""
    dynamic = getattr(example, EXAMPLE_DIMS, {})
    if given.dim() != example.dim():
        return False
    return all(g == w or (d in dynamic and dynamic[d][0] <= g and (dynamic[d][1] is None or g <= dynamic[d][1]))
               for d, (g, w) in enumerate(zip(given.shape, example.shape)))


def shape_text(example: torch.Tensor) -> str:
    """`(2, 16)`, or `(2, 2..256)` with the ranges of its dynamic dims."""
    dynamic = getattr(example, EXAMPLE_DIMS, {})
    if not dynamic:
        return str(tuple(example.shape))
    return "(" + ", ".join(f"{dynamic[d][0]}..{dynamic[d][1] or 'inf'}" if d in dynamic else str(s)
                           for d, s in enumerate(example.shape)) + ")"


# ------------------------------------------------------------------ from Dynamo's graph

def dynamo_input_shapes(placeholders: list[torch.fx.Node], example_inputs: list,
                        user_positions: list[int]) -> tuple[tuple, tuple | None]:
    """(concrete example tensors, `dynamic_shapes` for torch.export) of the tensor user inputs of a
    Dynamo graph. Symbolic sizes take the example's own size (Dynamo's hint) and the range Dynamo
    derived; one symbol shared by several inputs is one dim range for each (export relates them)."""
    examples, shapes = [], []
    for i in user_positions:
        value = placeholders[i].meta.get("example_value", example_inputs[i])
        if not isinstance(value, torch.Tensor):
            raise DynamicShapesError(f"input {_input_name(placeholders[i])} of the graph is a {type(value).__name__}; "
                                     "the edge backend compiles tensor inputs (sizes derive from their shapes)")
        ranges = {d: symbol_range(s) for d, s in _symbolic_dims(value).items()}
        shapes.append({d: Dim.DYNAMIC(min=low, max=high) for d, (low, high) in ranges.items()} or None)
        example = _concrete(example_inputs[i], value)
        if ranges:
            example = example.detach()  # a tensor object of our own (the user's may be the example) to mark
            setattr(example, EXAMPLE_DIMS, ranges)
        examples.append(example)
    return tuple(examples), (tuple(shapes) if any(shapes) else None)


def _concrete(given, value: torch.Tensor) -> torch.Tensor:
    """A real tensor for an input: Dynamo's own, or zeros of its hinted shape where it gave a fake one."""
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(given, torch.Tensor) and not is_fake(given):
        return given
    shape = [s.node.hint if isinstance(s, torch.SymInt) else s for s in value.shape]
    if any(s is None for s in shape):
        raise DynamicShapesError(f"an input has a size without an example value ({tuple(value.shape)}), as "
                                 "torch._dynamo.mark_unbacked gives: mark it with mark_dynamic instead")
    return torch.zeros(shape, dtype=value.dtype)


def range_check(gm: torch.fx.GraphModule) -> Callable[[list], None]:
    """A call-time check that each dynamic dim of the inputs lies in its range: the compiled program was
    built for that range only (a position table, a bounded runtime shape), and Dynamo's own guards may
    know a wider one than the export derived."""
    dims = dynamic_dims(gm)
    if not dims:
        return lambda inputs: None

    def check(inputs: list) -> None:
        for d in dims:
            size = inputs[d.position].shape[d.dim]
            if size < d.min or (d.max is not None and size > d.max):
                raise InputMismatchError(
                    f"input {d.input} has size {size} in dim {d.dim}, outside the range {d.min}..{d.max} this "
                    f"program was compiled for ({describe(dims)}): call it with sizes in range, or compile "
                    "again for these (a larger mark_dynamic max, or a model that accepts longer inputs)")
    return check

