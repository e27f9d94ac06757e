"""Quantize-dequantize (Q/DQ) patterns in one place: the op set, the conv/linear/matmul patterns
targets lower to integer kernels and passes read, and the straight-through fake-quant rewrite
that training uses.

The pattern `convert_pt2e(fold_quantize=False)` leaves:

    x ─ quantize_per_tensor ─ dequantize_per_tensor ─┐
    W ─ quantize_per_channel ─ dequantize_per_channel ┴─ linear / conv2d (+ bias)

and, in attention, matmul / bmm of two dequantized activations. A match is a dataclass of the
nodes, scales, zero points, ranges and dtypes; an op that does not match carries a `Mismatch`:
`reason` says what failed, `detail` is the sentence a report shows.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
import torch.fx

from ..graph_utils import ACTIVATION_MATMUL_OPS, CONV_OPS, LINEAR_OPS, add_constant, constant_value, replace_arg

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
QUANTIZE_PER_TENSOR, DEQUANTIZE_PER_TENSOR = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL = qd.quantize_per_channel.default, qd.dequantize_per_channel.default
# Each quantize with the dequantize that reads its codes back (`.tensor`: scale and zero point as tensors).
QDQ_PAIRS = {QUANTIZE_PER_TENSOR: DEQUANTIZE_PER_TENSOR, QUANTIZE_PER_CHANNEL: DEQUANTIZE_PER_CHANNEL,
             qd.quantize_per_tensor.tensor: qd.dequantize_per_tensor.tensor}
QUANTIZE_OPS = frozenset(QDQ_PAIRS)
DEQUANTIZE_OPS = frozenset(QDQ_PAIRS.values())
_PER_CHANNEL_OPS = {QUANTIZE_PER_CHANNEL, DEQUANTIZE_PER_CHANNEL}


def is_quantize(node: torch.fx.Node) -> bool:
    """Any `quantized_decomposed.quantize_per_*` op, every overload (.tensor2, per token, ... included)."""
    return node.op == "call_function" and str(node.target).startswith("quantized_decomposed.quantize_per")


def is_dequantize(node: torch.fx.Node) -> bool:
    """Any `quantized_decomposed.dequantize_per_*` op, every overload."""
    return node.op == "call_function" and str(node.target).startswith("quantized_decomposed.dequantize_per")

# Ops that read dequantized tensors and for which an integer kernel is the point. Others that read
# them (add, pooling, reshapes) compute on the dequantized values exactly as the fake-quant graph does.
COMPUTE_OPS = CONV_OPS | LINEAR_OPS | ACTIVATION_MATMUL_OPS

# Ops that only move values: quantizing before or after them is the same, so a linear reading a
# dequantized tensor through them (a classifier head reads the pooled average through a flatten)
# takes the float tensor through the same ops.
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.squeeze.dims,
             aten.unsqueeze.default, aten.permute.default, aten.transpose.int}


class Reason(enum.Enum):
    """What failed when an op reading a dequantized tensor matches no pattern."""
    OP = enum.auto()                            # not a linear, 2-d conv or matmul of two activations
    ACTIVATION_NOT_DEQUANTIZED = enum.auto()    # the input is no static per-tensor dequantize
    ACTIVATION_UNPAIRED = enum.auto()           # that dequantize reads no matching quantize
    ACTIVATION_RANGE = enum.auto()              # neither u8 [0, 255] nor s8 [-128, 127]
    WEIGHT_NOT_DEQUANTIZED = enum.auto()        # the weight is no dequantize
    WEIGHT_QPARAMS_COMPUTED = enum.auto()       # its scale or zero point is computed in the graph
    WEIGHT_NOT_CONSTANT = enum.auto()           # neither its float weight nor its codes are constants
    WEIGHT_NOT_INT8_PER_CHANNEL = enum.auto()   # not symmetric int8 per output channel


@dataclass(frozen=True)
class Mismatch:
    reason: Reason
    detail: str                  # the sentence a report shows
    operand: int | None = None   # the op input it concerns (0: the activation; 1: the weight or matmul's right side)

    def __str__(self) -> str:
        return self.detail


def _qparams(node: torch.fx.Node) -> tuple:
    """(scale, zero point, axis, qmin, qmax, dtype) of a quantize or dequantize; axis None per tensor."""
    if node.target in _PER_CHANNEL_OPS:
        return tuple(node.args[1:7])
    scale, zero_point, qmin, qmax, dtype = node.args[1:6]
    return scale, zero_point, None, qmin, qmax, dtype


def _constants(gm: torch.fx.GraphModule, args: Iterable) -> list:
    """`args` with each get_attr node replaced by its tensor (literals pass as they are)."""
    return [constant_value(gm, a) if isinstance(a, torch.fx.Node) else a for a in args]


# ---- activations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationQDQ:
    """A static per-tensor quantize-dequantize of an activation, read through `moves`."""
    quantize: torch.fx.Node
    dequantize: torch.fx.Node
    source: torch.fx.Node       # the float input of the quantize
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype          # torch.uint8 or torch.int8
    moves: tuple[torch.fx.Node, ...] = ()  # shape ops between the dequantize and the reader, in order

    @property
    def uint8_zero_point(self) -> int:
        """The zero point of the same codes as u8: s8 codes are u8 codes shifted by 128."""
        return self.zero_point + (128 if self.dtype == torch.int8 else 0)

    def float_input(self, gm: torch.fx.GraphModule, before: torch.fx.Node) -> torch.fx.Node:
        """The float tensor the reader would see unquantized: `source` through the same shape ops."""
        value = self.source
        for move in self.moves:
            with gm.graph.inserting_before(before):
                value = gm.graph.call_function(move.target, (value, *move.args[1:]), move.kwargs)
            value.meta = {**move.meta}
        return value


def through_shape_ops(node) -> tuple[object, tuple[torch.fx.Node, ...]]:
    """The value `node` moves through shape ops, and those ops from that value on."""
    moves = []
    while isinstance(node, torch.fx.Node) and node.target in SHAPE_OPS:
        moves.append(node)
        node = node.args[0]
    return node, tuple(reversed(moves))


def activation_qdq(node, operand: int = 0) -> ActivationQDQ | Mismatch:
    """The static per-tensor u8 or s8 quantization feeding an op as its input `operand` (a dequantize,
    possibly through shape ops), or why there is none."""
    dequantize, moves = through_shape_ops(node)
    if not isinstance(dequantize, torch.fx.Node) or dequantize.target != DEQUANTIZE_PER_TENSOR:
        return Mismatch(Reason.ACTIVATION_NOT_DEQUANTIZED,
                        "its input is not a per-tensor dequantize with a constant scale", operand)
    quantize = dequantize.args[0]
    if not isinstance(quantize, torch.fx.Node) or quantize.target != QUANTIZE_PER_TENSOR \
            or quantize.args[1:] != dequantize.args[1:]:
        return Mismatch(Reason.ACTIVATION_UNPAIRED,
                        "its input dequantize does not read a matching quantize_per_tensor", operand)
    source, scale, zero_point, qmin, qmax, dtype = quantize.args[:6]
    if (dtype, qmin, qmax) not in ((torch.uint8, 0, 255), (torch.int8, -128, 127)):
        return Mismatch(Reason.ACTIVATION_RANGE,
                        f"activation range {dtype} [{qmin}, {qmax}] is neither u8 [0, 255] nor s8 [-128, 127]",
                        operand)
    return ActivationQDQ(quantize, dequantize, source, float(scale), int(zero_point), qmin, qmax, dtype, moves)


# ---- weights -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightQDQ:
    """A linear/conv whose constant weight passes through a quantize-dequantize pair with constant
    scale and zero point (or a dequantize of constant codes, the quantize folded)."""
    layer: torch.fx.Node
    weight: torch.fx.Node               # get_attr: the float weight, or the codes where the quantize is folded
    quantize: torch.fx.Node | None      # None: folded into the codes
    dequantize: torch.fx.Node
    scale: torch.Tensor                 # per channel along `axis`, or 0-d
    zero_point: torch.Tensor
    axis: int | None                    # None: per tensor
    qmin: int
    qmax: int
    dtype: torch.dtype

    @property
    def per_channel_symmetric(self) -> bool:
        """One scale per output channel, zero point 0 and a range symmetric around it: GPTQ's grid."""
        return self.axis == 0 and not self.zero_point.any() and self.qmin == -self.qmax

    def float_weight(self, gm: torch.fx.GraphModule) -> torch.Tensor | None:
        """The float weight; None where the quantize is folded (only the codes are left)."""
        return constant_value(gm, self.weight) if self.quantize is not None else None

    def codes(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """The integer codes the dequantize reads (the graph's own quantize applied to the float weight)."""
        if self.quantize is None:
            return constant_value(gm, self.weight)
        return self.quantize.target(self.float_weight(gm), *_constants(gm, self.quantize.args[1:]))

    def dequantized_weight(self, gm: torch.fx.GraphModule) -> torch.Tensor:
        """The weight the layer computes with."""
        return self.dequantize.target(self.codes(gm), *_constants(gm, self.dequantize.args[1:]))

    def replace_weight(self, gm: torch.fx.GraphModule, value: torch.Tensor, name_hint: str) -> None:
        """Make the quantize read `value` (a new attribute: the old tensor may be the caller's parameter)."""
        replace_arg(gm, self.quantize, 0, add_constant(gm, name_hint, value, before=self.quantize))


def weight_qdq(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> WeightQDQ | Mismatch:
    """The quantize-dequantize pair on the weight of `layer` (a linear/conv), or why there is none."""
    if layer.op != "call_function" or layer.target not in LINEAR_OPS | CONV_OPS or len(layer.args) < 2:
        return Mismatch(Reason.OP, "not a linear or conv with a weight")
    dequantize = layer.args[1]
    if not isinstance(dequantize, torch.fx.Node) or dequantize.target not in DEQUANTIZE_OPS:
        return Mismatch(Reason.WEIGHT_NOT_DEQUANTIZED, "its weight is not a dequantize", 1)
    scale, zero_point, axis, qmin, qmax, dtype = _constants(gm, _qparams(dequantize))
    if scale is None or zero_point is None:
        return Mismatch(Reason.WEIGHT_QPARAMS_COMPUTED, "its weight's scale or zero point is not a constant", 1)
    quantize = dequantize.args[0]
    if isinstance(quantize, torch.fx.Node) and QDQ_PAIRS.get(quantize.target) == dequantize.target \
            and quantize.args[1:] == dequantize.args[1:]:
        weight = quantize.args[0]
    else:
        weight, quantize = quantize, None
    if constant_value(gm, weight) is None:
        return Mismatch(Reason.WEIGHT_NOT_CONSTANT, "its weight is not a constant", 1)
    return WeightQDQ(layer, weight, quantize, dequantize, torch.as_tensor(scale), torch.as_tensor(zero_point),
                     axis, int(qmin), int(qmax), dtype)


def int8_weight(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> WeightQDQ | Mismatch:
    """`weight_qdq` in the form the int8 kernels take: symmetric int8 per output channel."""
    weight = weight_qdq(gm, layer)
    if isinstance(weight, WeightQDQ) and (weight.axis != 0 or weight.dtype != torch.int8 or weight.zero_point.any()):
        return Mismatch(Reason.WEIGHT_NOT_INT8_PER_CHANNEL,
                        "its weight is not symmetric int8 per output channel with constant scales", 1)
    return weight


# ---- whole ops ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class QDQPattern:
    """A conv/linear/matmul reading a dequantized tensor: its quantized inputs, or why it matches no
    pattern (`mismatch`; then the inputs are None)."""
    node: torch.fx.Node
    activation: ActivationQDQ | None = None   # input 0
    weight: WeightQDQ | None = None           # input 1 of a linear or 2-d conv
    other: ActivationQDQ | None = None        # input 1 of a matmul of two activations
    mismatch: Mismatch | None = None

    @property
    def is_matmul(self) -> bool:
        return self.node.target in ACTIVATION_MATMUL_OPS


def is_conv2d(node: torch.fx.Node) -> bool:
    """A 2-d `aten.conv2d` with numeric padding, on a batched input."""
    return node.target == aten.conv2d.default and node.meta["val"].dim() == 4


def reads_dequantized(node: torch.fx.Node) -> bool:
    """A conv/linear/matmul with an input that is a dequantize (possibly through shape ops)."""
    return node.op == "call_function" and node.target in COMPUTE_OPS and any(
        getattr(through_shape_ops(a)[0], "target", None) in DEQUANTIZE_OPS for a in node.all_input_nodes)


def match(gm: torch.fx.GraphModule, node: torch.fx.Node) -> QDQPattern:
    """The Q/DQ pattern of a conv/linear/matmul reading a dequantized tensor."""
    if node.target in ACTIVATION_MATMUL_OPS:
        inputs = activation_qdq(node.args[0], 0), activation_qdq(node.args[1], 1)
    elif node.target in LINEAR_OPS or is_conv2d(node):
        inputs = activation_qdq(node.args[0], 0), int8_weight(gm, node)
    else:
        return QDQPattern(node, mismatch=Mismatch(Reason.OP, "no integer pattern for this op (linear, 2-d conv, "
                                                             "matmul of two activations)"))
    mismatch = next((m for m in inputs if isinstance(m, Mismatch)), None)
    if mismatch is not None:
        return QDQPattern(node, mismatch=mismatch)
    if node.target in ACTIVATION_MATMUL_OPS:
        return QDQPattern(node, activation=inputs[0], other=inputs[1])
    return QDQPattern(node, activation=inputs[0], weight=inputs[1])


def find_patterns(gm: torch.fx.GraphModule) -> Iterator[QDQPattern]:
    """The pattern of each conv/linear/matmul that reads a dequantized tensor, in graph order. Each is
    matched when reached, so a caller may rewrite one (its reader's pattern then reads the rewrite)."""
    for node in list(gm.graph.nodes):
        if reads_dequantized(node):
            yield match(gm, node)


# ---- Q/DQ → fake-quantize with a straight-through gradient -------------------------------------

def fake_quantize_per_channel(w, scale, zero_point, axis: int, quant_min: int, quant_max: int, mask=None):
    if mask is not None:
        w = w * mask  # weights held at zero (2:4 pruned) stay zero and get no gradient
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero_point.to(torch.int32), axis,
                                                  quant_min, quant_max)


def fake_quantize_per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    if isinstance(scale, torch.Tensor):
        return torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()),
                                                     zero_point.to(torch.int32).reshape(()), quant_min, quant_max)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), quant_min, quant_max)


