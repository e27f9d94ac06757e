"""A graph with dynamic dims on TVM: one static program per input shape, built on its first call.

TVM's Relax importer does take symbolic dims, but not through our lowering: measured on a small CNN,
a symbolic batch dim imported and built, while symbolic height/width failed in the NCHWc conv
schedule (`conv_nchwc` reads static extents); MetaSchedule tunes static shapes only, and the int8
kernels `quant.py` calls take static shapes. A static build per shape keeps every part of the
lowering (schedules, tuning records, int8 kernels, partitions) for any dynamic graph, at the cost of
one TVM build on the first call with each new shape, which the lowering warns of once.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.utils._pytree as pytree

from edgepasses.dynamic_shapes import describe, dynamic_dims, range_check
from edgepasses.errors import InputMismatchError

log = logging.getLogger("edgepasses")


def warn_one_program_per_shape(gm: torch.fx.GraphModule) -> None:
    log.warning("target 'tvm' compiles one program per input shape: this graph has dynamic dims (%s), so each "
                "new input shape costs a TVM build on its first call (compile with dynamic=False, or call it "
                "with few distinct shapes, such as padded batches)", describe(dynamic_dims(gm)))


class PerShapeProgram(torch.nn.Module):
    """Calls the static program `build(args, kwargs)` made for the shapes of the call's inputs, building
    it on the first call with those shapes. Dims outside their ranges, and other dtypes, are refused."""

    def __init__(self, gm: torch.fx.GraphModule, build: Callable[[tuple, dict], Callable], example_inputs: tuple):
        super().__init__()
        self._build = build
        self._check_range = range_check(gm)
        self._dtypes = [n.meta["val"].dtype for n in gm.graph.nodes
                        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
        self.programs: dict[tuple, Callable] = {}  # shape signature -> the static program built for it
        first = self._program(tuple(example_inputs), {})  # now: an import failure is a compile-time error
        self.edge_lowering = first.edge_lowering
        self.weights_mb = getattr(first, "weights_mb", self.edge_lowering.weights_mb)

    def forward(self, *args, **kwargs):
        return self._program(args, kwargs)(*args, **kwargs)

    def _program(self, args: tuple, kwargs: dict) -> Callable:
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        signature = tuple((tuple(x.shape), x.dtype) for x in leaves)
        program = self.programs.get(signature)
        if program is None:
            self._check(leaves)
            program = self.programs[signature] = self._build(args, kwargs)
        return program

    def _check(self, leaves: list[torch.Tensor]) -> None:
        given = [x.dtype for x in leaves]
        if given != self._dtypes:
            raise InputMismatchError(f"the TVM program was compiled for inputs of dtype {_names(self._dtypes)}; "
                                     f"got {_names(given)}: call it with those, or compile again for these")
        self._check_range(leaves)


def _names(dtypes: list[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)
