"""Split a graph into what a target runs and what stays in PyTorch, and say so.

Partitions come from torch's `CapabilityBasedPartitioner`; constants read only inside a
partition move into it, so the target sees weights as constants and not as inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import create_op_support
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from edgepasses.canonical import user_source
from edgepasses.errors import UnsupportedOpError

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class Fallback:
    node: str
    op: str
    reason: str
    source: str

    def __str__(self) -> str:
        return f"{self.op} (node {self.node}, {self.source}): {self.reason}"


def fallbacks_of(unsupported: dict[torch.fx.Node, str]) -> list[Fallback]:
    return [Fallback(n.name, str(n.target), reason, user_source(n)) for n, reason in unsupported.items()]


# Set by a target chain while one of its targets lowers: what that target cannot run goes to
# the next target in the list, not to PyTorch, so the chain reports it instead.
_HANDED_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("edgepasses_handed_on", default=False)


@contextlib.contextmanager
def handing_on_fallbacks():
    """Inside, `report_fallbacks` is silent: the caller (a target chain) reports what it does with them."""
    token = _HANDED_ON.set(True)
    try:
        yield
    finally:
        _HANDED_ON.reset(token)


def report_fallbacks(target: str, fallbacks: list[Fallback], *, strict: bool) -> None:
    """Raise (strict) or log ONE warning that names every op that stays in PyTorch."""
    if not fallbacks or _HANDED_ON.get():
        return
    listing = "\n".join(f"  - {f}" for f in fallbacks)
    if strict:
        raise UnsupportedOpError(
            f"target {target!r} cannot run {len(fallbacks)} op(s) and strict=True forbids running them in "
            f"PyTorch:\n{listing}\nWhat to do: replace or remove these ops, pick another target, or pass "
            "strict=False to run them in PyTorch.")
    log.warning("target %r cannot run %d op(s); they run in PyTorch:\n%s", target, len(fallbacks), listing)


def warn_dense_sparse24(target: str, layers: list[torch.fx.Node], why: str) -> None:
    """One WARNING naming the 2:4-sparse layers (`sparsify_24`) a target runs as dense ones."""
    if layers:
        names = ", ".join(n.name for n in layers)
        log.warning("target %r runs %d 2:4-sparse layer(s) dense, so 2:4 saves no time there (%s): %s. "
                    "The reference target runs 2:4 Linear layers on its sparse kernel.", target, len(layers),
                    why, names)


def sparse24_layers(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("sparse24")]


def compute_ops(gm: torch.fx.GraphModule) -> int:
    """The op count a placement report gives for a graph or partition."""
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def _absorb_constants(partition) -> None:
    """Move into the partition each `get_attr` whose every user is inside it."""
    for node in list(partition.nodes):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and all(u in partition.nodes for u in arg.users):
                partition.add_node(arg)


def _sample_input(node: torch.fx.Node) -> torch.Tensor:
    val = node.meta["val"]
    return torch.zeros(val.shape, dtype=val.dtype)


def lower_by_partition(gm: torch.fx.GraphModule, unsupported: dict[torch.fx.Node, str],
                       compile_partition: Callable[[torch.fx.GraphModule, tuple], torch.nn.Module],
                       prefix: str, only: set[torch.fx.Node] | None = None) -> torch.fx.GraphModule:
    """Fuse the supported compute nodes (those in `only` when given) into submodules, each replaced
    by `compile_partition(sub, samples)`."""
    def is_supported(_submodules, node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node not in unsupported and (only is None or node in only)

    partitioner = CapabilityBasedPartitioner(gm, create_op_support(is_supported),
                                             allows_single_node_partition=True)
    partitions = partitioner.propose_partitions()
    for partition in partitions:
        _absorb_constants(partition)
    fuse_by_partitions(gm, [p.nodes for p in partitions], prefix=prefix, always_return_tuple=True)
    sizes = {}  # partition name -> compute ops in it, for the placement report
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(prefix):
            sub = gm.get_submodule(node.target)
            sizes[node.target] = compute_ops(sub)
            samples = tuple(_sample_input(a) for a in node.args)
            setattr(gm, node.target, compile_partition(sub, samples))
    gm.recompile()
    gm.edge_partition_ops = {**getattr(gm, "edge_partition_ops", {}), **sizes}
    return gm