WeightMask = Callable[[torch.fx.Node, list[torch.fx.Node]], "torch.fx.Node | None"]


def to_fake_quantize(gm: torch.fx.GraphModule, weight_mask: WeightMask | None = None) -> list[torch.fx.Node]:
    """Replace each quantize→dequantize pair by one fake-quantize with the same scale, zero point and
    range, whose gradient is straight-through. `weight_mask(quantize, dequantizes)` may give a node
    (inserted before the quantize) that multiplies a per-channel quantized weight first. Returns the
    fake-quantize nodes."""
    fakes = []
    for q in list(gm.graph.nodes):
        if q.op != "call_function" or q.target not in QDQ_PAIRS:
            continue
        dqs = list(q.users)
        if not dqs or any(d.target is not QDQ_PAIRS[q.target] or d.args[0] is not q for d in dqs):
            continue  # not the plain pair targets lower: left as it is
        x = q.args[0]
        with gm.graph.inserting_after(q):
            if q.target in _PER_CHANNEL_OPS:
                scale, zero_point, axis, qmin, qmax = q.args[1:6]
                mask = weight_mask(q, dqs) if weight_mask is not None else None
                fq = gm.graph.call_function(fake_quantize_per_channel, (x, scale, zero_point, axis, qmin, qmax, mask))
            else:
                scale, zero_point, qmin, qmax = q.args[1:5]
                fq = gm.graph.call_function(fake_quantize_per_tensor, (x, scale, zero_point, qmin, qmax))
        fq.meta = dict(dqs[0].meta)
        for d in dqs:
            d.replace_all_uses_with(fq)
            gm.graph.erase_node(d)
        gm.graph.erase_node(q)
        fakes.append(fq)
    if fakes:
        gm.recompile()
    return fakes
