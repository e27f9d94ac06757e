"""Deciding what to quantise: a PT2E `Quantizer` that annotates the canonical graph.

Annotation is separate from insertion (PT2E's split): `EdgeQuantizer.annotate` puts
`QuantizationAnnotation`s with specs on conv / linear / activation-matmul nodes; torchao's
`prepare_pt2e` then inserts observers, `convert_pt2e` quantize/dequantize pairs. Activations
are per-tensor, weights per-channel symmetric int8, within what the target can run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import unittest.mock
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree
from torchao.quantization.pt2e import observer as torchao_observers
from torchao.quantization.pt2e import quantize_pt2e
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, QuantizationSpec, Quantizer,
                                                 SharedQuantizationSpec)

from ..analysis.sqnr import SqnrAccumulator
from ..graph_utils import (ACTIVATION_MATMUL_OPS, CONV_OPS, LINEAR_OPS, RESHAPE_OPS, copy_sharing_weights, ignore_matcher,
                           layer_name, readers_through_reshapes, remove_unused_attributes, weight_layers)
from .awq import SAMPLE_ROWS, search_scale
from .bias_correction import correct_biases, weights_dequantized
from .calibration import calibrate, checked_batches
from .channel_scale import apply_input_scale, collect_stats, linear_groups, smooth_linears
from .gptq import apply_gptq
from .observers import observer_for
from .overflow import narrow_saturating_weights
from .range_choice import choose_activation_ranges
from .weight_only import group_size_for, replace_with_codes

aten = torch.ops.aten

EMBEDDING_OPS = {aten.embedding.default}
# Quantised where a CNN's int8 region needs them (see `annotate_int8_regions`).
RESIDUAL_ADD_OPS = {aten.add.Tensor}
AVERAGE_POOL_OPS = {aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.mean.dim}
POOL_OPS = {aten.max_pool2d.default} | AVERAGE_POOL_OPS
# Ops a quantised tensor passes through as it is (activations fold into the FakeQuantize's range).
TRANSPARENT_OPS = {aten.relu.default, aten.hardtanh.default, aten.relu6.default, aten.clamp.default,
                   *RESHAPE_OPS}


@dataclass(frozen=True)
class QuantSetup:
    """The resolved settings of one quantize run."""
    symmetric: bool
    per_channel: bool
    calib: str
    percentile: float
    weight_only: bool
    ignore: tuple[str, ...]
    bits: int = 8
    group_size: int | None = None   # weight-only: input features per scale; None: one per output row
    awq: bool = False               # weight-only: AWQ's activation-aware scales, searched on calibration
    embeddings: bool = True         # embedding tables as int8 codes per row (a lookup has no activation)
    weight_qmax: int = 127          # static int8 weights in [-qmax, qmax]; 63 against int8 saturation
    overflow_check: bool = False    # 63 instead where the calibration data show int8 sums saturating
    smooth_alpha: float | None = None   # SmoothQuant before quantising; None: none
    bias_correction: str = "off"    # shift biases by the mean output error rounded weights add:
                                    # "on", "off", "auto" (kept where it raises the output SQNR)
    rounding: str = "nearest"       # static weights: "nearest" or "gptq"


def activation_spec(setup: QuantSetup) -> QuantizationSpec:
    if setup.symmetric:
        dtype, qmin, qmax, qscheme = torch.int8, -128, 127, torch.per_tensor_symmetric
    else:
        dtype, qmin, qmax, qscheme = torch.uint8, 0, 255, torch.per_tensor_affine
    observer = observer_for(setup.calib, dtype=dtype, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                            percentile=setup.percentile)
    return QuantizationSpec(dtype=dtype, quant_min=qmin, quant_max=qmax, qscheme=qscheme,
                            is_dynamic=False, observer_or_fake_quant_ctr=observer)


def weight_spec(setup: QuantSetup) -> QuantizationSpec:
    # Narrow range [-q, q]: symmetric around zero, as runtimes' int8 weight kernels expect.
    q = setup.weight_qmax
    if setup.per_channel:
        qscheme, observer = torch.per_channel_symmetric, torchao_observers.PerChannelMinMaxObserver.with_args(
            ch_axis=0, dtype=torch.int8, quant_min=-q, quant_max=q, qscheme=torch.per_channel_symmetric)
    else:
        qscheme, observer = torch.per_tensor_symmetric, torchao_observers.MinMaxObserver.with_args(
            dtype=torch.int8, quant_min=-q, quant_max=q, qscheme=torch.per_tensor_symmetric)
    return QuantizationSpec(dtype=torch.int8, quant_min=-q, quant_max=q, qscheme=qscheme,
                            ch_axis=0 if setup.per_channel else None, is_dynamic=False,
                            observer_or_fake_quant_ctr=observer)


def _is_constant(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def quantizable_nodes(gm: torch.fx.GraphModule, weight_only: bool, embeddings: bool = True) -> list[torch.fx.Node]:
    """Nodes the quantizer can quantise: convs and linears with constant weights, activation matmuls,
    embedding lookups in constant tables."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LINEAR_OPS and _is_constant(node.args[1]):
            found.append(node)
        elif node.target in EMBEDDING_OPS:
            if embeddings and _is_constant(node.args[0]):
                found.append(node)
        elif weight_only:
            continue
        elif node.target in CONV_OPS and _is_constant(node.args[1]) and not (
                node.target is aten.convolution.default and node.args[6]):
            found.append(node)
        elif node.target in ACTIVATION_MATMUL_OPS and not any(_is_constant(a) for a in node.args[:2]):
            found.append(node)
    return found


