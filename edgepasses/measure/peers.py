"""The peers our programs are measured against: the same model compiled by OpenVINO directly, and
NNCF's post-training int8 of it. Both are called through the `OpenVINOProgram` wrapper our openvino
target returns, with its configuration, so a ratio against them shows what our passes and our calling
path add or save, not a difference in wrappers. For transformers, ONNX Runtime's dynamic int8 too
(`onnxruntime_dynamic_int8`), the usual CPU recipe for them.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from edgepasses.backends.openvino import OpenVINOProgram, convert_exported


def openvino_direct(module: torch.nn.Module, example_inputs: tuple, precision: str = "f32") -> OpenVINOProgram:
    """`torch.export` of `module` converted and compiled by OpenVINO: no passes, no torch.compile."""
    return OpenVINOProgram.from_exported(torch.export.export(module, tuple(example_inputs)), precision)


def nncf_int8(module: torch.nn.Module, example_inputs: tuple, calibration: list[tuple], precision: str = "f32",
              model_type: str | None = None) -> OpenVINOProgram:
    """NNCF's post-training quantization (its defaults) of the converted model on `calibration`, the very
    batches our int8 pipelines get; `model_type` names an `nncf.ModelType` (e.g. "TRANSFORMER")."""
    import nncf

    if not calibration:
        raise ValueError("the NNCF int8 peer needs calibration batches")
    exported = torch.export.export(module, tuple(example_inputs))
    # NNCF draws its progress bars on stdout, which carries only our results.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(convert_exported(exported), nncf.Dataset(calibration, openvino_inputs),
                                  subset_size=len(calibration),
                                  model_type=nncf.ModelType[model_type] if model_type else None)
    return OpenVINOProgram(quantized, exported, precision)


def openvino_inputs(batch: tuple) -> list[np.ndarray]:
    """A calibration batch as the converted model takes it: its tensors, flattened, as arrays."""
    return [x.numpy() for x in pytree.tree_leaves(batch) if isinstance(x, torch.Tensor)]


class OnnxRuntimeProgram:
    """An ONNX Runtime session called like the module it was exported from: torch tensors in (flattened,
    in the order the module takes them), torch tensors out (one, or a tuple)."""

    def __init__(self, session, input_names: list[str]) -> None:
        self.session = session
        self.input_names = input_names
        # The exporter drops inputs the graph does not use (an all-ones attention mask may fold away).
        self._used = {i.name for i in session.get_inputs()}

    def __call__(self, *args):
        leaves = [x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)]
        feed = {name: x.detach().numpy() for name, x in zip(self.input_names, leaves) if name in self._used}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def onnxruntime_dynamic_int8(module: torch.nn.Module, example_inputs: tuple, per_channel: bool = True,
                             reduce_range: bool = False, threads: int | None = None) -> OnnxRuntimeProgram:
    """`module` exported to ONNX and quantized by `onnxruntime.quantization.quantize_dynamic`: int8
    weights (QInt8, per output channel by default: per tensor costs a pretrained encoder far more accuracy),
    activations quantized per tensor at run time; run by
    ONNX Runtime's CPU provider with all graph optimisations and `threads` intra-op threads (torch's by
    default, as the other rows get). `reduce_range`: 7-bit weights, for CPUs whose u8·s8 products
    saturate in 16 bits (AVX2 without VNNI)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [f"input_{i}" for i, x in enumerate(pytree.tree_leaves(tuple(example_inputs)))
             if isinstance(x, torch.Tensor)]
    with tempfile.TemporaryDirectory() as tmp:
        exported, quantized = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        # The TorchScript exporter (dynamo=False): it traces transformers' models in a second, where the
        # dynamo exporter takes several and gives quantize_dynamic the same MatMuls.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(example_inputs), str(exported), input_names=names, dynamo=False)
            quantize_dynamic(exported, quantized, per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        session = ort.InferenceSession(quantized.read_bytes(), options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeProgram(session, names)
