"""Inputs a compiled program was not compiled for, named in one line.

OpenVINO and TVM programs are compiled for the static input shapes of the graph they came from;
called with others, their runtimes fail with a C++ source location first. The programs catch
that failure and, when the inputs differ from what they were compiled for, raise this instead
(checked only after a failure: nothing is added to the call path).
"""
from __future__ import annotations

import torch

from edgepasses.errors import InputMismatchError

__all__ = ["InputMismatchError"]

Signature = list[tuple[tuple[int, ...], torch.dtype]]


def input_signature(exported: torch.export.ExportedProgram) -> Signature:
    """(shape, dtype) of each tensor user input of `exported`, in order."""
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    values = (placeholders[name].meta.get("val") for name in exported.graph_signature.user_inputs)
    return [(tuple(v.shape), v.dtype) for v in values if isinstance(v, torch.Tensor)]


def mismatch(runtime: str, expected: Signature, given: list) -> InputMismatchError | None:
    """The error to raise when `given` tensors differ in shape or dtype from `expected`, else None."""
    got = [(tuple(x.shape), x.dtype) for x in given if isinstance(x, torch.Tensor)]
    if got == expected:
        return None
    return InputMismatchError(
        f"the {runtime} program was compiled for inputs {_listed(expected)}; got {_listed(got)}: call it with those, "
        "or compile again for these (edgepasses.lower on an example of them; torch.compile recompiles by itself)")


def _listed(signature: Signature) -> str:
    return ", ".join(f"{list(shape)} {str(dtype).removeprefix('torch.')}" for shape, dtype in signature) or "none"


class NamedShapeGuards(torch.nn.Module):
    """torch.export's input guards of an unlifted module (`_guards_fn`, which fails with `Guard failed:
    input.size()[0] == 2`), raising InputMismatchError naming every expected and given shape instead."""

    _is_impure = True  # as the guards it wraps: dead-code elimination must keep the call (it returns nothing)

    def __init__(self, guards: torch.nn.Module, runtime: str, signature: Signature):
        super().__init__()
        self.guards, self.runtime, self.signature = guards, runtime, signature

    def forward(self, *args, **kwargs):
        try:
            return self.guards(*args, **kwargs)
        except AssertionError:
            error = mismatch(self.runtime, self.signature, list(args))
            if error is None:
                raise
            raise error from None


def name_shape_mismatches(gm: torch.fx.GraphModule, runtime: str) -> None:
    """Make `gm`'s input guards (when it has them) name the shapes on a mismatch."""
    guards = getattr(gm, "_guards_fn", None)
    if guards is None or isinstance(guards, NamedShapeGuards):
        return
    values = (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder")
    signature = [(tuple(v.shape), v.dtype) for v in values if isinstance(v, torch.Tensor)]
    gm._guards_fn = NamedShapeGuards(guards, runtime, signature)
