"""Dynamic shapes through the backend: one compile serves every size in range (docs/dynamic-shapes.md)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgepasses.dynamic_shapes import DynamicDim, dynamic_dims, export_with_shapes, range_check
from edgepasses.errors import InputMismatchError, OptionError
from edgepasses.testing import import_transformers

SHAPES = [(2, 16), (1, 48), (4, 128), (3, 7)]  # (batch, tokens)


@pytest.fixture
def size_oblivious():
    """Dynamo specializes sizes 0 and 1 unless told not to: batch 1 then shares the compile."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        yield


def _bert():
    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=256)
    return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(0, 100, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sqnr_db(reference: torch.Tensor, got: torch.Tensor) -> float:
    noise = (reference - got).pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).mean().item() / noise)


def _outputs(model, compiled, shapes=SHAPES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return [(model(**_tokens(*s)).last_hidden_state, compiled(**_tokens(*s)).last_hidden_state) for s in shapes]


def _dynamic_bert(target: str, **options):
    """(eager BERT, its dynamic compile, the compilations list)."""
    if target == "openvino":
        pytest.importorskip("openvino")
    model, compilations = _bert(), []
    compiled = torch.compile(model, backend="edge", dynamic=True, options={
        "target": target, "on_compile": compilations.append, "target_options": {"reference": {"compile": False}},
        **options})
    return model, compiled, compilations


@pytest.mark.parametrize("target", ["reference", "openvino"])
def test_a_bert_encoder_compiles_once_for_every_batch_and_length(target, size_oblivious):
    model, compiled, compilations = _dynamic_bert(target, verify=True)
    for expected, got in _outputs(model, compiled):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert len(compilations) == 1
    dims = {(d.input, d.dim) for d in compilations[0].dynamic}
    assert dims == {("input_ids", 0), ("input_ids", 1), ("attention_mask", 0), ("attention_mask", 1)}


@pytest.mark.parametrize("target", ["reference", "openvino"])
def test_int8_calibrates_on_batches_of_several_lengths_and_serves_every_length(target, size_oblivious):
    model, compiled, compilations = _dynamic_bert(target, pipeline="fold_bn,quantize,dce",
                                                  calibration=[_tokens(2, n) for n in (8, 24, 64, 100)])
    sqnrs = [_sqnr_db(expected, got) for expected, got in _outputs(model, compiled)]
    assert len(compilations) == 1 and compilations[0].lowering.int8_ops > 0
    assert min(sqnrs) > 25, sqnrs


def test_sizes_and_python_numbers_dynamo_passes_become_shapes_and_checked_constants():
    """Dynamo passes `x.size(0)` as its own input and, under dynamic=True, a float attribute as a tensor."""
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(8, 8), 0.5

        def forward(self, x):
            return self.fc(x).view(x.shape[0], 2, -1).sum(1) * self.scale

    model, compilations = Reshaping().eval(), []
    compiled = torch.compile(model, backend="edge", dynamic=True,
                             options={"target": "reference", "on_compile": compilations.append})
    with torch.no_grad():
        for batch in (3, 5, 11):
            x = torch.randn(batch, 8)
            torch.testing.assert_close(compiled(x), model(x))
        model.scale = 2.0  # no recompile: Dynamo passes it as an input, which the program compiled as 0.5
        with pytest.raises(OptionError, match=r"^the Python number self\.scale is 2\.0 where the edge backend "
                                              r"compiled it as the constant 0\.5"):
            compiled(torch.randn(3, 8))
    assert len(compilations) == 1


class _Linear(nn.Linear):
    def forward(self, x):
        return super().forward(x)


def test_a_size_outside_the_range_a_program_was_compiled_for_is_one_clear_error():
    gm = export_with_shapes(_Linear(4, 2).eval(), (torch.randn(3, 4),),
                            ({0: torch.export.Dim.DYNAMIC(min=2, max=8)},)).module()
    assert dynamic_dims(gm) == [DynamicDim("x", 0, 0, 2, 8, dynamic_dims(gm)[0].symbol)]
    check = range_check(gm)
    check([torch.randn(8, 4)])
    with pytest.raises(InputMismatchError, match=r"^input x has size 9 in dim 0, outside the range 2\.\.8 this "
                                                 r"program was compiled for \(x\[0\] in 2\.\.8\)"):
        check([torch.randn(9, 4)])


def test_a_static_compile_reports_no_dynamic_dims():
    compilations = []
    compiled = torch.compile(nn.Linear(4, 2).eval(), backend="edge", dynamic=False,
                             options={"target": "reference", "on_compile": compilations.append})
    with torch.no_grad():
        compiled(torch.randn(3, 4))
    assert compilations[0].dynamic == ()


def test_mark_dynamic_with_a_range_compiles_once_for_that_range():
    model, compilations = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), []
    compiled = torch.compile(model, backend="edge", options={"target": "reference",
                                                            "on_compile": compilations.append})
    first = torch.randn(4, 8)
    torch._dynamo.mark_dynamic(first, 0, min=2, max=64)
    with torch.no_grad():
        for x in (first, torch.randn(2, 8), torch.randn(64, 8), torch.randn(33, 8)):
            torch.testing.assert_close(compiled(x), model(x))
    assert len(compilations) == 1
    assert [(d.dim, d.min, d.max) for d in compilations[0].dynamic] == [(0, 2, 64)]
