"""The `tensorrt` target: torch_tensorrt's dynamo path on an NVIDIA GPU, with explicit
symmetric int8 Q/DQ and sparse weights for 2:4-masked layers.

TensorRT needs an NVIDIA GPU, and none exists on this project's machines: there the target
says it is unavailable and why. What can be checked without it is: `handover` (the exported
program and build settings TensorRT gets, including that every quantizer is symmetric int8,
the only form TensorRT's explicit quantization runs) and the ONNX Q/DQ export TensorRT's
tools read (`edgepasses.export`, run in onnxruntime by the tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from edgepasses.canonical import user_source
from edgepasses.errors import OptionError, UnsupportedOpError
from edgepasses.graph_utils import constant_value
from edgepasses.quant import QuantCaps
from edgepasses.quant.patterns import QUANTIZE_OPS

from .. import Lowering, TargetBase, distribution_versions, tensors_mb
from ..partition import Fallback, report_fallbacks, sparse24_layers

PRECISIONS = ("f32", "f16")


def _symmetric_int8_range(qmin: int, qmax: int) -> bool:
    """[-q, q] or [-q-1, q] inside int8: [-127, 127] weights, [-128, 127] activations, 7-bit [-63, 63]."""
    return -128 <= qmin and qmax <= 127 and qmin in (-qmax, -qmax - 1)


@dataclass(frozen=True)
class Handover:
    """What the target gives torch_tensorrt."""
    exported: torch.export.ExportedProgram
    enabled_precisions: frozenset
    sparse_weights: bool    # 2:4-masked layers: let TensorRT pick its sparse tactics
    int8_quantizers: int


def _zero_point_is_zero(gm: torch.fx.GraphModule, zero_point) -> bool:
    if isinstance(zero_point, torch.fx.Node):
        value = constant_value(gm, zero_point)
        return value is not None and not bool(value.any())
    return zero_point == 0


def asymmetric_quantizers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Quantize nodes TensorRT cannot run, with the reason."""
    bad = {}
    for node in gm.graph.nodes:
        if node.target not in QUANTIZE_OPS:
            continue
        zero_point, qmin, qmax, dtype = node.args[2], *node.args[-3:]
        if dtype != torch.int8 or not _symmetric_int8_range(qmin, qmax) or not _zero_point_is_zero(gm, zero_point):
            bad[node] = (f"{dtype} [{qmin}, {qmax}] with a non-zero or non-constant zero point; TensorRT runs "
                         "symmetric int8 only: quantize for this target (or quantize(symmetric=true))")
    return bad


def handover(gm: torch.fx.GraphModule, example_inputs: tuple, precision: str) -> Handover:
    """The exported program and build settings for TensorRT; refuses quantizers it cannot run."""
    if precision not in PRECISIONS:
        raise OptionError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    bad = asymmetric_quantizers(gm)
    if bad:
        listing = "\n".join(f"  - {n.name} ({user_source(n)}): {why}" for n, why in bad.items())
        raise UnsupportedOpError(f"target 'tensorrt' cannot run {len(bad)} quantizer(s):\n{listing}")
    quantizers = sum(n.target in QUANTIZE_OPS for n in gm.graph.nodes)
    precisions = {torch.float32} | ({torch.float16} if precision == "f16" else set()) | ({torch.int8} if quantizers else set())
    return Handover(torch.export.export(gm, tuple(example_inputs)), frozenset(precisions),
                    sparse_weights=bool(sparse24_layers(gm)), int8_quantizers=quantizers)


def _fallbacks(compiled: torch.fx.GraphModule) -> list[Fallback]:
    """Ops torch_tensorrt's partitioner left to PyTorch (its `_run_on_gpu_*` submodules)."""
    return [Fallback(n.name, str(n.target), "TensorRT has no converter for it (torch_tensorrt partitioner)",
                     user_source(n))
            for name, sub in compiled.named_children() if name.startswith("_run_on_gpu")
            for n in sub.graph.nodes if n.op == "call_function"]


class TensorRTTarget(TargetBase):
    name = "tensorrt"
    quant_caps = QuantCaps(bits=(8,), symmetric_activations_only=True, symmetric_by_default=True)

    def cache_key(self) -> str:
        """Engines are built for this GPU by these versions."""
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"{distribution_versions('torch-tensorrt', 'tensorrt')}; {gpu}"

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "TensorRT needs an NVIDIA GPU with CUDA, and torch sees none here"
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError:
            return "torch_tensorrt is not installed: pip install torch-tensorrt (it pins its own CUDA torch)"
        return None

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        import torch_tensorrt

        inputs = tuple(x.cuda() for x in example_inputs)
        settings = handover(gm.cuda(), inputs, precision)
        compiled = torch_tensorrt.dynamo.compile(
            settings.exported, arg_inputs=inputs, enabled_precisions=set(settings.enabled_precisions),
            sparse_weights=settings.sparse_weights, require_full_compilation=strict, min_block_size=1,
            cache_built_engines=cache_dir is not None, reuse_cached_engines=cache_dir is not None)
        fallbacks = _fallbacks(compiled)
        report_fallbacks(self.name, fallbacks, strict=strict)
        engines = sum(name.startswith("_run_on_acc") for name, _ in compiled.named_children())

        def run(*args):
            device = args[0].device if args else torch.device("cpu")
            out = compiled(*(a.cuda() for a in args))
            return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, out)

        run.edge_lowering = Lowering(self.name, precision, partitions=engines, fallbacks=fallbacks,
                                     int8_ops=settings.int8_quantizers, weights_mb=tensors_mb(gm))
        return run
