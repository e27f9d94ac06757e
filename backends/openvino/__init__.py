"""The `openvino` target: `openvino.convert_model` on the exported program, then `compile_model`.

Inference precision is set explicitly (OpenVINO would pick bf16 on a CPU with AMX) and
read back from the compiled model, so a report says what really ran. When OpenVINO's
PyTorch frontend has no conversion for an op, the graph is split: OpenVINO runs the
partitions it converts, PyTorch the rest, and one warning names each op left behind.
Two forms transformers' decoders produce are rewritten, exactly, before conversion
(`for_openvino`): the KV cache's cat with a 1-d empty tensor, and grouped-query attention.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import Callable

import torch
import torch.fx
import torch.utils._pytree as pytree

from edgepasses.dynamic_shapes import export, symbol_range
from edgepasses.errors import ArtifactError, OptionError, first_line
from edgepasses.quant import QuantCaps, cpu_int8_saturates

from .. import Lowering, TargetBase, distribution_versions, tensors_mb
from ..input_check import input_signature, mismatch
from ..partition import (fallbacks_of, lower_by_partition, report_fallbacks, sparse24_layers, state_writes,
                         warn_dense_sparse24, with_quant_partners)

PRECISIONS = ("f32", "bf16")
aten = torch.ops.aten
log = logging.getLogger("edgepasses")


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


def _convert(exported: torch.export.ExportedProgram, required: bool):
    """The OpenVINO model of the whole graph; None (with a WARNING) where it does not convert and
    the caller can do without it."""
    try:
        return convert_exported(exported)
    except Exception as exc:
        if required:
            raise ArtifactError(f"save: OpenVINO could not convert the whole graph: {first_line(exc)}") from exc
        log.warning("save: OpenVINO could not convert the whole graph, so only the graph is saved "
                    "(lower() it after load to run it split): %s", first_line(exc))
        return None


def for_openvino(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with the exact rewrites OpenVINO's PyTorch frontend needs, in a copy when there are any
    (the caller's graph, which the compile cache and `save` keep, stays as it is)."""
    if not any(_is_legacy_empty_cat(n) or _is_gqa_attention(n) for n in gm.graph.nodes):
        return gm
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in list(copied.graph.nodes):
        if _is_legacy_empty_cat(node):
            node.update_arg(0, _cat_inputs_kept(node))
        elif _is_gqa_attention(node):
            _repeat_kv_heads(copied.graph, node)
    copied.graph.eliminate_dead_code()
    copied.recompile()
    return copied


