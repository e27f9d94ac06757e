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
from .dynamic_shapes import export_with_shapes
from .errors import ExportFailedError, GradientsNeededError
from .graph_utils import module_path

aten = torch.ops.aten
# GraphModule.meta key of a frozen Dynamo graph: its constants' paths in the user's model
WEIGHT_PATHS = "edge_weight_paths"
# GraphModule.meta key of a frozen Dynamo graph: {input position: value} of the Python numbers it made constants
FROZEN_NUMBERS = "edge_frozen_numbers"


def user_source(node: torch.fx.Node) -> str:
    """The last user frame of a node's stack trace, e.g. `File "model.py", line 12, in forward`."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    return frames[-1] if frames else "source line unknown"


def export_canonical(module: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """Export a user's `module` (which must be in eval mode) on `example_inputs` to the canonical form."""
    check_eval_mode(module)
    return export_canonical_graph(module, example_inputs)


def export_canonical_graph(module: torch.nn.Module, example_inputs: tuple,
                           dynamic_shapes: tuple | None = None) -> torch.fx.GraphModule:
    """Export without the eval-mode check (Dynamo's graphs carry training semantics in their ops).
    `dynamic_shapes` (torch.export's) keeps those dims symbolic in the canonical form."""
    try:
        # run_decompositions functionalises (relu_ -> relu, add_ -> add) and decomposes only the fused
        # transformer ops, whose Linears no pass could reach: passes never reason about aliasing, and
        # conv2d/linear stay whole for pattern matching.
        exported = export_with_shapes(module, example_inputs, dynamic_shapes, FUSED_DECOMPOSITIONS)
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

    Returns it and the positions of the placeholders that stay user inputs: the tensors. Weights are
    captured by reference: like Inductor's freezing, the compiled graph does not see later
    in-place changes to the model's parameters. A size Dynamo passes beside a dynamic tensor (`s0`
    for `x.size(0)`) is read from that tensor instead, and a Python number Dynamo made an input (one
    that changed between calls; under dynamic=True any float) becomes a constant of its value now:
    `meta[FROZEN_NUMBERS]` keeps {position: value} for the call-time check that it still holds.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    constants: dict[str, object] = {}
    paths: dict[str, str] = {}
    numbers: dict[int, object] = {}
    user_positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        copied = env[node]
        if is_dynamo_weight(node):
            name = f"_frozen_{node.name}"
            paths[name] = source_path(node.meta["grapharg"].source.name)
            _freeze(graph, copied, name, node.meta["grapharg"].example.detach(), constants)
        elif _read_from_shape(graph, copied, node, env, placeholders):
            continue
        elif (number := _python_number(node)) is not None:
            numbers[index] = number
            _freeze_number(graph, copied, number, constants)
        else:
            user_positions.append(index)
    for node in graph.nodes:  # constants Dynamo itself put in the graph keep theirs
        if node.op in ("get_attr", "call_module") and node.target not in constants:
            constants[node.target] = operator.attrgetter(node.target)(gm)
    frozen = torch.fx.GraphModule(constants, graph)
    frozen.meta[WEIGHT_PATHS] = paths
    frozen.meta[FROZEN_NUMBERS] = numbers
    return frozen, user_positions


def _python_number(node: torch.fx.Node) -> int | float | bool | None:
    """The value of a Python number Dynamo passes as a graph input (a float as a 0-d tensor read with
    `.item()`, an int as a size), else None."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    if grapharg.pass_arg_as_tensor:
        return grapharg.example.item()
    example = grapharg.example
    if isinstance(example, torch.SymInt):
        return example.node.hint
    return example if isinstance(example, (int, float, bool)) else None


_SIZE_SOURCE = re.compile(r"^(.*)\.size\(\)\[(\d+)\]$")


def _read_from_shape(graph: torch.fx.Graph, copied: torch.fx.Node, node: torch.fx.Node, env: dict,
                     placeholders: list[torch.fx.Node]) -> bool:
    """Replace a size input Dynamo derived from a tensor input (`L['x'].size()[0]`) by that tensor's
    `sym_size`: the exported program then takes tensors only, and the size follows the tensor."""
    grapharg = node.meta.get("grapharg")
    match = grapharg is not None and _SIZE_SOURCE.match(grapharg.source.name)
    owner = match and next((p for p in placeholders if p.meta.get("grapharg") is not None
                            and p.meta["grapharg"].source.name == match.group(1)), None)
    if not owner:
        return False
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_placeholder):
        size = graph.call_function(aten.sym_size.int, (env[owner], int(match.group(2))))
    copied.replace_all_uses_with(size)
    graph.erase_node(copied)
    return True


def _freeze_number(graph: torch.fx.Graph, copied: torch.fx.Node, value, constants: dict) -> None:
    """The number as a constant: a float's `.item()` reads become the value, other uses a 0-d tensor."""
    for user in list(copied.users):
        if user.op == "call_method" and user.target == "item":
            user.replace_all_uses_with(value)
            graph.erase_node(user)
    if copied.users:
        tensor = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else None)
        _freeze(graph, copied, f"_frozen_{copied.name}", tensor, constants)
    else:
        graph.erase_node(copied)


def _freeze(graph: torch.fx.Graph, placeholder: torch.fx.Node, name: str, value: torch.Tensor,
            constants: dict) -> None:
    """Replace `placeholder` by the constant `name` holding `value`."""
    constants[name] = value
    with graph.inserting_before(placeholder):
        attr = graph.get_attr(name)
    placeholder.replace_all_uses_with(attr)
    graph.erase_node(placeholder)


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
