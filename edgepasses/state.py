"""State a graph writes: buffers (a step counter, a cache) and inputs changed in place.

torch.export's unlifted graphs keep such writes as in-place ops at the end (`copy_(buffer, new)`).
Targets whose programs are stateless leave these writes to PyTorch (`backends/partition.py`);
calibration, which runs the model many times before it is compiled, must leave the state as it found it.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Iterator

import torch
import torch.fx


def written_argument(node: torch.fx.Node) -> torch.fx.Node | None:
    """The constant (`get_attr`) or graph input an op writes in place, or None."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None
    for position, argument in enumerate(schema.arguments):
        written = argument.alias_info is not None and argument.alias_info.is_write
        value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
        if written and isinstance(value, torch.fx.Node) and value.op in ("get_attr", "placeholder"):
            return value
    return None


def state_writes(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, torch.fx.Node]:
    """Each op writing a buffer or an input in place -> the node it writes."""
    writes = {}
    for node in gm.graph.nodes:
        written = written_argument(node)
        if written is not None:
            writes[node] = written
    return writes


def written_buffers(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors of the buffers `gm` writes (the model's own: frozen constants share their storage)."""
    targets = dict.fromkeys(n.target for n in state_writes(gm).values() if n.op == "get_attr")
    return [operator.attrgetter(t)(gm) for t in targets]  # a target may be nested: "sub.steps"


@contextlib.contextmanager
def state_kept(buffers: list[torch.Tensor]) -> Iterator[None]:
    """Inside, runs may write `buffers`; after, they hold what they held before (calibration must not
    advance a step counter or fill a cache the user's next call reads)."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


# Frozen attribute name (`_frozen_l_self_modules_sub_buffers_steps_`) -> the user's path of the buffer
# (`sub.steps`), for the buffers compiled graphs write: targets name them in their reports.
_USER_PATHS: dict[str, str] = {}


def remember_user_paths(frozen: torch.fx.GraphModule, paths: dict[str, str], written: list[torch.Tensor]) -> None:
    """Record the user's path of each frozen constant among `written` (matched by storage)."""
    storages = {t.untyped_storage().data_ptr() for t in written}
    for name, path in paths.items():
        if getattr(frozen, name).untyped_storage().data_ptr() in storages:
            _USER_PATHS[name] = path


def user_path(attribute: str) -> str:
    """The user's path of a written buffer's frozen attribute, or the attribute name itself."""
    return _USER_PATHS.get(attribute, attribute)
