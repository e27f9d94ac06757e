"""Fake-tensor propagation: keep `meta["val"]` true after a pass, and check that it is."""
from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..dynamic_shapes import symbolic_inputs


def propagate_fake(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Recompute `meta["val"]` of every node from `example_inputs` (real or fake tensors); a graph with
    dynamic dims from its placeholders' symbolic values, so that its dims stay dynamic."""
    symbolic = symbolic_inputs(gm)
    if symbolic is not None:
        mode = next(v.fake_mode for v in symbolic if isinstance(v, torch.Tensor))
        allowed, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True  # the graph's constants are real
        try:
            with mode:
                FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*symbolic)
        finally:
            mode.allow_non_fake_inputs = allowed
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    with mode:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def verify_graph(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Lint the graph, re-propagate fake tensors and compare them with the `meta["val"]` a pass left.

    Raises with the first node whose recorded shape or dtype is stale.
    """
    gm.graph.lint()
    gm.recompile()
    recorded = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    propagate_fake(gm, example_inputs)
    for node in gm.graph.nodes:
        old, new = recorded[node.name], node.meta.get("val")
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            if old.shape != new.shape or old.dtype != new.dtype:
                raise ValueError(f"node {node.name} ({node.target}) has stale meta['val']: recorded "
                                 f"{tuple(old.shape)} {old.dtype}, propagates to {tuple(new.shape)} {new.dtype}")
        elif node.op not in ("output",) and old is None and isinstance(new, torch.Tensor) and node.op != "get_attr":
            raise ValueError(f"node {node.name} ({node.target}) has no meta['val']; call propagate_fake after rewriting")
