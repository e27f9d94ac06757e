"""int8 under torch.compile when Dynamo splits the model, against `edgepasses.compress` without the split.

    python -m edgepasses.bench.graph_breaks [--target openvino] [--batches 8]

- a two-block CNN with a `print` between the blocks (one graph break), against the same model
  without the print, compressed whole;
- timm's EfficientFormer-L1 (random init): its attention biases are cached in a dict on the first
  eval call, so the next call recompiles with the cached tensor as an extra graph input.
Each: `fold_bn,quantize` with the same calibration batches; output SQNR against the float model on
held-out inputs. Prints a Markdown table with the machine and the date.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import edgepasses
from edgepasses.analysis.sqnr import sqnr_db

from .report import cpu_text


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class BrokenCNN(nn.Module):
    """Two residual blocks with a print between them when `graph_break`."""

    def __init__(self, graph_break: bool = True):
        super().__init__()
        self.graph_break = graph_break
        self.stem, self.block1, self.block2 = nn.Conv2d(3, 32, 3, padding=1), _Block(32), _Block(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.block1(torch.relu(self.stem(x)))
        if self.graph_break:
            print("", end="")
        return self.head(self.block2(x).mean((2, 3)))

    def without_break(self) -> "BrokenCNN":
        self.graph_break = False
        return self


def _efficientformer():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", pretrained=False).eval()
    return model, (1, 3, 224, 224)


def _broken_cnn():
    torch.manual_seed(0)
    model = BrokenCNN().eval()
    for module in model.modules():  # trained-like batch norms, so fold_bn has something to fold
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2)
            module.running_mean.normal_()
    return model, (2, 3, 32, 32)


def compare(name: str, make, target: str, batches: int, held_out: int = 4) -> str:
    model, shape = make()
    torch.manual_seed(1)
    calibration = [(torch.randn(shape),) for _ in range(batches)]
    inputs = [torch.randn(shape) for _ in range(held_out)]
    compilations = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "fold_bn,quantize", "target": target, "calibration": calibration,
        "on_compile": compilations.append})
    with torch.no_grad():
        compiled_out = [compiled(x) for x in inputs]  # first: its first call fills any caches itself
        references = [model(x) for x in inputs]
        whole_model = model.without_break() if hasattr(model, "without_break") else model
        gm = edgepasses.compress(whole_model, (inputs[0],), "fold_bn,quantize", calibration=calibration,
                                 target=target)
        lowered = edgepasses.lower(gm, (inputs[0],), target)
        whole_out = [lowered(x) for x in inputs]
    reference, ours, whole = (torch.cat(t) for t in (references, compiled_out, whole_out))
    breaks = [c.graph.graph_break for c in compilations if c.graph.graph_break]
    quantized = sum(c.report.records[-1].stats.get("layers_quantized", 0) for c in compilations)
    return (f"| {name} | {len(compilations)} | {len(breaks)} | {quantized} | {sqnr_db(reference, ours):.2f} | "
            f"{sqnr_db(reference, whole):.2f} | {breaks[0] if breaks else '-'} |")


MODELS = {"two-block CNN, print between blocks": _broken_cnn, "timm efficientformer_l1": _efficientformer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="openvino")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"{cpu_text()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, target {args.target}, {args.batches} calibration batches\n")
    print("| model | graphs compiled | graph breaks | layers quantized (all graphs) | torch.compile int8 SQNR dB | "
          "compress (no break) int8 SQNR dB | where Dynamo broke |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, make in MODELS.items():
        print(compare(name, make, args.target, args.batches), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
