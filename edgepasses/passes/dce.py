"""`dce`: remove nodes whose results nobody uses, and the constants only they read."""
from __future__ import annotations

import torch.fx

from ..graph_utils import remove_unused_attributes
from ..pass_base import NoOptions, PassContext, PassResult, register_pass


@register_pass("dce")
def dce(gm: torch.fx.GraphModule, opts: NoOptions, ctx: PassContext) -> PassResult:
    """Dead-code elimination over nodes, then over unused parameters, buffers and submodules."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    nodes_removed = before - len(gm.graph.nodes)
    attributes_removed = remove_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, modified=bool(nodes_removed or attributes_removed),
                      stats={"nodes_removed": nodes_removed, "constants_removed": attributes_removed})
