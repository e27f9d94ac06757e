"""The tensorrt target: what runs without an NVIDIA GPU is checked here (the handover and the
symmetric Q/DQ ONNX that TensorRT's tools read, in onnxruntime); the build itself skips."""
import numpy as np
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.backends.tensorrt import TensorRTTarget, handover
from edgepasses.errors import OptionError, UnsupportedOpError

pytest.importorskip("torchao")
UNAVAILABLE = TensorRTTarget().unavailable_reason()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 8)).eval()


def _quantized(symmetric: bool):
    x = (torch.randn(1, 4, 8, 8),)
    calibration = [(torch.randn(1, 4, 8, 8),) for _ in range(4)]
    return edgepasses.compress(_model(), x, f"quantize(symmetric={str(symmetric).lower()})", calibration=calibration), x


def test_unavailable_here_says_why():
    if UNAVAILABLE is None:
        pytest.skip("TensorRT is available on this machine")
    assert "NVIDIA GPU" in UNAVAILABLE or "torch_tensorrt" in UNAVAILABLE
    with pytest.raises(RuntimeError, match="cannot run here"):
        edgepasses.lower(edgepasses.compress(_model(), (torch.randn(1, 4, 8, 8),), "dce"),
                         (torch.randn(1, 4, 8, 8),), target="tensorrt")


def test_symmetric_int8_graph_is_handed_over_with_int8_enabled():
    gm, x = _quantized(symmetric=True)
    settings = handover(gm, x, "f16")
    assert settings.enabled_precisions == {torch.float32, torch.float16, torch.int8}
    assert settings.int8_quantizers == 4 and not settings.sparse_weights


def test_asymmetric_quantizers_are_refused_naming_the_node():
    gm, x = _quantized(symmetric=False)
    with pytest.raises(UnsupportedOpError, match="symmetric int8 only"):
        handover(gm, x, "f32")
    with pytest.raises(OptionError, match="precision"):
        handover(edgepasses.compress(_model(), x, "dce"), x, "bf16")


def test_24_sparse_layers_ask_for_sparse_weights():
    x = (torch.randn(1, 4, 8, 8),)
    gm = edgepasses.compress(_model(), x, "sparsify_24")
    assert handover(gm, x, "f32").sparse_weights


def test_symmetric_qdq_onnx_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    gm, x = _quantized(symmetric=True)
    path = edgepasses.export(gm, x, str(tmp_path / "trt.onnx"))
    model = onnx.load(path)
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(initializers[z].dtype == np.int8 and not initializers[z].any()
                               for z in zero_points if z in initializers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # Q/DQ as written
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, gm(*x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(UNAVAILABLE is not None, reason=f"tensorrt target unavailable: {UNAVAILABLE}")
def test_int8_graph_builds_and_matches_on_tensorrt():
    gm, x = _quantized(symmetric=True)
    run = edgepasses.lower(gm, x, target="tensorrt", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(run(*x), gm(*x), rtol=0.05, atol=0.05)
