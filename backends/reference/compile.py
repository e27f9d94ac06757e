"""The reference target's rewritten graph compiled by Inductor, our kernels inside.

Interpreted op by op, the graph around our kernels costs more than the kernels: each LayerNorm,
softmax, GELU, residual add and quantize-dequantize pair left outside them is a separate eager op
with its own pass over memory. Inductor's CPU C++ codegen fuses that glue into loops around the
`edge::` ops, which it calls as extern kernels (they are functional `custom_op`s with fake
implementations, so it can trace and place them without knowing what they do).

State writes stay correct: AOTAutograd functionalizes the graph and copies what it wrote back into
the inputs and buffers it wrote (a GraphModule holds every tensor a `get_attr` reads as a buffer,
and a frozen buffer shares the model's storage: a step counter keeps counting in the model).
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Callable, Iterator

import torch
import torch.fx

from edgepasses.graph_utils import drop_export_guards


class InductorProgram(torch.nn.Module):
    """A lowered graph compiled by Inductor, behind the graph's calling convention (same inputs,
    same output structure). `graph_module` is the graph it was compiled from; its tensors are the
    ones the compiled code reads."""

    def __init__(self, graph_module: torch.fx.GraphModule, compiled: Callable[..., Any], compile_s: float):
        super().__init__()
        self.graph_module = graph_module
        self.compiled = compiled
        self.compile_s = compile_s

    def forward(self, *args: Any) -> Any:
        return self.compiled(*args)


@contextlib.contextmanager
def _tracing_with_shape_env() -> Iterator[None]:
    """A tracing context whose fake mode has a shape environment, as Dynamo's has: without one,
    Inductor bypasses its FX graph cache and generates and compiles the same code again each time."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        yield


def compile_graph(gm: torch.fx.GraphModule, example_inputs: tuple) -> InductorProgram:
    """`gm` compiled by Inductor for `example_inputs`' shapes and strides (an inference program:
    it records no autograd graph, as the reference target's kernels have no backward)."""
    from torch._inductor.compile_fx import compile_fx

    # compile_fx takes ownership of the graph it compiles (it rewrites its codegen and output): give it a copy.
    owned = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    # The compiled code asserts every input's size and stride itself, and torch.export's check can hold
    # Python closures Inductor cannot key its FX graph cache on.
    drop_export_guards(owned)
    start = time.perf_counter()
    with torch.no_grad(), _tracing_with_shape_env():
        compiled = compile_fx(owned, list(example_inputs))
    return InductorProgram(gm, compiled, time.perf_counter() - start)
