"""The layers `lowrank` can split, their input statistics, their cost, and the graph rewrite."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ..analysis.observe import NodeObserver
from ..graph_utils import LINEAR_OPS, add_constant, constant_value, conv_args, layer_name, weight_layers
from ..quant.calibration import calibrate
from .factorize import Factors

aten = torch.ops.aten


@dataclass
class Layer:
    node: torch.fx.Node
    name: str
    weight: torch.Tensor           # (out, in) or (out, in, kh, kw)
    in_shape: torch.Size           # of the layer's input, at the example inputs' sizes (costs only)
    out_shape: torch.Size
    bias_value: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def is_conv(self) -> bool:
        return self.weight.dim() == 4

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.is_conv else (1, 1)

    @property
    def bias(self):
        return self.node.args[2] if len(self.node.args) > 2 else None

    def conv(self, **changes) -> dict:
        """This layer's stride/padding/dilation with `changes`, as one factor conv takes them."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, **changes}


def _pair(value) -> tuple[int, int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return (int(values[0]), int(values[-1]))


def _conv_args(node: torch.fx.Node) -> tuple | str:
    """(stride, padding, dilation, groups) of a 2-D conv node, or why it cannot be split."""
    if node.target not in (aten.convolution.default, aten.conv2d.default, aten.conv2d.padding):
        return f"{node.target} is not a 2-D convolution; only 2-D convolutions are split"
    conv = conv_args(node)
    if conv.transposed:
        return "transposed convolution"
    if isinstance(conv.padding, str):
        return f"padding given as {conv.padding!r}; only numeric padding is split"
    return _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation), conv.groups


def _val_shape(node) -> torch.Size | None:
    """The shape of `node`'s value, a dynamic dim by its example size: the MAC counts that decide a split
    read it. Read without a guard: `int()` of a symbolic size would make the whole graph static."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return torch.Size(optimization_hint(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Layer | str:
    """The layer `node` computes, or the reason it cannot be factorised."""
    weight = constant_value(gm, node.args[1])
    if weight is None:
        return "weight is not a constant in the graph (computed or an input); nothing to factorise"
    in_shape, out_shape = _val_shape(node.args[0]), _val_shape(node)
    if in_shape is None or out_shape is None:
        return "no shape information (meta['val']); run propagate_fake before lowrank"
    if node.target in LINEAR_OPS:
        return Layer(node, layer_name(node), weight, in_shape, out_shape, _bias(gm, node))
    conv = _conv_args(node)
    if isinstance(conv, str):
        return conv
    stride, padding, dilation, groups = conv
    if groups != 1:
        kind = "depthwise" if groups == weight.shape[0] == in_shape[1] else "grouped"
        return f"{kind} convolution (groups={groups}): each group is already a small dense block"
    return Layer(node, layer_name(node), weight, in_shape, out_shape, _bias(gm, node), stride, padding, dilation)


def _bias(gm, node) -> torch.Tensor | None:
    return constant_value(gm, node.args[2]) if len(node.args) > 2 else None


def find_layers(gm: torch.fx.GraphModule, ignore) -> tuple[list[Layer], dict[str, str]]:
    """Every layer applying a weight, in any form (`graph_utils.weight_layers`): the Linear and conv
    layers a pass can rewrite, and the others by name with the reason."""
    layers, skipped = [], {}
    for weight_layer in weight_layers(gm):
        node = weight_layer.node
        if weight_layer.unreachable:
            skipped[weight_layer.name] = weight_layer.unreachable
            continue
        if ignore(node):
            skipped[weight_layer.name] = "in the ignore list"
            continue
        found = describe(gm, node)
        if isinstance(found, str):
            skipped[weight_layer.name] = found
        else:
            layers.append(found)
    return layers, skipped


# ------------------------------------------------------------------ input statistics

@dataclass
class InputStats:
    """Σ x·xᵀ, Σ x and the row count of one layer's input rows (im2col patches for a conv)."""
    gram: torch.Tensor | None = None
    total: torch.Tensor | None = None
    rows: int = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        gram, total = rows.T @ rows, rows.sum(0)
        self.gram = gram if self.gram is None else self.gram + gram
        self.total = total if self.total is None else self.total + total
        self.rows += rows.shape[0]