class EdgeQuantizer(Quantizer):
    def __init__(self, setup: QuantSetup):
        super().__init__()
        self.setup = setup
        self.annotated: list[str] = []
        self.linear_conv_annotated = 0      # of the annotated: linears and convs (not matmuls or embeddings)
        self.ignored: list[str] = []
        self.skipped: dict[str, str] = {}   # weight layers left in float, by name, with the reason
        self.embedding_nodes: list[str] = []
        self.layer_of_node: dict[str, str] = {}  # annotated node name -> its layer name

    def select(self, gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
        """The quantizable nodes outside the ignore list; records names in `annotated`/`ignored`."""
        candidates = quantizable_nodes(gm, self.setup.weight_only, self.setup.embeddings)
        is_ignored = ignore_matcher(self.setup.ignore, candidates, where="quantize", kind="quantizable layer")
        selected = []
        for node in candidates:
            ignored = is_ignored(node)
            (self.ignored if ignored else self.annotated).append(layer_name(node))
            if not ignored:
                selected.append(node)
                self.linear_conv_annotated += node.target in LINEAR_OPS | CONV_OPS
        self.layer_of_node = {node.name: layer_name(node) for node in selected}
        # Tables become codes after convert_pt2e (`StagedQuantization.finish`), outside PT2E.
        self.embedding_nodes = [n.name for n in selected if n.target in EMBEDDING_OPS]
        self.skipped = {**self._unquantizable(gm, candidates), **{name: "in the ignore list" for name in self.ignored}}
        return selected

    def _unquantizable(self, gm: torch.fx.GraphModule, candidates: list[torch.fx.Node]) -> dict[str, str]:
        """Weight layers that are no candidate, with the reason."""
        chosen = set(candidates)
        weight_only = "weight-only quantization covers Linear layers only"
        return {layer.name: layer.unreachable or (weight_only if self.setup.weight_only else "not a quantizable form")
                for layer in weight_layers(gm) if layer.node not in chosen}

    def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        act, weight = activation_spec(self.setup), weight_spec(self.setup)
        selected = self.select(gm)
        for node in selected:
            if node.target in EMBEDDING_OPS:
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map=self._input_specs(node, act, weight), _annotated=True)
        annotate_int8_regions(gm, act)
        return gm

    @staticmethod
    def _input_specs(node, act, weight) -> dict:
        if node.target in ACTIVATION_MATMUL_OPS:
            return {node.args[0]: act, node.args[1]: act}
        return {node.args[0]: act, node.args[1]: weight}

    def validate(self, gm: torch.fx.GraphModule) -> None:
        pass


