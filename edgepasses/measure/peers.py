"""The peers our programs are measured against: the same model compiled by OpenVINO directly, and
NNCF's post-training int8 of it. Both are called through the `OpenVINOProgram` wrapper our openvino
target returns, with its configuration, so a ratio against them shows what our passes and our calling
path add or save, not a difference in wrappers.
"""
from __future__ import annotations

import contextlib
import io

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
