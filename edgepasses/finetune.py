"""`finetune`: a short recovery training of a compressed graph, optionally distilled from the original.

Lossy passes (prune, lowrank, quantize) leave a graph that a few hundred steps of training
bring back close to the original's accuracy. The graph trains in plain eager PyTorch: its
conv/linear/norm weights and biases become its own parameters (copies: an exported graph
shares tensors with the user's model), other constants stay fixed. With a `teacher` (the
original model) the loss adds logit distillation, KL(student/T ‖ teacher/T)·T².
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch.utils._pytree as pytree
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import OptionError
from .graph_utils import CONV_OPS, LINEAR_OPS, SPARSE24
from .progress import progress
from .quant.calibration import as_batch

aten = torch.ops.aten
# The arguments that are weights to train, by op; other constants (batch-norm statistics, a model's
# own buffers, smooth's activation scales, weight-only integer codes) stay fixed.
_WEIGHT_ARGS = {**{op: (1, 2) for op in CONV_OPS | LINEAR_OPS}, aten.layer_norm.default: (2, 3),
                aten._native_batch_norm_legit_no_training.default: (1, 2)}


def make_weights_trainable(gm: torch.fx.GraphModule) -> None:
    """Conv/linear/norm weights and biases become parameters (passes such as fold_bn and smooth leave
    them buffers), and every parameter a copy: an exported graph shares its tensors with the user's model."""
    weights = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHT_ARGS:
            args = [node.args[i] for i in _WEIGHT_ARGS[node.target] if i < len(node.args)]
            weights |= {a.target for a in args if isinstance(a, torch.fx.Node) and a.op == "get_attr"}
    for target in weights | {name for name, _ in gm.named_parameters()}:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            # Weights train even when an earlier fine-tuning froze them; other parameters keep their flag.
            trainable = target in weights or not isinstance(value, nn.Parameter) or value.requires_grad
            delattr(owner, name)  # a buffer's name cannot be registered as a parameter
            owner.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=trainable))


def keep_sparsity_masks(gm: torch.fx.GraphModule) -> int:
    """Zero the gradients of the pruned weights of 2:4-sparse layers (`sparsify_24` marks them), so
    training cannot refill them; Adam then leaves them exactly zero. Returns how many layers."""
    masked = 0
    for node in gm.graph.nodes:
        if node.meta.get(SPARSE24) and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr":
            weight = gm.get_parameter(node.args[1].target)
            mask = weight.detach() != 0
            weight.register_hook(lambda grad, mask=mask: grad * mask)
            masked += 1
    return masked


def recovery_loss(logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                  temperature: float, distill_weight: float) -> torch.Tensor:
    """Cross-entropy on labels, logit distillation from the teacher, or their weighted sum. Outputs that are
    not one tensor (a Dynamo graph returns a tuple) add the loss of each floating-point output."""
    if not isinstance(logits, torch.Tensor):
        students = [t for t in pytree.tree_leaves(logits) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        teachers = [None] * len(students) if teacher_logits is None else \
            [t for t in pytree.tree_leaves(teacher_logits) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return sum(recovery_loss(s, labels, t, temperature, distill_weight) for s, t in zip(students, teachers))
    terms = []
    if labels is not None:
        terms.append(((1.0 - distill_weight) if teacher_logits is not None else 1.0) * F.cross_entropy(logits, labels))
    if teacher_logits is not None:
        kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                      reduction="batchmean", log_target=True)
        terms.append((distill_weight if labels is not None else 1.0) * kl * temperature ** 2)
    return sum(terms)


def _check(steps: int, teacher, temperature: float, distill_weight: float) -> None:
    if steps < 1:
        raise OptionError(f"finetune: steps must be >= 1; got {steps}")
    if temperature <= 0 or not 0.0 <= distill_weight <= 1.0:
        raise OptionError(f"finetune: temperature must be > 0 and distill_weight in [0, 1]; got "
                          f"{temperature}, {distill_weight}")
    if teacher is not None and teacher.training:
        raise OptionError("finetune: the teacher is in training mode; call teacher.eval() (its dropout and "
                          "batch-norm updates would make the targets noisy)")


def finetune(gm: torch.fx.GraphModule, data: Iterable, steps: int, *, teacher: nn.Module | None = None,
             lr: float = 1e-3, temperature: float = 2.0, distill_weight: float = 0.5,
             extra_loss: Callable[[], torch.Tensor] | None = None, losses: list[float] | None = None,
             description: str = "fine-tuning") -> torch.fx.GraphModule:
    """Train `gm` in place for `steps` Adam steps (cosine-decayed from `lr`) and return it, ready for inference.

    `data` yields `(inputs, labels)`: inputs a tensor or tuple shaped like the example inputs (the
    graph is specialised to them), labels class indices or None (then `teacher` is required and
    the loss is distillation alone). It is cycled until `steps` is reached.
    `extra_loss`, called after the teacher's and the graph's forward of each step, returns a term
    added to the loss (`distill`'s feature loss, from what hooks captured); `losses` collects each
    step's loss.
    """
    _check(steps, teacher, temperature, distill_weight)
    make_weights_trainable(gm)
    keep_sparsity_masks(gm)
    parameters = [p for p in gm.parameters() if p.requires_grad]
    if not parameters:
        raise OptionError("finetune: the graph has no float conv/linear/norm weights to train")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)  # settles at the end of a short run
    for inputs, labels in progress(itertools.islice(itertools.cycle(data), steps), description, total=steps):
        inputs = as_batch(inputs)
        if labels is None and teacher is None:
            raise OptionError("finetune: a batch without labels needs a teacher to distill from")
        with torch.no_grad():
            teacher_logits = teacher(*inputs) if teacher is not None else None
        loss = recovery_loss(gm(*inputs), labels, teacher_logits, temperature, distill_weight)
        if extra_loss is not None:
            loss = loss + extra_loss()
        if losses is not None:
            losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    gm.requires_grad_(False)
    return gm