def _is_activation(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op != "get_attr"


def _feeds_quantized(node: torch.fx.Node, seen: set | None = None) -> bool:
    """Whether `node`'s value reaches an annotated input, through transparent ops, pools and adds."""
    seen = set() if seen is None else seen
    for user in node.users:
        if user in seen:
            continue
        seen.add(user)
        annotation = user.meta.get("quantization_annotation")
        if annotation is not None and node in annotation.input_qspec_map:
            return True
        if user.op == "call_function" and user.target in TRANSPARENT_OPS | POOL_OPS | RESIDUAL_ADD_OPS \
                and _feeds_quantized(user, seen):
            return True
    return False


def annotate_int8_regions(gm: torch.fx.GraphModule, act: QuantizationSpec) -> None:
    """Quantise where OpenVINO needs a FakeQuantize to keep a CNN's tensors int8 from conv to conv,
    as NNCF's quantizer propagation does:

    * both inputs of a residual add, one of them a quantised conv/linear's output, whose result goes
      on to a quantised op: the add fuses into that conv as an int8 sum post-op and the conv writes
      u8, not f32 followed by a standalone FakeQuantize and an f32 reorder;
    * the input of a max/avg pooling that goes on to a quantised op, the output sharing the input's
      quantizer (an average read through reshapes by linears/convs: its own quantizer, see
      `_annotate_pool`): the pooling runs on u8, and the conv before it writes u8.

    Adds and pools outside int8 regions (a transformer's residual adds before LayerNorm) stay float.
    """
    compute = CONV_OPS | LINEAR_OPS
    # Last node first, so an add or a pool sees the adds and pools after it already annotated.
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or "quantization_annotation" in node.meta:
            continue
        if node.target in RESIDUAL_ADD_OPS and len(node.args) >= 2 and all(map(_is_activation, node.args[:2])) \
                and any(a.target in compute and "quantization_annotation" in a.meta for a in node.args[:2]) \
                and _feeds_quantized(node):
            a, b = node.args[:2]
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: act, b: act}, _annotated=True)
        elif node.target in POOL_OPS and _is_activation(node.args[0]) and _feeds_quantized(node):
            _annotate_pool(node, act)


def _annotate_pool(pool: torch.fx.Node, act: QuantizationSpec) -> None:
    source = pool.args[0]
    readers = readers_through_reshapes(pool)
    output_spec = SharedQuantizationSpec((source, pool))
    if pool.target in AVERAGE_POOL_OPS and readers and all(map(_quantized_compute_input, readers)):
        # A classifier head (mean -> flatten -> linear): quantise the average itself, with its own
        # (narrower) range, and let the linear read it through the reshape. Quantised after the
        # reshape instead, OpenVINO runs that quantizer as a separate f32 step (NNCF places it here).
        for reader, value in readers:
            del reader.meta["quantization_annotation"].input_qspec_map[value]
        output_spec = act
    pool.meta["quantization_annotation"] = QuantizationAnnotation(
        input_qspec_map={source: act}, output_qspec=output_spec, _annotated=True)


def _quantized_compute_input(reader_and_value) -> bool:
    reader, value = reader_and_value
    annotation = reader.meta.get("quantization_annotation")
    return reader.target in CONV_OPS | LINEAR_OPS and annotation is not None \
        and value in annotation.input_qspec_map


@dataclass
class QuantizedGraph:
    graph: torch.fx.GraphModule       # the input graph itself when nothing was annotated
    quantizer: EdgeQuantizer
    calibration_batches: int
    # What the data-aware steps did: smoothed Linear groups, ranges chosen per method, GPTQ-rounded
    # Linears, corrected biases (only the steps that ran).
    steps: dict = field(default_factory=dict)


