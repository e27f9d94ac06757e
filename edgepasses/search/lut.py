"""A per-layer latency lookup table (APQ-style) for screening candidates before the whole-model build.

Each conv/linear layer of a candidate is described by what the target sees: its op, input shape,
weight shape (after the candidate's prune / lowrank steps), stride/padding/dilation/groups, and the
group's quantization choice (int8, float, w8, w4). Every distinct description is measured once on
the target as a one-layer model, built with the same passes and lowering as a whole candidate
(`quantize` where the choice asks for it, then `lower`), and cached in `lut.json` in the run
directory. A candidate's predicted latency is the sum over its layers, times a scale fitted on the
trials measured whole (median of measured / sum): the other ops (pooling, adds, the graph's own
overhead) are not in the table.

The structural steps (fold_bn, prune, lowrank) are run to read the layer shapes: they are cheap
next to quantize calibration, lowering and the accuracy evaluation that a screened-out candidate
is spared. A candidate is screened out (the trial is PRUNED, no whole-model build, not counted as
done) when its predicted latency exceeds the `latency_ms` budget, or when a measured trial with no
accuracy drop is at least as small and faster than the prediction by the `margin`: such a candidate
could only win on accuracy, and it cannot beat "no drop" by much.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..graph_utils import CONV_OPS, LINEAR_OPS, layer_name

LUT = "lut.json"
BYTES = {"int8": 1.0, "w8": 1.0, "w4": 0.5, "float": 4.0}


def _shape(node: Any) -> list[int] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return list(val.shape) if val is not None and hasattr(val, "shape") else None


def layer_keys(gm: torch.fx.GraphModule, config: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(layer name, table key, layer description) per conv/linear layer of a structurally compressed graph."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (node.target in CONV_OPS or node.target in LINEAR_OPS):
            continue
        name = layer_name(node)
        quant = config.get(f"quant:{name.split('.')[0]}", "float")
        x, w = _shape(node.args[0]), _shape(node.args[1])
        has_bias = len(node.args) > 2 and node.args[2] is not None
        if node.target in LINEAR_OPS:
            desc = {"op": "linear", "x": x, "w": w, "bias": has_bias}
        else:
            args = list(node.args) + [None] * (7 - len(node.args))
            stride, padding, dilation, groups = (args[3] or [1, 1]), (args[4] or [0, 0]), (args[5] or [1, 1]), args[6] or 1
            if node.target == torch.ops.aten.convolution.default:  # (.., stride, padding, dilation, transposed, out_pad, groups)
                stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
            if isinstance(padding, str):
                padding = [w[-2] // 2, w[-1] // 2] if padding == "same" else [0, 0]
            desc = {"op": "conv2d", "x": x, "w": w, "bias": has_bias, "stride": list(stride), "padding": list(padding),
                    "dilation": list(dilation), "groups": int(groups)}
        if quant in ("w8", "w4") and desc["op"] != "linear":
            quant = "float"  # weight-only quantization sees Linears only
        desc["quant"] = quant
        out.append((name, json.dumps(desc, sort_keys=True), desc))
    return out


def _one_layer(desc: dict[str, Any]) -> nn.Module:
    w = desc["w"]
    if desc["op"] == "linear":
        return nn.Linear(w[1], w[0], bias=desc["bias"])
    return nn.Conv2d(w[1] * desc["groups"], w[0], tuple(w[2:]), stride=tuple(desc["stride"]),
                     padding=tuple(desc["padding"]), dilation=tuple(desc["dilation"]), groups=desc["groups"],
                     bias=desc["bias"])


_PIPELINES = {"int8": "quantize", "float": None, "w8": "quantize(weight_only=true,bits=8)",
              "w4": "quantize(weight_only=true,bits=4)"}


def measure_layer(desc: dict[str, Any], target: str, warmup: int = 2, rounds: int = 5,
                  min_ms_per_round: float = 5.0) -> float:
    """Median ms of one call of the layer alone, lowered to `target` the way a whole candidate is."""
    from .. import compress
    from ..api import lower
    from .evaluate import time_programs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _one_layer(desc).eval()
        x = torch.randn(desc["x"])
    pipeline = _PIPELINES[desc["quant"]]
    with torch.no_grad():
        gm = compress(module, (x,), pipeline or "dce", calibration=[(x,)] if pipeline else None)
    program = lower(gm, (x,), target=target)
    program(x)
    start = time.perf_counter()
    program(x)
    once_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    reps = max(1, min(200, int(min_ms_per_round / once_ms)))
    t = time_programs({"layer": lambda: [program(x) for _ in range(reps)]}, warmup, rounds)["layer"]
    return t.median_ms / reps


class LatencyTable:
    """The per-layer latency table of one run directory (`lut.json`): measured entries, predictions."""

    def __init__(self, out: "str | Path", target: str, warmup: int = 2, rounds: int = 5):
        self.path = Path(out) / LUT
        self.target, self.warmup, self.rounds = target, warmup, rounds
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.entries: dict[str, float] = data.get("entries", {})
        self.predictions: dict[str, dict[str, Any]] = data.get("predictions", {})
        self.measure_s: float = data.get("measure_s", 0.0)

    def save(self) -> None:
        self.path.write_text(json.dumps({"target": self.target, "entries": self.entries,
                                         "predictions": self.predictions, "measure_s": self.measure_s}, indent=1))

    def lookup(self, key: str, desc: dict[str, Any]) -> float:
        if key not in self.entries:
            start = time.perf_counter()
            self.entries[key] = measure_layer(desc, self.target, self.warmup, self.rounds)
            self.measure_s += time.perf_counter() - start
            self.save()
        return self.entries[key]

    def predict(self, layers: list[tuple[str, str, dict[str, Any]]]) -> dict[str, float]:
        """{"sum_ms": sum of the layers' table entries, "size_mb": their weights at the chosen precision}."""
        total = sum(self.lookup(key, desc) for _, key, desc in layers)
        size = sum(_numel(desc["w"]) * BYTES[desc["quant"]] for _, _, desc in layers) / 1e6
        return {"sum_ms": total, "size_mb": size}

    def scale(self) -> float | None:
        """Median measured/sum over the trials measured whole (None before the first)."""
        ratios = [p["measured_ms"] / p["sum_ms"] for p in self.predictions.values()
                  if p.get("measured_ms") and p.get("sum_ms")]
        return statistics.median(ratios) if ratios else None

    def record(self, trial: int, sum_ms: float, measured_ms: float | None, pipeline: str) -> None:
        self.predictions[str(trial)] = {"sum_ms": sum_ms, "measured_ms": measured_ms, "pipeline": pipeline}
        self.save()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def screen(predicted_ms: float, predicted_size_mb: float, budget: dict[str, float], measured: list[dict[str, Any]],
           baseline_accuracy: float, margin: float = 0.15) -> str | None:
    """Why a candidate need not be built (None: build it). `measured`: finished trials' attrs."""
    if "latency_ms" in budget and predicted_ms > budget["latency_ms"] * (1 + margin):
        return f"predicted {predicted_ms:.3g} ms > latency budget {budget['latency_ms']:.3g} ms (+{margin:.0%})"
    for m in measured:
        if (m.get("accuracy", -1e9) >= baseline_accuracy and m.get("size_mb", 1e9) <= predicted_size_mb
                and m["latency_ms"] * (1 + margin) < predicted_ms and all(c <= 0 for c in m.get("constraints", []))):
            return (f"predicted {predicted_ms:.3g} ms, {predicted_size_mb:.3g} MB: dominated by trial "
                    f"{m.get('number')} ({m['latency_ms']:.3g} ms, {m['size_mb']:.3g} MB, no accuracy drop)")
    return None


def agreement(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """How well sums predicted measured latency: the scale, median |error| after scaling, Spearman rho."""
    pairs = [(p, m) for p, m in pairs if p and m]
    if len(pairs) < 2:
        return {"n": len(pairs)}
    scale = statistics.median(m / p for p, m in pairs)
    errors = [abs(p * scale - m) / m for p, m in pairs]

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rp, rm = ranks([p for p, _ in pairs]), ranks([m for _, m in pairs])
    n = len(pairs)
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(rp, rm)) / (n * (n * n - 1))
    return {"n": n, "scale": scale, "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "spearman": rho}


def check_run(out: "str | Path", model: torch.nn.Module, example_inputs: tuple, data: list, space,
              warmup: int = 2, rounds: int = 5, max_trials: int | None = None) -> dict[str, float]:
    """Predict the finished trials of a run directory from the table (measuring missing entries) and
    record predicted vs measured in `lut.json`: how well the table would have screened this run.
    `max_trials`: that many trials, evenly spaced over the run (every one-layer build costs seconds)."""
    from optuna.trial import TrialState

    from .evaluate import Evaluator
    from .study import open_study, read_meta, storage_for

    meta = read_meta(out)
    table = LatencyTable(out, meta["target"], warmup, rounds)
    evaluator = Evaluator(model, example_inputs, data, target=meta["target"])
    directions = ["minimize" if o != "accuracy" else "maximize" for o in meta["objectives"]]
    study = open_study(storage_for(out), directions)
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "latency_ms" in t.user_attrs and not t.user_attrs.get("repeat_of")]
    if max_trials and len(trials) > max_trials:
        step = (len(trials) - 1) / (max_trials - 1) if max_trials > 1 else 0
        trials = [trials[round(i * step)] for i in range(max_trials)]
    for t in trials:
        config = {**space.uniform("float"), **t.params}
        head, _ = space.split(config, bool(data))
        layers = layer_keys(evaluator._run(_copy(evaluator.base), head), config)
        table.record(t.number, table.predict(layers)["sum_ms"], t.user_attrs["latency_ms"], t.user_attrs["pipeline"])
    return agreement([(p["sum_ms"], p["measured_ms"]) for p in table.predictions.values()])


def _copy(gm):
    import copy

    return copy.deepcopy(gm)
