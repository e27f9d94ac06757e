"""The `openvino` target: `openvino.convert_model` on the exported program, then `compile_model`.

Inference precision is set explicitly (OpenVINO would pick bf16 on a CPU with AMX) and
read back from the compiled model, so a report says what really ran. When OpenVINO's
PyTorch frontend has no conversion for an op, the graph is split: OpenVINO runs the
partitions it converts, PyTorch the rest, and one warning names each op left behind.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from edgepasses.errors import OptionError
from edgepasses.quant import QuantCaps, cpu_int8_saturates

from .. import Lowering, tensors_mb
from ..partition import fallbacks_of, lower_by_partition, report_fallbacks, sparse24_layers, warn_dense_sparse24

PRECISIONS = ("f32", "bf16")


def compile_config(precision: str, cache_dir: str | None = None) -> dict[str, str]:
    """The one CPU configuration we and the benchmark's direct-OpenVINO peer both use."""
    if precision not in PRECISIONS:
        raise OptionError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if cache_dir:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def convert_exported(exported: torch.export.ExportedProgram):
    """The OpenVINO model of an exported program (its frontend turns weight Q/DQ into i8 constants)."""
    import openvino as ov

    with _root_logger_kept():
        return ov.convert_model(exported)


def constants_mb(ov_model) -> float:
    constants = (op for op in ov_model.get_ops() if op.get_type_name() == "Constant")
    return sum(op.get_byte_size() for op in constants) / 1e6


@contextlib.contextmanager
def _root_logger_kept():
    """convert_model sets the root logger to ERROR and, when conversion fails, leaves it there,
    which would hide our fallback warning and every other library's."""
    root = logging.getLogger()
    level, filters = root.level, list(root.filters)
    try:
        yield
    finally:
        root.setLevel(level)
        root.filters = filters


def _input_shapes(exported: torch.export.ExportedProgram) -> list[list[int]]:
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    return [list(placeholders[name].meta["val"].shape) for name in exported.graph_signature.user_inputs]


class OpenVINOProgram(torch.nn.Module):
    """A compiled OpenVINO model behind the calling convention of the module it replaced."""

    def __init__(self, ov_model, exported: torch.export.ExportedProgram, precision: str = "f32",
                 cache_dir: str | None = None):
        """`ov_model` converted from `exported` (or rewritten from it, as NNCF does), compiled for
        the exported input shapes: OpenVINO's converter leaves batch and spatial sizes dynamic,
        which costs shape inference on every call (~10 % of MobileNetV2 at batch 1)."""
        import openvino as ov

        super().__init__()
        ov_model.reshape(dict(zip(ov_model.inputs, map(ov.PartialShape, _input_shapes(exported)), strict=True)))
        self.weights_mb = constants_mb(ov_model)
        self.compiled = compiled = ov.Core().compile_model(ov_model, "CPU", compile_config(precision, cache_dir))
        self.request = compiled.create_infer_request()
        self.in_spec, self.out_spec = exported.call_spec.in_spec, exported.call_spec.out_spec
        # Kept so `edgepasses.save` (and the compile cache) write this model without converting again.
        self.ov_model, self.exported = ov_model, exported
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32"

    @classmethod
    def from_module(cls, module: torch.nn.Module, example_inputs: tuple, precision: str,
                    cache_dir: str | None = None) -> "OpenVINOProgram":
        return cls.from_exported(torch.export.export(module, example_inputs), precision, cache_dir)

    @classmethod
    def from_exported(cls, exported: torch.export.ExportedProgram, precision: str,
                      cache_dir: str | None = None) -> "OpenVINOProgram":
        return cls(convert_exported(exported), exported, precision, cache_dir)

    def integer_compute_ops(self) -> int:
        """Compute ops (conv, matmul) OpenVINO's compiled model runs in u8/i8: int8 that really ran."""
        count = 0
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
            count += layer in _COMPUTE_LAYERS and precision in ("u8", "i8")
        return count

    def forward(self, *args, **kwargs):
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        results = self.request.infer([x.detach().contiguous().numpy() for x in leaves], share_inputs=True)
        outputs = [torch.from_numpy(results[i]) for i in range(len(results))]
        return pytree.tree_unflatten(outputs, self.out_spec)


_COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
_NO_RULE = re.compile(r"No conversion rule found for operations:\s*(.+)")
_FAILED = re.compile(r"^-- (\S+) with a message:\s*\n(.+)$", re.MULTILINE)


def failed_ops(message: str) -> dict[str, str]:
    """Op name -> reason, from the report of OpenVINO's PyTorch frontend."""
    failed = {}
    for match in _NO_RULE.finditer(message):
        for op in match.group(1).split(","):
            failed[op.strip()] = "OpenVINO's PyTorch frontend has no conversion rule for it"
    for op, reason in _FAILED.findall(message):
        failed.setdefault(op.strip(), f"OpenVINO failed to convert it: {reason.strip()}")
    return failed


def _openvino_decompositions():
    """The decomposition table OpenVINO's `convert_model` applies to an exported program."""
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
    from torch.export.decomp_utils import CustomDecompTable

    table = CustomDecompTable()
    for op in ops_to_not_decompose():
        table.pop(op, None)
    return table


class OpenVINOTarget:
    name = "openvino"
    # u8 activations / i8 per-channel weights: what its FakeQuantize-to-int8 transformations expect.
    quant_caps = QuantCaps(bits=(8,), symmetric_by_default=False, saturating_int8=cpu_int8_saturates())

    def unavailable_reason(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed: pip install 'edgepasses[openvino]'"
        return None

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        from openvino.frontend import OpConversionFailure

        compile_config(precision)  # validate before the slow part
        warn_dense_sparse24(self.name, sparse24_layers(gm), "OpenVINO's CPU plugin has no 2:4 kernels")
        exported = torch.export.export(gm, example_inputs)
        try:
            program = OpenVINOProgram.from_exported(exported, precision, cache_dir)
            program.edge_lowering = Lowering(self.name, program.precision, partitions=1,
                                             int8_ops=program.integer_compute_ops(),
                                             weights_mb=program.weights_mb)
            return program
        except OpConversionFailure as exc:
            failure = str(exc)
        return self._lower_partitioned(exported, failed_ops(failure), failure, strict=strict,
                                       precision=precision, cache_dir=cache_dir)

    def _lower_partitioned(self, exported, failed: dict[str, str], failure: str, *, strict: bool,
                           precision: str, cache_dir: str | None) -> torch.fx.GraphModule:
        # Partition the graph OpenVINO actually converts (after its decompositions), so the names
        # in its failure report are the names of our nodes.
        decomposed = exported.run_decompositions(_openvino_decompositions()).module()
        unsupported = {n: failed[str(n.target)] for n in decomposed.graph.nodes
                       if n.op == "call_function" and str(n.target) in failed}
        if not unsupported:
            raise RuntimeError(f"OpenVINO could not convert the graph and the failing ops are not in it "
                               f"after decomposition, so it cannot be partitioned:\n{failure}")
        fallbacks = fallbacks_of(unsupported)
        report_fallbacks(self.name, fallbacks, strict=strict)
        programs = []

        def compile_partition(sub, samples):
            programs.append(OpenVINOProgram.from_module(sub, samples, precision, cache_dir))
            return programs[-1]

        lowered = lower_by_partition(decomposed, unsupported, compile_partition, prefix="openvino_")
        ran = sorted({p.precision for p in programs}) or [precision]
        lowered.edge_lowering = Lowering(self.name, ",".join(ran), len(programs), fallbacks,
                                         int8_ops=sum(p.integer_compute_ops() for p in programs),
                                         weights_mb=sum(p.weights_mb for p in programs) + tensors_mb(lowered))
        return lowered