@dataclass
class StagedQuantization:
    """Quantization up to the steps that only round: static Q/DQ pairs in place with their ranges
    chosen (weight-only: AWQ's scales applied), before weights are fitted to their rounding (GPTQ,
    bias correction) and before weight-only Linears and embedding tables become codes. Accuracy
    control puts layers back in float from here without quantising again."""
    graph: torch.fx.GraphModule
    quantizer: EdgeQuantizer
    batches: list[tuple]
    reference: list | None            # the float outputs on `batches`, for bias_correction=auto
    steps: dict
    setup: QuantSetup | None = None   # how to finish: the quantizer's own setup unless decided otherwise

    def __post_init__(self):
        self.setup = self.setup or self.quantizer.setup

    def with_bias_correction_as_decided(self, result: QuantizedGraph) -> StagedQuantization:
        """This stage, finishing with the bias correction `result` (its own finish) kept or not:
        `auto` decided once, not again for every variant of the graph."""
        if self.quantizer.setup.bias_correction != "auto" or not self.batches:
            return self
        kept = isinstance(result.steps.get("biases_corrected"), int)
        setup = dataclasses.replace(self.quantizer.setup, bias_correction="on" if kept else "off")
        return dataclasses.replace(self, reference=None, setup=setup)

    def finish(self, graph: torch.fx.GraphModule, float_nodes: frozenset[str] = frozenset(),
               adjust_weights: bool = True) -> QuantizedGraph:
        """`graph` (this stage's or an edited copy of it) made final but for the nodes named in
        `float_nodes`: static weights fitted to their rounding, the other weights as codes."""
        steps = dict(self.steps)
        if self.batches and adjust_weights:
            graph, adjusted = _adjust_weights(graph, self.setup, self.batches, self.reference)
            steps.update(adjusted)
        self._replace_with_codes(graph, float_nodes)
        remove_unused_attributes(graph)  # the float weights codes or adjusted weights replaced
        graph.recompile()
        return QuantizedGraph(graph, self.quantizer, len(self.batches), steps)

    def _replace_with_codes(self, graph: torch.fx.GraphModule, float_nodes: frozenset[str]) -> None:
        """Embedding tables → int8 codes with a scale per row (the rows are what a lookup reads);
        weight-only Linears → codes with their scales."""
        setup = self.setup
        by_name = {n.name: n for n in graph.graph.nodes}
        for name in self.quantizer.layer_of_node:
            if name in float_nodes:
                continue
            if name in self.quantizer.embedding_nodes:
                replace_with_codes(graph, by_name[name], 8, None, weight_arg=0)
            elif setup.weight_only:
                replace_with_codes(graph, by_name[name], setup.bits, setup.group_size)


def quantize_graph(gm: torch.fx.GraphModule, setup: QuantSetup, calibration, example_inputs: tuple) -> QuantizedGraph:
    """PT2E on `gm` (rewritten in place): smooth (transformers), annotate, insert observers,
    calibrate, choose ranges, convert to Q/DQ, then round weights and correct biases on the same
    data. Weight-only quantization needs no observers: the weights are rounded to codes directly."""
    staged = stage_quantization(gm, setup, calibration, example_inputs)
    if not staged.quantizer.annotated:
        return QuantizedGraph(staged.graph, staged.quantizer, 0)
    return staged.finish(staged.graph)