def input_rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The rows the weight multiplies: features for a Linear, im2col patches (c, p, q order) for a conv."""
    if not layer.is_conv:
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, layer.kernel, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _rows_key(layer: Layer) -> tuple:
    """Layers with equal keys see the same input rows (q, k and v read one activation): one Gram serves them."""
    return (layer.node.args[0], layer.kernel, layer.stride, layer.padding, layer.dilation) if layer.is_conv \
        else (layer.node.args[0],)


def _add_rows(readers: list[Layer], stats: dict[tuple, InputStats], value: torch.Tensor) -> None:
    for layer in readers:
        stats[_rows_key(layer)].add(input_rows(layer, value))


def collect_input_stats(gm: torch.fx.GraphModule, layers: list[Layer], batches, example_inputs: tuple,
                        *, needed_by: str) -> dict[torch.fx.Node, InputStats]:
    """Run `batches` through `gm`, accumulating each layer's input Gram."""
    readers: dict[torch.fx.Node, list[Layer]] = {}
    stats: dict[tuple, InputStats] = {}
    for layer in layers:
        if _rows_key(layer) not in stats:
            stats[_rows_key(layer)] = InputStats()
            readers.setdefault(layer.node.args[0], []).append(layer)
    watch = {node: partial(_add_rows, layers, stats) for node, layers in readers.items()}
    calibrate(NodeObserver(gm, watch).run, batches, example_inputs, needed_by=needed_by)
    return {layer.node: stats[_rows_key(layer)] for layer in layers}


def output_sqnr_db(layer: Layer, approx: torch.Tensor, stats: InputStats,
                   bias_shift: torch.Tensor | None = None) -> float:
    """The layer's output SQNR over the recorded inputs, from the Gram alone: the factor chain computes
    exactly the conv/linear with weight `approx` (and bias + `bias_shift`), so noise = Σ‖ΔW·x − δb‖²
    = tr(ΔW·G·ΔWᵀ) − 2·δbᵀ·ΔW·Σx + rows·‖δb‖²; signal adds the bias terms."""
    import math

    w = layer.weight.reshape(layer.weight.shape[0], -1).double()
    delta = w - approx.reshape(w.shape).double()
    gram = stats.gram.double()
    noise = float(((delta @ gram) * delta).sum())
    if bias_shift is not None:
        shift = bias_shift.double()
        noise += float(-2 * shift @ (delta @ stats.total.double()) + stats.rows * shift @ shift)
    signal = float(((w @ gram) * w).sum())
    if layer.bias_value is not None:
        b = layer.bias_value.double()
        signal += float(2 * b @ (w @ stats.total.double()) + stats.rows * b @ b)
    if noise <= 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# ------------------------------------------------------------------ cost

def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def chain_macs(layer: Layer, shapes: list[torch.Size], convs: list[dict]) -> int:
    """Multiply-accumulates of a chain of weights of `shapes` on this layer's input (one: the layer)."""
    if not layer.is_conv:
        rows = layer.in_shape.numel() // layer.in_shape[-1]
        return sum(rows * s[0] * s[1] for s in shapes)
    batch, _, height, width = layer.in_shape
    macs = 0
    for shape, conv in zip(shapes, convs):
        kh, kw = shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = conv["stride"], conv["padding"], conv["dilation"]
        height, width = _out_size(height, kh, sh, ph, dh), _out_size(width, kw, sw, pw, dw)
        macs += batch * height * width * shape[0] * shape[1] * kh * kw
    return macs


def dense_macs(layer: Layer) -> int:
    return chain_macs(layer, [layer.weight.shape], [layer.conv()])


# ------------------------------------------------------------------ rewrite

def _factor_meta(layer: Layer, index: int) -> dict:
    """Source meta for factor `index`: the layer's module path plus `.lowrank<index>`, so each factor has
    its own name in reports and quantize's ignore lists (`fc.lowrank0`, `fc.lowrank1`)."""
    meta = {k: v for k, v in layer.node.meta.items() if k == "stack_trace"}
    stack = layer.node.meta.get("nn_module_stack")
    if stack:
        *keys, last = list(stack)
        path, kind = stack[last]
        meta["nn_module_stack"] = {**{k: stack[k] for k in keys}, last: (f"{path}.lowrank{index}", kind)}
    return meta


def replace_with_chain(gm: torch.fx.GraphModule, layer: Layer, factors: Factors) -> list[torch.fx.Node]:
    """Put the factor layers in place of `layer`; the last one takes the bias."""
    node, current = layer.node, layer.node.args[0]
    weight_name = node.args[1].target if isinstance(node.args[1], torch.fx.Node) else layer.name
    chain = []
    for index, weight in enumerate(factors.weights):
        constant = add_constant(gm, f"{weight_name}_lowrank{index}", weight, before=node)
        bias = layer.bias if index == len(factors.weights) - 1 else None
        with gm.graph.inserting_before(node):
            if layer.is_conv:
                conv = factors.convs[index]
                current = gm.graph.call_function(aten.conv2d.default, (
                    current, constant, bias, list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), 1))
            else:
                current = gm.graph.call_function(aten.linear.default, (current, constant, bias))
        current.meta.update(_factor_meta(layer, index))
        chain.append(current)
    node.replace_all_uses_with(current)
    old_weight = node.args[1]
    gm.graph.erase_node(node)
    if not old_weight.users:  # its tensor goes with remove_unused_attributes
        gm.graph.erase_node(old_weight)
    return chain
