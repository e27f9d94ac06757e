"""Hypothesis strategies that generate small random PyTorch models for testing graph passes.

A drawn model is a `GeneratedModel(module, example_inputs, spec)`: an `nn.Module` in eval
mode with seeded random weights, a tuple of float32 example inputs, and the JSON-able spec
it was built from. The spec is drawn first and built afterwards, so a failing example
prints a readable spec (as `GeneratedModel.from_spec({...})`, which rebuilds it exactly).

Usage::

    import torch
    from hypothesis import given, settings
    from edgepasses.testing.strategies import models

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(models(batch_norm=True))
    def test_my_pass(m):
        expected = m.module(*m.example_inputs)
        gm = torch.export.export(m.module, m.example_inputs).module()
        gm = my_pass(gm)
        torch.testing.assert_close(gm(*m.example_inputs), expected)

Families: conv2d chains on 4-D input (the default) and MLPs on 2-D input (`mlp=True`).
Every other feature is off unless switched on by a keyword of `models()` / `model_specs()`.
Shapes are computed while drawing, so every draw builds a valid model without `assume`, and
all ops are static, so `torch.export.export` captures every generated model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence, TypedDict

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "FEATURES",
    "Concat",
    "GeneratedModel",
    "LayerSpec",
    "ModelSpec",
    "Residual",
    "build_example_inputs",
    "build_model",
    "model_specs",
    "models",
    "spec_features",
]

ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "hardswish", "gelu", "identity")
# Keyword switches of `models()`; also the names `spec_features` reports.
FEATURES: tuple[str, ...] = (
    "batch_norm", "residual", "concat", "grouped", "depthwise", "linear_head", "mlp",
)
_CONV_ONLY_FEATURES = ("residual", "concat", "grouped", "depthwise", "linear_head")

# Small enough that one example runs in milliseconds.
MAX_BATCH = 2
MAX_CHANNELS = 16
MIN_SPATIAL, MAX_SPATIAL = 4, 12
# Downsampling stops here so later 3x3 convs still see a neighbourhood.
_MIN_OUTPUT_SPATIAL = 2

LayerSpec = dict[str, Any]
"""One layer: `{"op": <name>, ...}`; `residual` and `concat` nest further layer lists."""


class ModelSpec(TypedDict):
    family: Literal["conv", "mlp"]
    input_shape: list[int]
    seed: int
    layers: list[LayerSpec]


# --------------------------------------------------------------------------- modules


class Residual(nn.Module):
    """`x + body(x)`; the body keeps channels and spatial size."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    """Runs every branch on the same input and concatenates the results along channels."""

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


# --------------------------------------------------------------------------- building

_ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def _build_conv2d(layer: LayerSpec) -> nn.Module:
    return nn.Conv2d(
        layer["in_channels"], layer["out_channels"], layer["kernel_size"],
        stride=layer["stride"], padding=layer["padding"], groups=layer["groups"],
        bias=layer["bias"],
    )


_LAYER_BUILDERS: dict[str, Callable[[LayerSpec], nn.Module]] = {
    "conv2d": _build_conv2d,
    "linear": lambda layer: nn.Linear(
        layer["in_features"], layer["out_features"], bias=layer["bias"]),
    "batch_norm2d": lambda layer: nn.BatchNorm2d(layer["num_features"]),
    "batch_norm1d": lambda layer: nn.BatchNorm1d(layer["num_features"]),
    "activation": lambda layer: _ACTIVATION_MODULES[layer["kind"]](),
    "global_avg_pool": lambda layer: nn.AdaptiveAvgPool2d(1),
    "flatten": lambda layer: nn.Flatten(),
    "residual": lambda layer: Residual(_build_sequence(layer["body"])),
    "concat": lambda layer: Concat([_build_sequence(b) for b in layer["branches"]]),
}


def _build_layer(layer: LayerSpec) -> nn.Module:
    try:
        builder = _LAYER_BUILDERS[layer["op"]]
    except KeyError:
        raise ValueError(f"unknown layer op {layer.get('op')!r} in {layer!r}") from None
    return builder(layer)


def _build_sequence(layers: Sequence[LayerSpec]) -> nn.Sequential:
    return nn.Sequential(*(_build_layer(layer) for layer in layers))


def _randomize_batch_norm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Replace the identity-like default statistics so that folding BN really changes weights."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n) * 0.5)
        bn.running_var.copy_(torch.rand(n) * 1.5 + 0.25)  # in [0.25, 1.75): away from 0 and 1
        bn.weight.copy_(torch.rand(n) + 0.5)
        bn.bias.copy_(torch.randn(n) * 0.5)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the model a spec describes: float32, eval mode, weights seeded by `spec["seed"]`.

    The global torch RNG is left as it was, so building a model never perturbs the caller.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = _build_sequence(spec["layers"])
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _randomize_batch_norm(module)
    return model.to(torch.float32).eval()


def build_example_inputs(spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    """Seeded float32 example inputs of `spec["input_shape"]`."""
    generator = torch.Generator().manual_seed(spec["seed"])
    return (torch.randn(spec["input_shape"], generator=generator, dtype=torch.float32),)


@dataclass(frozen=True, repr=False)
class GeneratedModel:
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    spec: ModelSpec

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> GeneratedModel:
        return cls(build_model(spec), build_example_inputs(spec), spec)

    # Both print the spec only: weights and tensors would drown it, and it rebuilds the model.
    def __repr__(self) -> str:
        return f"GeneratedModel.from_spec({self.spec!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("GeneratedModel.from_spec(")
        printer.pretty(self.spec)
        printer.text(")")


# --------------------------------------------------------------------------- inspecting specs


def _walk_layers(layers: Sequence[LayerSpec]) -> Iterator[LayerSpec]:
    for layer in layers:
        yield layer
        if layer["op"] == "residual":
            yield from _walk_layers(layer["body"])
        elif layer["op"] == "concat":
            for branch in layer["branches"]:
                yield from _walk_layers(branch)


def spec_features(spec: ModelSpec) -> set[str]:
    """The names from `FEATURES` that occur in a spec (e.g. to `hypothesis.event` them)."""
    found = {"mlp"} if spec["family"] == "mlp" else set()
    for layer in _walk_layers(spec["layers"]):
        op = layer["op"]
        if op.startswith("batch_norm"):
            found.add("batch_norm")
        elif op in ("residual", "concat"):
            found.add(op)
        elif op == "global_avg_pool":
            found.add("linear_head")
        elif op == "conv2d" and layer["groups"] > 1:
            found.add("depthwise" if layer["groups"] == layer["in_channels"] else "grouped")
    return found


# --------------------------------------------------------------------------- drawing specs


@dataclass(frozen=True)
class _Options:
    conv: bool
    mlp: bool
    batch_norm: bool
    residual: bool
    concat: bool
    grouped: bool
    depthwise: bool
    linear_head: bool
    activations: tuple[str, ...]
    max_layers: int

    def validate(self) -> None:
        if not (self.conv or self.mlp):
            raise ValueError("enable at least one model family: conv=True or mlp=True")
        conv_only = [name for name in _CONV_ONLY_FEATURES if getattr(self, name)]
        if conv_only and not self.conv:
            raise ValueError(f"{', '.join(conv_only)} need the conv family (conv=True)")
        unknown = set(self.activations) - set(ACTIVATIONS)
        if not self.activations or unknown:
            raise ValueError(f"activations must be a non-empty subset of {ACTIVATIONS}, "
                             f"got {self.activations!r}")
        if self.max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {self.max_layers}")


class _FeatureMap(NamedTuple):
    channels: int
    height: int
    width: int


def _conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _conv_geometries(shape: _FeatureMap, keep_spatial: bool) -> list[tuple[int, int, int]]:
    """(kernel, stride, padding) choices valid for `shape`; the simplest comes first to shrink to."""
    candidates = [(3, 1, 1), (1, 1, 0)]
    if not keep_spatial:
        candidates += [(3, 2, 1), (1, 2, 0), (3, 1, 0)]
    return [
        geometry for geometry in candidates
        if min(_conv_output_size(shape.height, *geometry),
               _conv_output_size(shape.width, *geometry)) >= _MIN_OUTPUT_SPATIAL
    ]


def _group_choices(in_channels: int, out_channels: int | None, max_out: int,
                   opts: _Options) -> dict[str, list[int]]:
    """Feasible `groups` per conv kind; groups must divide both channel counts."""

    def fits(groups: int) -> bool:
        return groups <= max_out if out_channels is None else out_channels % groups == 0

    choices = {"plain": [1]}
    if opts.grouped:
        proper_divisors = [g for g in range(2, in_channels) if in_channels % g == 0 and fits(g)]
        if proper_divisors:
            choices["grouped"] = proper_divisors
    if opts.depthwise and in_channels > 1 and fits(in_channels):
        choices["depthwise"] = [in_channels]
    return choices


def _draw_conv(draw: st.DrawFn, shape: _FeatureMap, opts: _Options, *, keep_spatial: bool,
               out_channels: int | None = None,
               max_out: int = MAX_CHANNELS) -> tuple[LayerSpec, _FeatureMap]:
    group_choices = _group_choices(shape.channels, out_channels, max_out, opts)
    kind = draw(st.sampled_from(list(group_choices)))  # plain first: shrinks to plain
    groups = draw(st.sampled_from(group_choices[kind]))
    if out_channels is None:
        out_channels = groups * draw(st.integers(1, max_out // groups))
    kernel, stride, padding = draw(st.sampled_from(_conv_geometries(shape, keep_spatial)))
    layer = {
        "op": "conv2d", "in_channels": shape.channels, "out_channels": out_channels,
        "kernel_size": kernel, "stride": stride, "padding": padding, "groups": groups,
        "bias": draw(st.booleans()),
    }
    out_shape = _FeatureMap(
        out_channels,
        _conv_output_size(shape.height, kernel, stride, padding),
        _conv_output_size(shape.width, kernel, stride, padding),
    )
    return layer, out_shape


def _draw_activation(draw: st.DrawFn, opts: _Options) -> LayerSpec:
    return {"op": "activation", "kind": draw(st.sampled_from(opts.activations))}


def _draw_conv_unit(draw: st.DrawFn, shape: _FeatureMap, opts: _Options,
                    **conv_constraints: Any) -> tuple[list[LayerSpec], _FeatureMap]:
    """conv -> optional BatchNorm2d -> activation."""
    conv, shape = _draw_conv(draw, shape, opts, **conv_constraints)
    layers = [conv]
    if opts.batch_norm and draw(st.booleans()):
        layers.append({"op": "batch_norm2d", "num_features": shape.channels})
    layers.append(_draw_activation(draw, opts))
    return layers, shape


def _draw_residual_block(draw: st.DrawFn, shape: _FeatureMap,
                         opts: _Options) -> tuple[list[LayerSpec], _FeatureMap]:
    """One or two spatial-preserving conv units whose last one restores the input channels."""
    unit_count = draw(st.integers(1, 2))
    body: list[LayerSpec] = []
    inner = shape
    for index in range(unit_count):
        is_last = index == unit_count - 1
        unit, inner = _draw_conv_unit(draw, inner, opts, keep_spatial=True,
                                      out_channels=shape.channels if is_last else None)
        body += unit
    # ResNet-style: activation after the add.
    return [{"op": "residual", "body": body}, _draw_activation(draw, opts)], shape


def _draw_concat_block(draw: st.DrawFn, shape: _FeatureMap,
                       opts: _Options) -> tuple[list[LayerSpec], _FeatureMap]:
    """Two spatial-preserving branches whose channel counts together stay within MAX_CHANNELS."""
    first, first_out = _draw_conv_unit(draw, shape, opts, keep_spatial=True,
                                       max_out=MAX_CHANNELS - 1)
    second, second_out = _draw_conv_unit(draw, shape, opts, keep_spatial=True,
                                         max_out=MAX_CHANNELS - first_out.channels)
    out_shape = shape._replace(channels=first_out.channels + second_out.channels)
    return [{"op": "concat", "branches": [first, second]}], out_shape


def _draw_plain_block(draw: st.DrawFn, shape: _FeatureMap,
                      opts: _Options) -> tuple[list[LayerSpec], _FeatureMap]:
    return _draw_conv_unit(draw, shape, opts, keep_spatial=False)


def _draw_linear_head(draw: st.DrawFn, channels: int) -> list[LayerSpec]:
    return [
        {"op": "global_avg_pool"},
        {"op": "flatten"},
        {"op": "linear", "in_features": channels,
         "out_features": draw(st.integers(1, MAX_CHANNELS)), "bias": draw(st.booleans())},
    ]


def _draw_conv_family(draw: st.DrawFn, opts: _Options) -> tuple[list[int], list[LayerSpec]]:
    batch = draw(st.integers(1, MAX_BATCH))
    shape = _FeatureMap(
        draw(st.integers(1, MAX_CHANNELS)),
        draw(st.integers(MIN_SPATIAL, MAX_SPATIAL)),
        draw(st.integers(MIN_SPATIAL, MAX_SPATIAL)),
    )
    input_shape = [batch, *shape]
    block_drawers = [_draw_plain_block]
    if opts.residual:
        block_drawers.append(_draw_residual_block)
    if opts.concat:
        block_drawers.append(_draw_concat_block)
    layers: list[LayerSpec] = []
    for _ in range(draw(st.integers(1, opts.max_layers))):
        draw_block = draw(st.sampled_from(block_drawers))
        block, shape = draw_block(draw, shape, opts)
        layers += block
    if opts.linear_head and draw(st.booleans()):
        layers += _draw_linear_head(draw, shape.channels)
    return input_shape, layers


def _draw_mlp_family(draw: st.DrawFn, opts: _Options) -> tuple[list[int], list[LayerSpec]]:
    """linear -> optional BatchNorm1d -> activation, repeated, on (batch, features) input."""
    features = draw(st.integers(1, MAX_CHANNELS))
    input_shape = [draw(st.integers(1, MAX_BATCH)), features]
    layers: list[LayerSpec] = []
    for _ in range(draw(st.integers(1, opts.max_layers))):
        out_features = draw(st.integers(1, MAX_CHANNELS))
        layers.append({"op": "linear", "in_features": features, "out_features": out_features,
                       "bias": draw(st.booleans())})
        if opts.batch_norm and draw(st.booleans()):
            layers.append({"op": "batch_norm1d", "num_features": out_features})
        layers.append(_draw_activation(draw, opts))
        features = out_features
    return input_shape, layers


@st.composite
def _draw_spec(draw: st.DrawFn, opts: _Options) -> ModelSpec:
    families = [name for name in ("conv", "mlp") if getattr(opts, name)]
    family = draw(st.sampled_from(families))
    draw_family = _draw_conv_family if family == "conv" else _draw_mlp_family
    input_shape, layers = draw_family(draw, opts)
    seed = draw(st.integers(0, 2**32 - 1))
    return {"family": family, "input_shape": input_shape, "seed": seed, "layers": layers}


def model_specs(*, conv: bool = True, mlp: bool = False, batch_norm: bool = False,
                residual: bool = False, concat: bool = False, grouped: bool = False,
                depthwise: bool = False, linear_head: bool = False,
                activations: Sequence[str] = ACTIVATIONS,
                max_layers: int = 4) -> st.SearchStrategy[ModelSpec]:
    """Strategy for JSON-able model specs; build one with `build_model` / `GeneratedModel.from_spec`.

    conv / mlp: model families to draw from (conv2d chains on NCHW input, MLPs on NC input).
    batch_norm: may put BatchNorm2d after convs and BatchNorm1d after linears, with random
        running statistics and affine parameters.
    residual: blocks `x + body(x)`; concat: two branches concatenated along channels.
    grouped: convs with 1 < groups < in_channels; depthwise: convs with groups == in_channels.
    linear_head: may end a conv model with global average pooling, flatten and a linear.
    activations: the activations to choose from (subset of `ACTIVATIONS`).
    max_layers: most top-level blocks (conv unit, residual or concat block, or linear unit),
        not counting the linear head.
    Each enabled feature *may* appear in a draw; none is forced.
    """
    opts = _Options(conv=conv, mlp=mlp, batch_norm=batch_norm, residual=residual,
                    concat=concat, grouped=grouped, depthwise=depthwise,
                    linear_head=linear_head, activations=tuple(activations),
                    max_layers=max_layers)
    opts.validate()
    return _draw_spec(opts)


def models(*, conv: bool = True, mlp: bool = False, batch_norm: bool = False,
           residual: bool = False, concat: bool = False, grouped: bool = False,
           depthwise: bool = False, linear_head: bool = False,
           activations: Sequence[str] = ACTIVATIONS,
           max_layers: int = 4) -> st.SearchStrategy[GeneratedModel]:
    """Strategy for `GeneratedModel`s; the keywords are those of `model_specs`."""
    specs = model_specs(conv=conv, mlp=mlp, batch_norm=batch_norm, residual=residual,
                        concat=concat, grouped=grouped, depthwise=depthwise,
                        linear_head=linear_head, activations=activations,
                        max_layers=max_layers)
    return specs.map(GeneratedModel.from_spec)
