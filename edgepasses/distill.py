"""`distill`: fine-tune a compressed graph against the original model (the teacher).

The loss is `finetune`'s logit distillation, KL(student/T ‖ teacher/T)·T² (plus cross-entropy
on labels when `distill_weight` < 1), and optionally a feature loss: at layers matched by name
(`graph_utils.layer_name`, the conv/linear's module path, e.g. `layer1.0.conv1`), the MSE between
the student's layer output and the teacher's, divided by the teacher's mean square so layers
of any scale weigh alike, averaged over layers and scaled by `feature_loss`.

- Teacher side: a forward hook on `teacher.get_submodule(name)`. When the student's layer has
  absorbed a batch norm (`fold_bn`: its output no longer feeds one), the teacher's value is the
  output of the batch norm module that reads that layer's output, so both are post-BN.
- Pruned layers (fewer channels in the student): on the first batch each student channel is
  paired with a distinct teacher channel by correlation, and those teacher channels are the
  target from then on (pruning keeps a subset of the channels; fine-tuning barely moves them).
  Layers whose shapes differ otherwise, or whose best pairing correlates below 0.5, are skipped;
  `gm.edge_distill["feature_skipped"]` says why.
- Training happens on a copy of the graph in which quantize→dequantize pairs are fake-quantize
  ops with a straight-through gradient (`torch.fake_quantize_per_channel_affine` for weights,
  `..._per_tensor_affine` for activations; scales and zero points fixed), and the float weights
  behind them are parameters. Weights of 2:4 layers (`node.meta["sparse24"]`) keep their zeros:
  `finetune` masks their gradients, and behind a fake-quantize the mask multiplies the weight.
  The trained weights then replace the original graph's constants, so the graph keeps its
  Q/DQ form and everything else the targets lower.

A few steps (`steps=20`) are "flash" distillation: the cheap accuracy estimate the search uses.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Iterable, Sequence

import torch
import torch.fx
from torch import nn

from .errors import OptionError
from .finetune import _WEIGHT_ARGS, finetune
from .graph_utils import CONV_OPS, LINEAR_OPS, SPARSE24, add_constant, ignore_matcher, layer_name
from .quant.patterns import to_fake_quantize

aten = torch.ops.aten
_MIN_CORRELATION = 0.5
_BATCH_NORM_OPS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}


def distill(student_gm: torch.fx.GraphModule, teacher: nn.Module, data: Iterable, steps: int, *,
            feature_loss: float = 0.0, feature_layers: Sequence[str] | None = None, lr: float = 1e-3,
            temperature: float = 2.0, distill_weight: float = 1.0) -> torch.fx.GraphModule:
    """Train `student_gm` (a `compress` result) in place for `steps` Adam steps toward `teacher`; return it.

    `data` yields `(inputs, labels)` as for `finetune` (labels may be None, and are used only when
    `distill_weight` < 1), or bare input tensors. `feature_loss` > 0 adds the feature loss at
    `feature_layers` (whole-name regexes on the student's conv/linear layer names; default: every
    conv/linear layer the teacher has a module for). Stats go to `student_gm.edge_distill`.
    """
    _check(student_gm, teacher, steps, feature_loss, feature_layers, temperature, distill_weight)
    start = time.perf_counter()
    train_gm = copy.deepcopy(student_gm)
    fake_quantized = _fake_quantize(train_gm)
    _weights_trainable(train_gm)
    features = _Features(train_gm, teacher, feature_layers) if feature_loss > 0 else None
    losses: list[float] = []
    try:
        finetune(train_gm, [_as_pair(b) for b in data], steps, teacher=teacher, lr=lr, temperature=temperature,
                 distill_weight=distill_weight, losses=losses, description="distilling",
                 extra_loss=(lambda: feature_loss * features.loss()) if features is not None else None)
    finally:
        if features is not None:
            features.remove_hooks()
    copied = _copy_back(train_gm, student_gm)
    window = max(1, min(10, steps // 5))  # the mean of a few steps: one batch's loss is noisy
    student_gm.edge_distill = {
        "steps": steps,
        "loss_start": sum(losses[:window]) / window,
        "loss_end": sum(losses[-window:]) / window,
        "weights_trained": copied,
        "fake_quantized": fake_quantized,
        "feature_layers": features.matched_summary() if features is not None else [],
        "feature_skipped": dict(features.skipped) if features is not None else {},
        "seconds": time.perf_counter() - start,
    }
    return student_gm


def _check(gm, teacher, steps, feature_loss, feature_layers, temperature, distill_weight) -> None:
    if not isinstance(gm, torch.fx.GraphModule):
        raise OptionError(f"distill: the student must be a GraphModule from edgepasses.compress; got "
                          f"{type(gm).__name__}")
    if not isinstance(teacher, nn.Module):
        raise OptionError(f"distill: the teacher must be an nn.Module (the original model); got "
                          f"{type(teacher).__name__}")
    if teacher.training:
        raise OptionError("distill: the teacher is in training mode; call teacher.eval() (its dropout and "
                          "batch-norm updates would make the targets noisy)")
    if not isinstance(steps, int) or steps < 1:
        raise OptionError(f"distill: steps must be an int >= 1; got {steps!r}")
    if not (isinstance(feature_loss, (int, float)) and math.isfinite(feature_loss) and feature_loss >= 0):
        raise OptionError(f"distill: feature_loss must be a weight >= 0; got {feature_loss!r}")
    if feature_layers is not None and feature_loss == 0:
        raise OptionError("distill: feature_layers given but feature_loss is 0; set feature_loss > 0 (e.g. 1.0)")
    if isinstance(feature_layers, str):
        raise OptionError(f"distill: feature_layers is a list of names or regexes; got the string {feature_layers!r}")
    if temperature <= 0 or not 0.0 <= distill_weight <= 1.0:
        raise OptionError(f"distill: temperature must be > 0 and distill_weight in [0, 1]; got "
                          f"{temperature}, {distill_weight}")


def _as_pair(batch):
    return (batch, None) if isinstance(batch, torch.Tensor) else batch


# --- quantize/dequantize pairs -> fake-quantize with a straight-through gradient ---------------------

def _fake_quantize(gm: torch.fx.GraphModule) -> int:
    """Replace each quantize→dequantize pair by one straight-through fake-quantize (`patterns.to_fake_quantize`);
    the float weight a pair reads becomes a parameter. Returns how many pairs."""
    fakes = to_fake_quantize(gm, weight_mask=lambda quantize, dequantizes: _sparse24_mask(gm, quantize, dequantizes))
    for fq in fakes:
        x = fq.args[0]
        if isinstance(x, torch.fx.Node) and x.op == "get_attr" and _feeds_layer_weight(fq):
            _make_parameter(gm, x.target)
    return len(fakes)


def _feeds_layer_weight(node: torch.fx.Node) -> bool:
    return any(u.op == "call_function" and u.target in CONV_OPS | LINEAR_OPS and len(u.args) > 1
               and u.args[1] is node for u in node.users)


def _sparse24_mask(gm, quantize: torch.fx.Node, dequantizes: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The 0/1 mask of a 2:4 layer's weight, which `quantize` reads: its pruned weights stay zero."""
    weight = quantize.args[0]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    if not any(u.meta.get(SPARSE24) for d in dequantizes for u in d.users):
        return None
    value = _attr(gm, weight.target)
    return add_constant(gm, f"{weight.target}_sparse24_mask", (value != 0).to(value.dtype), before=quantize)


