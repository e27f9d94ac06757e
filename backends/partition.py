"""Split a graph into what a target runs and what stays in PyTorch, and say so.

Partitions come from torch's `CapabilityBasedPartitioner`; constants read only inside a
partition move into it, so the target sees weights as constants and not as inputs. A
quantize and the dequantizes reading it are never cut apart: a boundary between them would
hand the next program integer codes where every consumer expects floats (OpenVINO then fails
on a MatMul with a u8 input, and PyTorch would multiply raw codes).
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
from edgepasses.graph_utils import SPARSE24
from edgepasses.quant.patterns import is_dequantize, is_quantize
from edgepasses.state import state_writes as written_state
from edgepasses.state import user_path

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


def handing_on() -> bool:
    """Whether a target chain takes the fallbacks of the target lowering now (`handing_on_fallbacks`)."""
    return _HANDED_ON.get()


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
    # call_function only: a partition's placeholder copies the meta of the layer whose output it takes
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(SPARSE24)]


def compute_ops(gm: torch.fx.GraphModule) -> int:
    """The op count a placement report gives for a graph or partition."""
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def state_writes(gm: torch.fx.GraphModule, target: str) -> dict[torch.fx.Node, str]:
    """Each op writing a buffer or an input in place -> why `target` leaves it to PyTorch.

    A compiled program of a stateless runtime (OpenVINO, TVM) reads a buffer as a constant and
    drops writes to it, so a counter would read 0 on every call: the writes run in PyTorch instead,
    on the model's own tensors, and the buffer becomes an input of the programs reading it.
    """
    writes = {}
    for node, written in written_state(gm).items():
        kind = "buffer" if written.op == "get_attr" else "input"
        why = "state kept across calls" if kind == "buffer" else "the caller sees the change"
        _trace_to_written_value(node)
        writes[node] = (f"writes {kind} {readable_name(gm, written)!r} in place ({why}), which the {target} "
                        "program cannot do")
    return writes


def _trace_to_written_value(node: torch.fx.Node) -> None:
    """Give an unlifted `copy_` (which has no source line) the user's line that computed the value
    it writes (`self.cnt += 1`), so reports point there."""
    value = node.args[1] if len(node.args) > 1 else None
    if not node.meta.get("stack_trace") and isinstance(value, torch.fx.Node) and value.meta.get("stack_trace"):
        node.meta["stack_trace"] = value.meta["stack_trace"]


def readable_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """A buffer's path in the user's model (`sub.steps`), or an input's placeholder name."""
    return user_path(node.target) if node.op == "get_attr" else node.name


def _absorb_constants(partition) -> None:
    """Move into the partition each `get_attr` whose every user is inside it."""
    for node in list(partition.nodes):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and all(u in partition.nodes for u in arg.users):
                partition.add_node(arg)


def quant_groups(gm: torch.fx.GraphModule) -> list[set[torch.fx.Node]]:
    """Each quantize (`quantized_decomposed.quantize_per_*`, any overload) with the dequantizes that
    read its codes: the node sets a partition boundary must not cut."""
    groups = []
    for node in gm.graph.nodes:
        if is_quantize(node):
            readers = {u for u in node.users if is_dequantize(u)}
            if readers:
                groups.append({node, *readers})
    return groups


def with_quant_partners(gm: torch.fx.GraphModule, unsupported: dict[torch.fx.Node, str]) -> dict[torch.fx.Node, str]:
    """`unsupported` plus the quantize/dequantize partners of the nodes in it, so pairs stay together in
    PyTorch. Targets call this before reporting fallbacks, so the report names every op left behind."""
    kept = dict(unsupported)
    for group in quant_groups(gm):
        out = sorted((n for n in group if n in unsupported), key=lambda n: n.name)
        for node in group - set(out) if out else ():
            kept[node] = (f"its quantize/dequantize partner {out[0].name} runs in PyTorch, and a partition "
                          "boundary between them would pass integer codes where floats are expected")
    return kept


def with_their_dequantizes(gm: torch.fx.GraphModule, layers: list[torch.fx.Node]) -> set[torch.fx.Node]:
    """`layers` and the dequantizes they read, to be placed apart from the rest of the graph: each such
    dequantize first gets its own copy of a quantize it shares with other readers (q/k/v reading one
    input), so that `with_quant_partners` moves the layers' quantizes and not their neighbours'."""
    dequantizes = {a for n in layers for a in n.all_input_nodes if is_dequantize(a)}
    for group in quant_groups(gm):
        if group & dequantizes and len(group) > 2:
            _one_quantize_per_reader(gm, group)
    return set(layers) | dequantizes