def _cat_inputs_kept(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [t for t in node.args[0] if tuple(t.meta["val"].shape) != (0,)]


def _is_legacy_empty_cat(node: torch.fx.Node) -> bool:
    """A cat of higher rank with 1-d empty inputs, which PyTorch skips and OpenVINO cannot.

    transformers' DynamicCache starts each layer's keys and values as `torch.tensor([])` (shape
    [0]) and appends with `torch.cat([cache, new], dim=-2)`. PyTorch skips 1-d empty cat inputs
    whatever the other ranks (a legacy rule), but OpenVINO's Concat needs equal ranks and fails
    ("Axis -2 out of the tensor rank range [-1, 0]"). Dropping them is exact: they add no
    elements, and what remains must have the output's dtype (no promotion came from them).
    """
    if node.target != aten.cat.default or node.meta.get("val") is None or node.meta["val"].dim() == 1:
        return False
    tensors = node.args[0]
    if not all(isinstance(t, torch.fx.Node) and isinstance(t.meta.get("val"), torch.Tensor) for t in tensors):
        return False
    kept = _cat_inputs_kept(node)
    return 0 < len(kept) < len(tensors) and all(t.meta["val"].dtype == node.meta["val"].dtype for t in kept)


def _is_gqa_attention(node: torch.fx.Node) -> bool:
    """Attention with grouped key/value heads (`enable_gqa=True`, Llama's GQA): OpenVINO's frontend
    ignores the flag, and its ScaledDotProductAttention then rejects keys with fewer heads."""
    return node.target == aten.scaled_dot_product_attention.default and bool(node.kwargs.get("enable_gqa"))


def _repeat_kv_heads(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Repeat each key/value head for its group of query heads (what `enable_gqa` means: head h of
    the query reads head h // group), then attend without the flag."""
    query, key, value = node.args[:3]
    heads = query.meta["val"].shape[-3]
    repeated = []
    for tensor in (key, value):
        shape = list(tensor.meta["val"].shape)
        group = heads // shape[-3]
        with graph.inserting_before(node):
            x = graph.call_function(aten.unsqueeze.default, (tensor, -3))
            x = graph.call_function(aten.expand.default, (x, shape[:-2] + [group] + shape[-2:]))
            repeated.append(graph.call_function(aten.reshape.default, (x, shape[:-3] + [heads] + shape[-2:])))
    node.args = (query, *repeated, *node.args[3:])
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "enable_gqa"}


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


def _input_shapes(exported: torch.export.ExportedProgram) -> list:
    """Each user input's shape for OpenVINO: static sizes as they are, a dynamic dim as its bounded range
    (unbounded: -1), so that one compiled model serves every size the exported program takes."""
    import openvino as ov

    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    shapes = []
    for name in exported.graph_signature.user_inputs:
        dims = []
        for size in placeholders[name].meta["val"].shape:
            if isinstance(size, torch.SymInt):
                low, high = symbol_range(size)
                dims.append(ov.Dimension(low, -1 if high is None else high))
            else:
                dims.append(ov.Dimension(size))
        shapes.append(ov.PartialShape(dims))
    return shapes


def input_positions(ov_model, exported: torch.export.ExportedProgram) -> list[int]:
    """For each input of `ov_model`, the position of the exported program's user input it takes.

    The converter names each input after its placeholder and drops inputs no output depends on
    (a partition input read only by `_assert_tensor_metadata`), so the counts can differ: match
    by name. A rewritten model whose inputs lost those names (NNCF keeps them) must keep them all.
    """
    names = list(exported.graph_signature.user_inputs)
    positions = [next((names.index(n) for n in port.get_names() if n in names), None) for port in ov_model.inputs]
    if None not in positions:
        return positions
    if len(positions) == len(names):  # same inputs, renamed: the converter keeps their order
        return list(range(len(names)))
    unknown = [sorted(port.get_names()) for port, i in zip(ov_model.inputs, positions) if i is None]
    raise RuntimeError(f"OpenVINO model inputs {unknown} match none of the exported program's inputs {names}, "
                       f"and the counts differ ({len(positions)} vs {len(names)}), so which tensor feeds them is "
                       "unknown; convert the model from this exported program (openvino.convert_model)")


class OpenVINOProgram(torch.nn.Module):
    """A compiled OpenVINO model behind the calling convention of the module it replaced."""

    def __init__(self, ov_model, exported: torch.export.ExportedProgram, precision: str = "f32",
                 cache_dir: str | None = None):
        """`ov_model` converted from `exported` (or rewritten from it, as NNCF does), compiled for
        the exported input shapes: OpenVINO's converter leaves batch and spatial sizes dynamic,
        which costs shape inference on every call (a visible share of a small CNN's time)."""
        import openvino as ov

        super().__init__()
        self.input_positions = input_positions(ov_model, exported)
        shapes = _input_shapes(exported)
        ov_model.reshape({port: shapes[i] for port, i in zip(ov_model.inputs, self.input_positions)})
        self.weights_mb = constants_mb(ov_model)
        self.compiled = compiled = ov.Core().compile_model(ov_model, "CPU", compile_config(precision, cache_dir))
        self.request = compiled.create_infer_request()
        self.in_spec, self.out_spec = exported.call_spec.in_spec, exported.call_spec.out_spec
        self.signature = input_signature(exported)
        # Kept so `edgepasses.save` (and the compile cache) write this model without converting again.
        self.ov_model, self.exported = ov_model, exported
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32"

    @classmethod
    def from_module(cls, module: torch.nn.Module, example_inputs: tuple, precision: str,
                    cache_dir: str | None = None) -> "OpenVINOProgram":
        return cls.from_exported(export(module, example_inputs), precision, cache_dir)

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
        leaves = pytree.tree_leaves((args, kwargs))  # in the order of the exported user inputs
        inputs = [leaves[i].detach().contiguous().numpy() for i in self.input_positions]
        try:
            results = self.request.infer(inputs, share_inputs=True)
        except RuntimeError:  # its first line is a C++ source location: name the shapes when they are why
            error = mismatch("OpenVINO", self.signature, leaves)
            if error is None:
                raise
            raise error from None
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


class OpenVINOTarget(TargetBase):
    name = "openvino"
    # u8 activations / i8 per-channel weights: what its FakeQuantize-to-int8 transformations expect.
    quant_caps = QuantCaps(bits=(8,), symmetric_by_default=False, saturating_int8=cpu_int8_saturates(),
                           saturation_per_layer=True)
    artifact_files = ("model.xml", "model.bin")  # OpenVINO IR: data for OpenVINO's reader

    def unavailable_reason(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed: pip install 'edgepasses[openvino]'"
        return None

    def cache_key(self) -> str:
        return distribution_versions("openvino")

    def can_save(self, program) -> bool:
        return program is None or isinstance(program, OpenVINOProgram)  # None: converted from the graph

    def save_program(self, folder: Path, exported, program, *, required: bool,
                     compress_to_fp16: bool = False) -> dict | None:
        """The IR of `program`'s model, or converted from `exported`; weights f32 unless compress_to_fp16."""
        import openvino as ov

        ov_model = program.ov_model if isinstance(program, OpenVINOProgram) else _convert(exported, required)
        if ov_model is None:
            return None
        ov.save_model(ov_model, str(folder / "model.xml"), compress_to_fp16=compress_to_fp16)
        return {"openvino_version": ov.get_version(), "weights": "f16" if compress_to_fp16 else "f32"}

    def load_program(self, folder: Path, info: dict, exported, *, precision: str, cache_dir: str | None,
                     notes: list[str]) -> "OpenVINOProgram":
        import openvino as ov

        try:
            return OpenVINOProgram(ov.Core().read_model(str(folder / "model.xml")), exported, precision, cache_dir)
        except Exception as exc:  # OpenVINO raises its own error types for a bad model
            raise ArtifactError(f"load: OpenVINO could not read or compile {folder / 'model.xml'}: "
                                f"{first_line(exc)}") from exc

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        compile_config(precision)  # validate before the slow part
        warn_dense_sparse24(self.name, sparse24_layers(gm), "OpenVINO's CPU plugin has no 2:4 kernels")
        return self._lower(for_openvino(gm), example_inputs, strict=strict, precision=precision,
                           cache_dir=cache_dir)

    def _lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool, precision: str,
               cache_dir: str | None) -> Callable:
        from openvino.frontend import OpConversionFailure

        exported = export(gm, example_inputs)
        if state_writes(gm, self.name):  # a whole-graph program would read the state as a constant
            return self._lower_partitioned(exported, {}, "", strict=strict, precision=precision, cache_dir=cache_dir)
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
        unsupported.update(state_writes(decomposed, self.name))
        if not unsupported:
            raise RuntimeError(f"OpenVINO could not convert the graph and the failing ops are not in it "
                               f"after decomposition, so it cannot be partitioned:\n{failure}")
        unsupported = with_quant_partners(decomposed, unsupported)
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
