"""An ordered list of targets ("tensorrt,openvino,reference", or `auto`): each partition goes to
the first target in the list that runs all its ops.

The first target that runs here lowers the whole graph. What it cannot run (the ops its
converter rejects, which it would otherwise leave to PyTorch) is split into partitions and
handed to the rest of the list, and so on down the list; only the last target's leftovers run
in PyTorch. One WARNING per hand-over names the ops, and `Lowering.placements` says which
target runs which partition.

2:4-sparse Linears (`sparsify_24`) go to a later target with a 2:4 kernel when the first has none
(OpenVINO's CPU plugin would run them dense): "openvino,reference" runs the rest of the graph on
OpenVINO and those layers on the reference target's 2:4 kernel. `pipeline="auto"` measures whether
that pays.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch.fx

from edgepasses.graph_utils import LINEAR_OPS

from . import Lowering, Target, TargetBase, tensors_mb
from .partition import (compute_ops, handing_on_fallbacks, lower_by_partition, report_fallbacks, sparse24_layers,
                        with_quant_partners, with_their_dequantizes)

log = logging.getLogger("edgepasses")


@dataclass(frozen=True)
class Placement:
    partition: str     # the submodule of the lowered graph, or "whole graph"
    target: str
    ops: int | None    # compute ops in it (None: not counted)

    def __str__(self) -> str:
        ops = f", {self.ops} op(s)" if self.ops is not None else ""
        return f"{self.partition} -> {self.target}{ops}"


class TargetChain(TargetBase):
    """Targets in order of preference, all usable here (see `of_available`). Its result mixes
    runtimes, so it stores no program of its own in an artifact."""

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.name = ",".join(t.name for t in targets)

    @classmethod
    def of_available(cls, targets: list[Target], spec: str) -> "TargetChain":
        reasons = {t.name: t.unavailable_reason() for t in targets}
        available = [t for t in targets if reasons[t.name] is None]
        if not available:
            raise RuntimeError(f"no target of {spec!r} can run here: " +
                               "; ".join(f"{name}: {why}" for name, why in reasons.items()))
        for name, why in reasons.items():
            if why:
                log.info("target list %r: skipping %r: %s", spec, name, why)
        return cls(available)

    @property
    def sparse24_kernels(self) -> bool:
        """Whether its 2:4 Linears run on a 2:4 kernel: on a later target where the first has none."""
        return any(t.sparse24_kernels for t in self.targets)

    @property
    def quant_caps(self):
        """Passes prepare the graph for the target that runs most of it: the first."""
        return self.targets[0].quant_caps

    def cache_key(self) -> str:
        return "; ".join(f"{t.name}: {t.cache_key()}" for t in self.targets)

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        first, rest = self.targets[0], TargetChain(self.targets[1:])
        if not rest.targets:
            lowered = first.lower(gm, example_inputs, strict=strict, precision=precision, cache_dir=cache_dir)
            _fill_placements(lowered.edge_lowering, lowered, compute_ops(gm))
            return lowered
        sparse = _sparse_linears_for(first, rest, gm)
        if sparse:
            return self._sparse_on_rest(gm, sparse, first, rest, strict=strict, precision=precision,
                                        cache_dir=cache_dir)
        with handing_on_fallbacks():
            lowered = first.lower(gm, example_inputs, strict=False, precision=precision, cache_dir=cache_dir)
        lowering = lowered.edge_lowering
        handed = _handed_nodes(lowered, lowering)
        if not handed:
            _fill_placements(lowering, lowered, compute_ops(gm))
            if lowering.fallbacks:  # ops the target's own partitioner keeps (TensorRT): cannot hand on
                report_fallbacks(first.name, lowering.fallbacks, strict=strict)
            return lowered
        log.warning("target %r cannot run %d op(s); the next targets in the list (%s) run them:\n%s", first.name,
                    len(lowering.fallbacks), rest.name, "\n".join(f"  - {f}" for f in lowering.fallbacks))
        return self._hand_on(lowered, lowering, handed, rest, strict=strict, precision=precision,
                             cache_dir=cache_dir)

    def _sparse_on_rest(self, gm: torch.fx.GraphModule, sparse: set[str], first: Target, rest: "TargetChain",
                        **options) -> torch.fx.GraphModule:
        """`first` runs the graph but the 2:4-sparse Linears `sparse` (node names), which `rest` runs."""
        lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # partitioning rewrites the graph
        reason = f"2:4-sparse Linear: {first.name} has no 2:4 kernel, {rest.name} has"
        layers = with_their_dequantizes(lowered, [n for n in lowered.graph.nodes if n.name in sparse])
        handed = with_quant_partners(lowered, dict.fromkeys(layers, reason))
        programs = []

        def lower_on_first(sub: torch.fx.GraphModule, samples: tuple) -> Callable:
            programs.append(first.lower(sub, samples, **options))
            return programs[-1]

        lower_by_partition(lowered, handed, lower_on_first, prefix=f"{first.name}_")
        log.info("target %r: %d 2:4-sparse Linear(s) run on %s, the rest of the graph on %s", self.name,
                 len(sparse), rest.name, first.name)
        lowering = Lowering(first.name, ",".join(sorted({p.edge_lowering.precision for p in programs}))
                            or options["precision"], len(programs),
                            int8_ops=sum(p.edge_lowering.int8_ops for p in programs),
                            weights_mb=sum(p.edge_lowering.weights_mb for p in programs) + tensors_mb(lowered))
        names = {n.name for n in handed}
        return self._hand_on(lowered, lowering, {n for n in lowered.graph.nodes if n.name in names}, rest,
                             **options)

    def _hand_on(self, lowered: torch.fx.GraphModule, lowering: Lowering, handed: set[torch.fx.Node],
                 rest: "TargetChain", **options) -> torch.fx.GraphModule:
        own = dict(getattr(lowered, "edge_partition_ops", {}))
        prefix = f"{rest.targets[0].name}_"
        lower_by_partition(lowered, {}, lambda sub, samples: rest.lower(sub, samples, **options), prefix=prefix,
                           only=handed)
        placements = [Placement(name, lowering.target, ops) for name, ops in own.items()]
        subs = []
        for name, ops in lowered.edge_partition_ops.items():
            if name.startswith(prefix):
                subs.append(lowered.get_submodule(name).edge_lowering)
                placements += [Placement(f"{name}/{p.partition}" if p.partition != "whole graph" else name,
                                         p.target, p.ops if p.partition != "whole graph" else ops)
                               for p in subs[-1].placements]
        lowered.edge_lowering = Lowering(
            target=",".join(dict.fromkeys([lowering.target] + [s.target for s in subs])),
            precision=lowering.precision, partitions=lowering.partitions + sum(s.partitions for s in subs),
            fallbacks=[f for s in subs for f in s.fallbacks], int8_ops=lowering.int8_ops + sum(s.int8_ops for s in subs),
            sparse24_ops=lowering.sparse24_ops + sum(s.sparse24_ops for s in subs),
            weights_mb=lowering.weights_mb, placements=placements)
        return lowered


def _sparse_linears_for(first: Target, rest: TargetChain, gm: torch.fx.GraphModule) -> set[str]:
    """The 2:4-sparse Linears of `gm` (node names) that go to `rest`: where `first` has no 2:4 kernel
    and a target in `rest` has."""
    if first.sparse24_kernels or not rest.sparse24_kernels:
        return set()
    return {n.name for n in sparse24_layers(gm) if n.target in LINEAR_OPS}


def _handed_nodes(lowered, lowering: Lowering) -> set[torch.fx.Node]:
    """The nodes the target left to PyTorch in its lowered graph (empty when it is not a graph)."""
    if not isinstance(lowered, torch.fx.GraphModule) or not lowering.fallbacks:
        return set()
    names = {f.node for f in lowering.fallbacks}
    return {n for n in lowered.graph.nodes if n.op == "call_function" and n.name in names}


def _fill_placements(lowering: Lowering, lowered, ops: int) -> None:
    if lowering.placements:
        return
    partition_ops = getattr(lowered, "edge_partition_ops", None)
    if partition_ops:
        lowering.placements = [Placement(name, lowering.target, n) for name, n in partition_ops.items()]
    else:
        lowering.placements = [Placement("whole graph", lowering.target, ops)]