def _split_quant_groups(partitions, groups: list[set[torch.fx.Node]]) -> list[set[torch.fx.Node]]:
    """The groups whose nodes the proposed partitions put in different places."""
    where = {node: id(p) for p in partitions for node in p.nodes}
    return [g for g in groups if len({where.get(n) for n in g}) > 1]


def _propose_partitions(gm: torch.fx.GraphModule, excluded: set[torch.fx.Node],
                        only: set[torch.fx.Node] | None) -> list:
    """Partitions of the supported compute nodes, no quantize/dequantize group cut apart."""
    excluded, only = set(excluded), None if only is None else set(only)
    _warn_unreported_partners(gm, excluded, only)
    while True:
        groups = quant_groups(gm)
        for group in groups:  # a group with one member left out stays out whole
            if any(n in excluded or (only is not None and n not in only) for n in group):
                excluded |= group

        def is_supported(_submodules, node: torch.fx.Node) -> bool:
            return node.op == "call_function" and node not in excluded and (only is None or node in only)

        partitioner = CapabilityBasedPartitioner(gm, create_op_support(is_supported),
                                                 allows_single_node_partition=True)
        partitions = partitioner.propose_partitions()
        split = _split_quant_groups(partitions, groups)
        if not split:
            return partitions
        shared = [g for g in split if len(g) > 2]
        if shared:
            # The partitioner keeps partitions acyclic, so dequantizes of one quantize can land in
            # different partitions (q/k/v projections reading one input): give each its own quantize.
            for group in shared:
                copies = _one_quantize_per_reader(gm, group)
                if only is not None:
                    only |= copies
            continue
        # A pair the partitioner still separates: keep it in PyTorch, named in a warning.
        nodes = sorted((n for g in split for n in g), key=lambda n: n.name)
        log.warning("partitioning would cut %d quantize/dequantize pair(s) apart; they run in PyTorch:\n%s",
                    len(split), "\n".join(f"  - {n.target} (node {n.name}, {user_source(n)})" for n in nodes))
        excluded |= set(nodes)


def _warn_unreported_partners(gm: torch.fx.GraphModule, excluded: set[torch.fx.Node],
                              only: set[torch.fx.Node] | None) -> None:
    """One WARNING for the partners `with_quant_partners` would have added, when the caller did not
    add them to the ops it reported (they run in PyTorch all the same)."""
    candidates = {n: "" for n in excluded}
    added = [n for n in with_quant_partners(gm, candidates) if n not in excluded and (only is None or n in only)]
    if added:
        log.warning("%d quantize/dequantize op(s) run in PyTorch with their partner, which the target cannot "
                    "run:\n%s", len(added),
                    "\n".join(f"  - {n.target} (node {n.name}, {user_source(n)})" for n in added))


def _one_quantize_per_reader(gm: torch.fx.GraphModule, group: set[torch.fx.Node]) -> set[torch.fx.Node]:
    """Give every dequantize of the group's quantize a copy of it (the same op on the same input,
    so the same codes). Returns the copies."""
    quantize = next(n for n in group if is_quantize(n))
    readers = sorted((n for n in group if n is not quantize), key=lambda n: n.name)
    copies = set()
    for reader in readers[1:]:
        with gm.graph.inserting_after(quantize):
            twin = gm.graph.call_function(quantize.target, quantize.args, quantize.kwargs)
        twin.meta = dict(quantize.meta)
        reader.replace_input_with(quantize, twin)
        copies.add(twin)
    return copies


def _sample_input(node: torch.fx.Node) -> torch.Tensor:
    """Zeros with the shape, dtype and strides the partition input has when the graph runs: a
    partition may `view` it (attention's output, transposed back), which needs those strides."""
    val = node.meta["val"]
    extent = 1 + sum((size - 1) * stride for size, stride in zip(val.shape, val.stride())) if val.numel() else 0
    return torch.zeros(extent, dtype=val.dtype).as_strided(val.shape, val.stride())


def lower_by_partition(gm: torch.fx.GraphModule, unsupported: dict[torch.fx.Node, str],
                       compile_partition: Callable[[torch.fx.GraphModule, tuple], torch.nn.Module],
                       prefix: str, only: set[torch.fx.Node] | None = None) -> torch.fx.GraphModule:
    """Fuse the supported compute nodes (those in `only` when given) into submodules, each replaced
    by `compile_partition(sub, samples)`. A quantize and its dequantizes land in the same
    partition or all stay in PyTorch (`with_quant_partners` names the latter for a report)."""
    partitions = _propose_partitions(gm, set(unsupported), only)
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