def _attr(gm: torch.nn.Module, target: str):
    owner_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner_path), name)


def _make_parameter(gm: torch.fx.GraphModule, target: str) -> None:
    """A trainable parameter (`finetune` keeps a parameter's requires_grad, and a graph trained before
    has them all off)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    value = getattr(owner, name)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        delattr(owner, name)
        owner.register_parameter(name, nn.Parameter(value.detach().clone()))


def _weights_trainable(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHT_ARGS:
            for i in _WEIGHT_ARGS[node.target]:
                arg = node.args[i] if i < len(node.args) else None
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    _make_parameter(gm, arg.target)


def _copy_back(trained: torch.fx.GraphModule, gm: torch.fx.GraphModule) -> int:
    """Replace (never write into: an exported graph shares tensors with the user's model, maybe the
    teacher) each of `gm`'s constants that was trained in `trained`. Returns how many."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    copied = 0
    for target, value in trained.named_parameters():
        if target not in read:
            continue
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        new = value.detach().clone()
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(new, requires_grad=False)
        elif name in owner._buffers:
            owner._buffers[name] = new
        else:
            setattr(owner, name, new)
        copied += 1
    return copied


# --- the feature loss -----------------------------------------------------------------------------

class _Tap(nn.Module):
    """Keeps the last value of the node it is attached to (a graph output nothing reads)."""

    def forward(self, x):
        self.value = x
        return x


