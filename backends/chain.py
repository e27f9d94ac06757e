"""An ordered list of targets ("tensorrt,openvino,reference", or `auto`): each partition goes to
the first target in the list that runs all its ops.

The first target that runs here lowers the whole graph. What it cannot run (the ops its
converter rejects, which it would otherwise leave to PyTorch) is split into partitions and
handed to the rest of the list, and so on down the list; only the last target's leftovers run
in PyTorch. One WARNING per hand-over names the ops, and `Lowering.placements` says which
target runs which partition.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.fx

from . import Lowering, Target, TargetBase
from .partition import compute_ops, handing_on_fallbacks, lower_by_partition, report_fallbacks

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
            weights_mb=lowering.weights_mb, placements=placements)
        return lowered


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
