"""Pipeline grammar, typed options, presets, requires, uuid."""
import re
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from edgepasses import PRESETS, Pipeline, PassResult, option, register_pass
from edgepasses.errors import OptionError
from edgepasses.pass_base import _REGISTRY


@dataclass(frozen=True)
class ToyOptions:
    ratio: float = option(0.5, "a share")
    bits: int = option(8, "bits")
    mode: Literal["l1", "l2"] = option("l1", "a norm")
    symmetric: bool = option(True, "a flag")
    ignore: tuple[str, ...] = option((), "layer names")
    name: str | None = option(None, "a name")


@pytest.fixture
def toy_passes():
    register_pass("toy", options=ToyOptions)(lambda gm, o, c: PassResult(gm, False))
    register_pass("needs_toy", requires=("toy",))(lambda gm, o, c: PassResult(gm, False))
    register_pass("toy_first", before=("toy",))(lambda gm, o, c: PassResult(gm, False))
    yield
    del _REGISTRY["toy"], _REGISTRY["needs_toy"], _REGISTRY["toy_first"]


@pytest.mark.parametrize("text, canonical", [
    ("fold_bn,dce", "fold_bn,dce"),
    (" fold_bn , dce ", "fold_bn,dce"),
    ("edge-fp32", "fold_bn,dce"),
    ("toy", "toy"),
    ("toy()", "toy"),
    ("toy(ratio=0.5,bits=8)", "toy"),                      # defaults are left out
    ("toy(bits=4,ratio=0.25)", "toy(ratio=0.25,bits=4)"),  # declared order
    ("toy(ratio=1)", "toy(ratio=1.0)"),                    # int where float is declared
    ("toy(mode=l2,symmetric=false)", "toy(mode=l2,symmetric=false)"),
    ("toy(ignore=[conv1,layer1.0.conv2])", "toy(ignore=[conv1,layer1.0.conv2])"),
    ("toy(ignore=conv1)", "toy(ignore=[conv1])"),
    ("toy(ignore=['layer.*\\\\.fc$'])", "toy(ignore=['layer.*\\\\.fc$'])"),
    ("toy(name='with space')", "toy(name='with space')"),
    ("toy(name=none)", "toy"),
    ("toy(ratio=1e-3)", "toy(ratio=0.001)"),
])
def test_canonical_text_and_round_trip(toy_passes, text, canonical):
    pipeline = Pipeline.parse(text)
    assert str(pipeline) == canonical
    assert Pipeline.parse(str(pipeline)) == pipeline


@pytest.mark.parametrize("text, message", [
    ("fold_bn,nosuchpass", "unknown pass 'nosuchpass'.*registered passes: .*dce.*fold_bn"),
    ("toy(nokey=1)", "unknown option.*nokey.*valid options: ratio: float, bits: int, mode: l1\\|l2"),
    ("toy(bits=4.5)", "option 'bits' must be int; got 4.5"),
    ("toy(bits=true)", "option 'bits' must be int; got True"),
    ("toy(mode=l3)", "option 'mode' must be one of 'l1', 'l2'; got 'l3'"),
    ("toy(ratio=abc)", "option 'ratio' must be float; got 'abc'"),
    ("toy(bits=1,bits=2)", "given twice"),
    ("toy(bits=", "expected a value"),
    ("toy(bits 4)", "expected '='"),
    ("fold_bn,,dce", "expected a pass name"),
    ("edge-fp32(x=1)", "preset 'edge-fp32' takes no options"),
    ("", "non-empty string"),
    ("needs_toy", "pass 'needs_toy' requires toy earlier"),
    ("needs_toy,toy", "pass 'needs_toy' requires toy earlier"),
    ("toy,toy_first", "pass 'toy_first' must run before 'toy'; write 'toy_first,toy' instead of 'toy,toy_first'"),
    ("dce,toy,fold_bn,toy_first,dce", "write 'dce,toy_first,toy,fold_bn,dce'"),
])
def test_bad_pipelines_raise_value_errors_that_say_what_is_valid(toy_passes, text, message):
    with pytest.raises(ValueError, match=message) as info:
        Pipeline.parse(text)
    assert isinstance(info.value, OptionError)