class _Features:
    def __init__(self, gm: torch.fx.GraphModule, teacher: nn.Module, patterns: Sequence[str] | None):
        layers: dict[str, torch.fx.Node] = {}
        for node in gm.graph.nodes:  # the last node of a name is the layer's output (lowrank splits one in two)
            if node.op == "call_function" and node.target in CONV_OPS | LINEAR_OPS:
                layers[layer_name(node)] = node
        self.skipped: dict[str, str] = {}
        if patterns is not None:
            chosen = ignore_matcher(tuple(patterns), list(layers.values()), where="distill:", option="feature_layers",
                                    kind="conv/linear layer of the student")
            layers = {name: node for name, node in layers.items() if chosen(node)}
        teacher_modules = dict(teacher.named_modules())
        self.layers: list[dict] = []
        for name, node in layers.items():
            if name not in teacher_modules or name == "":
                self.skipped[name] = "the teacher has no module of that name"
                continue
            tap_name = f"_distill_tap_{len(self.layers)}"
            gm.add_submodule(tap_name, _Tap())
            with gm.graph.inserting_after(node):
                gm.graph.call_module(tap_name, (node,))
            folded_bn = not any(u.target in _BATCH_NORM_OPS for u in node.users)
            self.layers.append({"name": name, "tap": getattr(gm, tap_name), "module": teacher_modules[name],
                                "folded_bn": folded_bn, "dim": 1 if node.target in CONV_OPS else -1,
                                "select": None, "note": "same shape"})
        gm.recompile()
        if not self.layers:
            raise OptionError(f"distill: no feature layer has a teacher module of the same name: "
                              f"{'; '.join(f'{k}: {v}' for k, v in self.skipped.items()) or 'no conv/linear layers'}")
        self.teacher_values: dict[str, torch.Tensor] = {}
        self.hooks = []
        by_module = {id(layer["module"]): layer for layer in self.layers}
        for layer in self.layers:
            self.hooks.append(layer["module"].register_forward_hook(
                lambda mod, args, out, name=layer["name"]: self.teacher_values.__setitem__(name, out)))
        if any(layer["folded_bn"] for layer in self.layers):
            for module in teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in by_module:
                    self.hooks.append(module.register_forward_hook(self._after_batch_norm))
        self.ready = False

    def _after_batch_norm(self, module, args, out) -> None:
        for layer in self.layers:  # the student absorbed this batch norm: compare after it
            if layer["folded_bn"] and self.teacher_values.get(layer["name"]) is args[0]:
                self.teacher_values[layer["name"]] = out
                layer["after_bn"] = True

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def loss(self) -> torch.Tensor:
        if not self.ready:
            self._match()
        terms = []
        for layer in self.layers:
            student, target = layer["tap"].value, self.teacher_values[layer["name"]]
            if layer["select"] is not None:
                target = target.index_select(layer["dim"] % target.dim(), layer["select"])
            terms.append((student - target).pow(2).mean() / (target.pow(2).mean() + 1e-8))
        if not terms:
            return torch.zeros(())
        return sum(terms) / len(terms)

    def _match(self) -> None:
        """On the first batch: which layers compare directly, which through a channel selection, which not."""
        kept = []
        for layer in self.layers:
            name, student = layer["name"], layer["tap"].value.detach()
            target = self.teacher_values.get(name)
            if not isinstance(target, torch.Tensor):
                self.skipped[name] = "the teacher module's output is not one tensor (or it did not run)"
                continue
            if student.shape == target.shape:
                kept.append(layer)
                continue
            dim = layer["dim"] % student.dim()
            same_elsewhere = (student.dim() == target.dim() and
                              all(a == b for i, (a, b) in enumerate(zip(student.shape, target.shape)) if i != dim))
            if not same_elsewhere or student.shape[dim] > target.shape[dim]:
                self.skipped[name] = f"shape {tuple(student.shape)} vs the teacher's {tuple(target.shape)}"
                continue
            select, r = _pair_channels(student, target.detach(), dim)
            if r < _MIN_CORRELATION:
                self.skipped[name] = (f"{student.shape[dim]} of {target.shape[dim]} channels, and the best pairing "
                                      f"correlates only {r:.2f}")
                continue
            layer["select"] = select
            layer["note"] = (f"{student.shape[dim]} of {target.shape[dim]} channels paired by correlation "
                             f"(mean r={r:.2f})")
            kept.append(layer)
        self.layers = kept
        self.ready = True

    def matched_summary(self) -> list[str]:
        after_bn = " (after the teacher's batch norm)"
        return [f"{layer['name']}: {layer['note']}" + (after_bn if layer.get("after_bn") else "")
                for layer in self.layers]


def _pair_channels(student: torch.Tensor, teacher: torch.Tensor, dim: int) -> tuple[torch.Tensor, float]:
    """A distinct teacher channel for each student channel, greedily by Pearson correlation over the
    batch (and positions); returns the teacher indices and the mean correlation of the pairs."""
    def standardised(x):
        rows = x.movedim(dim, 0).reshape(x.shape[dim], -1).double()
        rows = rows - rows.mean(1, keepdim=True)
        return rows / (rows.norm(dim=1, keepdim=True) + 1e-12)

    corr = standardised(student) @ standardised(teacher).T  # (student channels, teacher channels)
    select = torch.full((corr.shape[0],), -1, dtype=torch.long)
    taken = torch.zeros(corr.shape[1], dtype=torch.bool)
    total = 0.0
    for flat in torch.argsort(corr.flatten(), descending=True).tolist():
        s, t = divmod(flat, corr.shape[1])
        if select[s] < 0 and not taken[t]:
            select[s], taken[t] = t, True
            total += corr[s, t].item()
            if (select >= 0).all():
                break
    return select, total / corr.shape[0]