def stage_quantization(gm: torch.fx.GraphModule, setup: QuantSetup, calibration,
                       example_inputs: tuple) -> StagedQuantization:
    """Everything `quantize_graph` does before weights are rounded (`gm` is rewritten in place)."""
    quantizer = EdgeQuantizer(setup)
    if setup.weight_only:
        return _stage_weights_only(gm, quantizer, calibration, example_inputs)
    # A probe of what will be quantised (annotation selects again after smoothing rewrote the graph).
    observed = [n for n in EdgeQuantizer(setup).select(gm) if n.target not in EMBEDDING_OPS]
    # Embeddings alone need no data: a lookup has no activation to observe.
    batches = checked_batches(calibration, example_inputs, needed_by="quantize") if observed else []
    steps = {}
    if observed and setup.smooth_alpha:
        steps["smoothed_groups"] = _smooth(gm, set(observed), setup.smooth_alpha, batches, example_inputs)
    prepared = prepare_pt2e(gm, quantizer)
    if not quantizer.annotated:
        return StagedQuantization(gm, quantizer, [], None, steps)
    if not observed:
        return StagedQuantization(prepared, quantizer, [], None, steps)
    # Observers pass values through: the calibration run's outputs are the float reference that
    # bias_correction=auto compares against.
    reference = _outputs(prepared, batches) if setup.bias_correction == "auto" else None
    if reference is None:
        calibrate(prepared, batches, example_inputs, needed_by="quantize")
    if setup.calib == "auto":
        steps["ranges"] = dict(choose_activation_ranges(prepared))
    if setup.overflow_check:
        steps["seven_bit_layers"] = len(narrow_saturating_weights(prepared))
    return StagedQuantization(convert(prepared), quantizer, batches, reference, steps)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`convert_pt2e(fold_quantize=False)` without its QAT step, `_fold_conv_bn_qat`. That step looks
    for the training-mode conv-bn patterns of `prepare_qat_pt2e`, which our graphs never hold (quantize
    and prepare_qat both use `prepare_pt2e` on eval-mode graphs); yet with a BatchNorm left in the graph
    (DenseNet's, after each concat) it strict-exports 96 pattern graphs to look for them: 45 % of
    densenet121's quantize. (A torchao without that step converts as it is.)"""
    skip = (unittest.mock.patch.object(quantize_pt2e, "_fold_conv_bn_qat", lambda model: model)
            if hasattr(quantize_pt2e, "_fold_conv_bn_qat") else contextlib.nullcontext())
    with skip:
        return convert_pt2e(prepared, fold_quantize=False)


def _stage_weights_only(gm, quantizer: EdgeQuantizer, calibration, example_inputs) -> StagedQuantization:
    setup = quantizer.setup
    linears = [n for n in quantizer.select(gm) if n.target not in EMBEDDING_OPS]
    batches = []
    if setup.awq and linears:
        batches = checked_batches(calibration, example_inputs, needed_by="quantize(awq=true)")
        _apply_awq(gm, linears, setup, batches, example_inputs)
    return StagedQuantization(gm, quantizer, batches, None, {})


def _smooth(gm: torch.fx.GraphModule, quantized: set, alpha: float, batches: list[tuple], example_inputs) -> int:
    """SmoothQuant on the Linears about to be quantised (each group of Linears reading one input)."""
    groups = linear_groups(gm, ignore=lambda node: node not in quantized)
    if groups:
        smooth_linears(gm, groups, alpha, batches, example_inputs, needed_by="quantize")
    return len(groups)


def _adjust_weights(converted: torch.fx.GraphModule, setup: QuantSetup, batches: list[tuple],
                    reference: list | None) -> tuple[torch.fx.GraphModule, dict]:
    """GPTQ rounding, then bias correction (which measures the weights as rounded). With
    bias_correction=auto the correction is kept only where it raises the output SQNR against the
    float `reference` outputs on the calibration data: a bias shift averaged over every position
    can hurt where positions differ in kind (a transformer's padding tokens against its words)."""
    steps = {}
    if setup.rounding == "gptq":
        steps["gptq_linears"] = apply_gptq(converted, batches)
    if setup.bias_correction != "off":
        corrected = copy_sharing_weights(converted) if reference is not None else converted
        uncorrected = []  # `converted`'s outputs, which the run measuring the correction computes anyway
        count = correct_biases(corrected, batches, uncorrected)
        if reference is None or _sqnr(reference, _outputs(weights_dequantized(corrected)[0], batches)) > \
                _sqnr(reference, uncorrected):
            converted, steps["biases_corrected"] = corrected, count
        else:
            steps["biases_corrected"] = "none: lowered the output SQNR on the calibration data"
    return converted, steps


def _outputs(gm: torch.fx.GraphModule, batches: list[tuple]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [pytree.tree_leaves(gm(*batch)) for batch in batches]


def _sqnr(reference: list[list[torch.Tensor]], outputs: list) -> float:
    """The SQNR of `outputs` (a graph's, batch by batch) against the `reference` outputs."""
    total = SqnrAccumulator()
    for expected, got in zip(reference, outputs):
        for a, b in zip(expected, pytree.tree_leaves(got)):
            total.add(a, b)
    return total.db


def _apply_awq(gm, linears, setup: QuantSetup, batches: list[tuple], example_inputs) -> None:
    """Search and apply AWQ's input scales for each group of the selected Linears."""
    chosen = set(linears)
    groups = linear_groups(gm, ignore=lambda node: node not in chosen)
    stats = collect_stats(gm, groups, batches, example_inputs, needed_by="quantize(awq=true)",
                          keep_rows=SAMPLE_ROWS)
    for group in groups:
        weight = group.weight(gm)
        choice = search_scale(torch.cat(stats[group.source].sample), stats[group.source].abs_mean, weight,
                              setup.bits, group_size_for(weight, setup.group_size))
        apply_input_scale(gm, group, choice.scale)
