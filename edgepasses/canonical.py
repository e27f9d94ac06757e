"""Bring a model to the one canonical graph form (DESIGN.md).

The form is what `torch.export.export(model, args).run_decompositions({}).module()`
produces: a functional ATen-level GraphModule whose weights are `get_attr` constants and
whose nodes carry `meta["val"]`.
`compress()` exports the user's module; the backend first freezes Dynamo's parameter
placeholders into attributes, then exports that graph the same way. Both then decompose the
fused transformer fast paths (`decompositions.py`) and bring every layer to one form
(`canonical_forms.py`).
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx
from torch._dynamo.source import is_from_unspecialized_param_buffer_source

from .canonical_forms import canonicalize_layers
from .decompositions import FUSED_DECOMPOSITIONS
from .errors import ExportFailedError, GradientsNeededError
from .graph_utils import module_path

aten = torch.ops.aten
# GraphModule.meta key of a frozen Dynamo graph: its constants' paths in the user's model
WEIGHT_PATHS = "edge_weight_paths"


def user_source(node: torch.fx.Node) -> str:
    """The last user frame of a node's stack trace, e.g. `File "model.py", line 12, in forward`."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    return frames[-1] if frames else "source line unknown"


def export_canonical(module: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """Export a user's `module` (which must be in eval mode) on `example_inputs` to the canonical form."""
    check_eval_mode(module)
    return export_canonical_graph(module, example_inputs)


def export_canonical_graph(module: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """Export without the eval-mode check (Dynamo's graphs carry training semantics in their ops)."""
    try:
        # run_decompositions functionalises (relu_ -> relu, add_ -> add) and decomposes only the fused
        # transformer ops, whose Linears no pass could reach: passes never reason about aliasing, and
        # conv2d/linear stay whole for pattern matching.
        exported = torch.export.export(module, tuple(example_inputs)).run_decompositions(FUSED_DECOMPOSITIONS)
    except Exception as exc:  # torch.export raises many types; all mean the same to a user
        raise ExportFailedError(_explain_export_failure(module, exc)) from exc
    gm = exported.module()
    canonicalize_layers(gm, _weight_paths(module, gm))
    check_inference_graph(gm)
    return gm


def _weight_paths(module: torch.nn.Module, gm: torch.fx.GraphModule) -> dict[str, str]:
    """Each constant's path in the user's model: a frozen Dynamo graph says; an exported module's
    constants keep their paths as names."""
    frozen = getattr(module, "meta", {}).get(WEIGHT_PATHS) if isinstance(module, torch.fx.GraphModule) else None
    if frozen is not None:
        return frozen
    return {n.target: n.target for n in gm.graph.nodes if n.op == "get_attr"}


def _explain_export_failure(module: torch.nn.Module, exc: Exception) -> str:
    """Name what failed, the op being traced and the user's line, when torch.export's message has them."""
    text = str(exc)
    summary = next((ln.strip() for ln in text.splitlines()
                    if ln.strip() and not ln.startswith(("def ", " ", "\t"))), "")
    ops = re.findall(r"torch\.ops\.([\w.]+)\(", text)
    where = re.search(r"The following call raised this error:\n\s*(File [^\n]*)(?:\n {4,}(\S[^\n]*))?", text)
    lines = [f"torch.export could not capture {type(module).__name__}: {type(exc).__name__}: {summary}"]
    if ops:
        lines.append(f"last op traced: {ops[-1]}")
    if where:
        lines.append(f"at {where.group(1).strip()}" + (f": {where.group(2).strip()}" if where.group(2) else ""))
    lines.append("What to do: make that code traceable (static shapes, no Python control flow on tensor "
                 "values: use torch.cond or torch.where), or use torch.compile(model, backend='edge'), "
                 "which splits the model at code it cannot capture and runs that part in Python.")
    return "\n".join(lines)


def check_eval_mode(module: torch.nn.Module) -> None:
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise GradientsNeededError(
            f"{type(module).__name__} is in training mode ({', '.join(training[:5])}"
            f"{' ...' if len(training) > 5 else ''}); edgepasses compiles inference graphs: "
            "call model.eval() first")


# Ops whose presence means training semantics: batch statistics or active dropout.
def _training_reason(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    args = node.args
    if node.target in (aten.batch_norm.default, aten.instance_norm.default) and args[5]:
        return "batch norm with training=True (uses batch statistics)"
    if node.target in (aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.default,
                       aten.native_batch_norm.default):
        return "batch norm in training mode"
    if node.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default) \
            and args[1] > 0 and args[2]:
        return "dropout with train=True"
    if node.target is aten.native_dropout.default and args[2]:
        return "dropout with train=True"
    return None


def check_inference_graph(gm: torch.fx.GraphModule) -> None:
    """Raise if a node has training semantics, naming the node and its source line."""
    for node in gm.graph.nodes:
        reason = _training_reason(node)
        if reason:
            raise GradientsNeededError(
                f"node {node.name} ({node.target}) is {reason} at {user_source(node)}: the model is in "
                "training mode; call model.eval() before torch.compile / compress, or pass "
                "options={'allow_training': True} to run it uncompiled in PyTorch")


def is_dynamo_weight(node: torch.fx.Node) -> bool:
    grapharg = node.meta.get("grapharg")
    return grapharg is not None and is_from_unspecialized_param_buffer_source(grapharg.source)


def frozen_copy(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[int]]:
    """A copy of Dynamo's graph whose parameter/buffer placeholders are `get_attr` constants.

    Returns it and the positions of the placeholders that stay user inputs. Weights are
    captured by reference: like Inductor's freezing, the compiled graph does not see later
    in-place changes to the model's parameters.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    constants: dict[str, object] = {}
    paths: dict[str, str] = {}
    user_positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        if not is_dynamo_weight(node):
            user_positions.append(index)
            continue
        copied = env[node]
        name = f"_frozen_{node.name}"
        constants[name] = node.meta["grapharg"].example.detach()
        paths[name] = source_path(node.meta["grapharg"].source.name)
        with graph.inserting_before(copied):
            attr = graph.get_attr(name)
        copied.replace_all_uses_with(attr)
        graph.erase_node(copied)
    for node in graph.nodes:  # constants Dynamo itself put in the graph keep theirs
        if node.op in ("get_attr", "call_module") and node.target not in constants:
            constants[node.target] = operator.attrgetter(node.target)(gm)
    frozen = torch.fx.GraphModule(constants, graph)
    frozen.meta[WEIGHT_PATHS] = paths
    return frozen, user_positions


_DYNAMO_MEMBER = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]")


def source_path(source_name: str) -> str:
    """A Dynamo source's path in the user's model: `L['fn']._modules['fc']._parameters['weight']` -> `fc.weight`."""
    return module_path(_DYNAMO_MEMBER.sub(r".\1", source_name))


def check_no_grad_inputs(example_inputs: list, user_positions: list[int]) -> None:
    if not torch.is_grad_enabled():
        return
    needing = [i for i in user_positions
               if isinstance(example_inputs[i], torch.Tensor) and example_inputs[i].requires_grad]
    if needing:
        raise GradientsNeededError(
            f"input(s) at position {needing} require grad while grad mode is on; edgepasses compiles "
            "inference graphs: wrap the call in torch.no_grad() / torch.inference_mode() or detach the "
            "inputs, or pass options={'allow_training': True} to run it uncompiled in PyTorch")
