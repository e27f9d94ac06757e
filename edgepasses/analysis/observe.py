"""Watching node values while a graph runs: what every data-aware pass measures its statistics with."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.fx


class NodeObserver(torch.fx.Interpreter):
    """Runs a graph and hands each watched node's value to that node's callback."""

    def __init__(self, gm: torch.fx.GraphModule, watch: Mapping[torch.fx.Node, Callable[[Any], None]]):
        super().__init__(gm)
        self.watch = watch

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        callback = self.watch.get(node)
        if callback is not None:
            callback(value)
        return value
