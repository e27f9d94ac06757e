"""`edgepasses onnx`: export a zoo model's compressed graph to ONNX and run it in onnxruntime.

The Q/DQ ONNX is what TensorRT's and onnxruntime's tools consume. onnxruntime runs it twice:
with graph optimisations off (the Q/DQ nodes evaluated as written: must match our graph) and
with its defaults (Q/DQ fused into its integer kernels: its own int8 arithmetic).
"""
from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path

import torch

import edgepasses
from edgepasses.analysis.sqnr import sqnr_db

from edgepasses.zoo import get_model


def _session(path: str, optimised: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimised
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run(session, inputs: tuple) -> torch.Tensor:
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feed)[0])


def onnx_check(name: str, pipeline: str, batches: int = 8, out: str | None = None) -> str:
    import onnx

    zoo = get_model(name)
    data = zoo.calibration(batches + 1)
    gm = edgepasses.compress(zoo.module, zoo.example_inputs, pipeline, calibration=data[:batches])
    with tempfile.TemporaryDirectory() as tmp:
        path = out or str(Path(tmp) / f"{name}.onnx")
        start = time.perf_counter()
        edgepasses.export(gm, zoo.example_inputs, path)
        seconds = time.perf_counter() - start
        ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
        held_out = data[batches]
        with torch.no_grad():
            ours, reference = gm(*held_out), zoo.module(*held_out)
        as_written, fused = (_run(_session(path, o), held_out) for o in (False, True))
    return "\n".join([
        f"### {name}: `{pipeline}` exported to ONNX in {seconds:.1f} s" + (f" ({out})" if out else ""),
        f"ops: {', '.join(f'{op} {n}' for op, n in ops.most_common())}",
        f"onnxruntime, Q/DQ as written vs ours: max abs diff {(as_written - ours).abs().max().item():.3g}, "
        f"SQNR {sqnr_db(ours, as_written):.1f} dB",
        f"onnxruntime, default (fused integer kernels) vs ours: SQNR {sqnr_db(ours, fused):.1f} dB",
        f"ours vs float model: SQNR {sqnr_db(reference, ours):.1f} dB;  onnxruntime default vs float: "
        f"SQNR {sqnr_db(reference, fused):.1f} dB",
    ])
