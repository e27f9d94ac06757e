"""The `reference` target: our own kernels (`edgepasses.kernels`) where a pattern has one,
PyTorch for the rest.

Quantize-dequantize linear/conv2d → `edge::int8_linear` / `edge::int8_conv2d` (linears on 7-bit codes →
`edge::int8_linear_packed`, on the kept half where the codes are 2:4 sparse); float linears with
2:4-sparse weights → `edge::sparse24_linear`; low-rank pairs → `edge::lowrank_linear`. The
graph is rewritten in a copy (the caller's GraphModule keeps its fake-quant form), and a
quantized conv/linear/matmul left without an int8 kernel is reported as a fallback.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.fx

from edgepasses.errors import OptionError
from edgepasses.graph_utils import remove_unused_attributes
from edgepasses.quant import QuantCaps, cpu_int8_saturates

from .. import Lowering, TargetBase, tensors_mb
from ..input_check import name_shape_mismatches
from ..partition import fallbacks_of, handing_on, report_fallbacks, sparse24_layers, warn_dense_sparse24

# Inductor compiles the graph around our kernels unless target_options ask otherwise (the test suite,
# which reads lowered graphs, turns the default off in its conftest; its compile tests ask for it).
COMPILE_DEFAULT = True
log = logging.getLogger("edgepasses")


class ReferenceTarget(TargetBase):
    """Its program is the rewritten graph, compiled by Inductor where `compile`: a compile cache hit
    lowers the stored graph again."""

    name = "reference"
    # The int8 kernels are exact for any int8 weight, but their fast AVX2 path adds u8·s8 pairs in
    # 16 bits (vpmaddubsw), which is exact only for 7-bit weights: ask for those where it is the path.
    quant_caps = QuantCaps(bits=(8,), saturating_int8=cpu_int8_saturates())
    sparse24_kernels = True  # float, and int8 on 7-bit codes

    def __init__(self, compile: bool | None = None):
        """`compile`: run the rewritten graph as Inductor's compiled C++ around our kernels (its glue
        fused) instead of op by op in eager PyTorch; None: `COMPILE_DEFAULT`."""
        if compile is not None and not isinstance(compile, bool):
            raise OptionError(f"target_options['reference']['compile'] must be True or False; got {compile!r}")
        self.compile = COMPILE_DEFAULT if compile is None else compile

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        if precision != "f32":
            raise OptionError(f"the reference target runs precision 'f32' only; got {precision!r}")
        from .int8 import layer_kernels, lower_int8, pack_linear_weights, runs_packed_24
        from .lowrank import lower_lowrank_pairs
        from .sparse24 import lower_sparse24

        lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # new attribute owners, same tensors
        name_shape_mismatches(lowered, "reference")
        int8_ops, left = lower_int8(lowered)
        fallbacks = fallbacks_of(left)
        report_fallbacks(self.name, fallbacks, strict=strict)
        # The packed layout has a CPU kernel only (CUDA tensors keep int8_linear and its Triton kernel).
        on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
        sparse24_ops = (pack_linear_weights(lowered) if on_cpu else 0) + lower_sparse24(lowered)
        dense = [n for n in sparse24_layers(lowered)
                 if not (runs_packed_24(n) or n.target == torch.ops.edge.sparse24_linear.default)]
        warn_dense_sparse24(self.name, dense, "its 2:4 kernels are for Linear layers (float, and int8 with 7-bit "
                            "weights); convs and other int8 Linears run dense")
        lower_lowrank_pairs(lowered)
        lowered.graph.eliminate_dead_code()
        remove_unused_attributes(lowered)
        lowered.recompile()
        lowering = Lowering(self.name, precision, partitions=1, fallbacks=fallbacks, int8_ops=int8_ops,
                            sparse24_ops=sparse24_ops, weights_mb=tensors_mb(lowered), kernels=layer_kernels(lowered))
        program = self._compiled(lowered, example_inputs, fallbacks) if self.compile else lowered
        lowering.compile_s = getattr(program, "compile_s", 0.0)  # an InductorProgram's
        program.edge_lowering = lowering
        return program

    def _compiled(self, lowered: torch.fx.GraphModule, example_inputs: tuple, fallbacks: list) -> Callable:
        """`lowered` compiled by Inductor; left a graph where a target chain partitions it to hand its
        fallbacks on."""
        from .compile import compile_graph

        if fallbacks and handing_on():
            return lowered
        try:
            return compile_graph(lowered, example_inputs)
        except Exception as error:  # Inductor's failures have no common type; the graph still runs
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            log.warning("target 'reference': Inductor could not compile the graph around our kernels (%s: %s); "
                        "it runs op by op in eager PyTorch, slower. target_options={'reference': {'compile': "
                        "False}} skips the attempt.", type(error).__name__, first_line[:300])
            return lowered