def test_requires_and_before_met_when_in_order(toy_passes):
    assert str(Pipeline.parse("toy,needs_toy")) == "toy,needs_toy"
    assert str(Pipeline.parse("toy_first,toy_first,toy,needs_toy")) == "toy_first,toy_first,toy,needs_toy"
    assert str(Pipeline.parse("toy_first")) == "toy_first"  # `before` orders, it does not require


@pytest.mark.parametrize("text, first, then", [
    ("sparsify_24,lowrank", "lowrank", "sparsify_24"),     # factors of a 2:4 weight would be dense
    ("fold_bn,sparsify_24,prune", "prune", "sparsify_24"),  # removed inputs would break groups of 4
    ("quantize,smooth", "smooth", "quantize"),              # quantized weights are no constants
    ("quantize(weight_only=true),lowrank,dce", "lowrank", "quantize"),
])
def test_built_in_passes_out_of_order_are_one_line_errors(text, first, then):
    with pytest.raises(OptionError) as info:
        Pipeline.parse(text)
    message = str(info.value)
    assert f"pass {first!r} must run before {then!r}" in message and "\n" not in message
    fixed = re.search(r"write '(.*)' instead of", message).group(1)
    assert Pipeline.parse(fixed)  # what the message says to write is a valid pipeline


def test_uuid_depends_on_options_and_pass_versions(toy_passes):
    base = Pipeline.parse("toy")
    assert base.uuid() == Pipeline.parse("toy(ratio=0.5)").uuid()
    assert base.uuid() != Pipeline.parse("toy(ratio=0.25)").uuid()
    assert base.uuid() != Pipeline.parse("toy,dce").uuid()
    info = _REGISTRY["toy"]
    _REGISTRY["toy"] = type(info)(**{**info.__dict__, "version": info.version + 1})
    assert Pipeline.parse("toy").uuid() != base.uuid()


def test_presets_expand_to_registered_passes():
    for name, text in PRESETS.items():
        assert str(Pipeline.parse(name)) == str(Pipeline.parse(text))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_compresses_a_small_model(preset):
    import edgepasses

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).eval()
    calibration = [(torch.randn(8, 64),) for _ in range(4)]
    gm = edgepasses.compress(model, calibration[0], preset, calibration=calibration)
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert [r.step for r in gm.edge_report.records] == [s.name for s in Pipeline.parse(preset).steps]
    assert got.shape == expected.shape and torch.isfinite(got).all()


def test_options_must_be_frozen_dataclasses():
    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass("mutable", options=Mutable)


def test_every_option_needs_a_description():
    @dataclass(frozen=True)
    class Bare:
        described: int = option(1, "what it does")
        bare: int = 2

    @dataclass(frozen=True)
    class Blank:
        blank: int = option(1, " ")

    for options, field in ((Bare, "bare"), (Blank, "blank")):
        with pytest.raises(TypeError, match=f"option '{field}' of pass 'undescribed' has no description"):
            register_pass("undescribed", options=options)
    assert "undescribed" not in _REGISTRY


def test_ordering_names_are_tuples_not_a_string():
    with pytest.raises(TypeError, match="tuples of pass names"):
        register_pass("one_string", before="quantize")


def test_layer_names_under_torch_compile_match_compress():
    """Dynamo names the root `L['fn']`/`L['self']`: ignore lists written for compress() must still match."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    seen = []
    compiled = torch.compile(model, backend="edge", options={
        "pipeline": "prune(ratio=0.5,ignore=['2'])", "target": "reference", "on_compile": seen.append})
    with torch.no_grad():
        compiled(torch.randn(2, 8))
    assert seen[0].report.records[0].step.startswith("prune")  # before: "ignore pattern '2' matched no ... L['fn'].2"
