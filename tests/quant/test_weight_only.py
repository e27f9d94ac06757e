"""Weight-only int8/int4 with groups, and AWQ's activation-aware scales."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import edgepasses
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.quant.weight_only import fake_quantize_weight, qmax, quantize_weight
from edgepasses.testing import count_ops



@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(out=st.integers(1, 9), groups=st.integers(1, 4), group=st.sampled_from([1, 4, 8, 32]),
       bits=st.sampled_from([4, 8]), outlier=st.floats(1.0, 100.0))
def test_codes_stay_in_range_and_rounding_error_is_at_most_half_a_step(out, groups, group, bits, outlier):
    weight = torch.randn(out, groups * group, generator=torch.Generator().manual_seed(out * groups))
    weight[0, 0] *= outlier
    codes, scales = quantize_weight(weight, bits, group)
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax(bits)
    error = (fake_quantize_weight(weight, bits, group) - weight).abs().reshape(out, groups, group)
    assert (error <= scales / 2 * (1 + 1e-5)).all()


def test_int4_groups_run_the_same_numbers_in_the_graph_as_the_fake_quantized_weights():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(5, 64)
    gm = edgepasses.compress(model, (x,), "quantize(bits=4,weight_only=true,group_size=16)")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (reference[0], reference[2]):
            layer.weight.copy_(fake_quantize_weight(layer.weight, 4, 16))
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
    assert count_ops(gm)["aten.view"] == 4  # per layer: codes to groups and back
    codes = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "int4" in n.target]
    assert len(codes) == 2 and all(c.dtype == torch.int8 and c.abs().max() <= 7 for c in codes)


def test_awq_beats_round_to_nearest_int4_on_activation_outliers(tiny_bert):
    model, example, calibration, evaluation = tiny_bert
    # Embedding tables stay float here: their int8 error would mask the Linear weights' difference.
    plain = edgepasses.compress(model, example, "quantize(bits=4,weight_only=true,group_size=32,embeddings=false)")
    awq = edgepasses.compress(model, example,
                              "quantize(bits=4,weight_only=true,group_size=32,awq=true,embeddings=false)",
                              calibration=calibration)
    assert awq.edge_report.records[0].stats["calib"] == "awq"
    assert output_sqnr(model, awq, evaluation) > output_sqnr(model, plain, evaluation) + 1.0


def test_int4_graph_runs_on_openvino_with_our_numbers(tiny_bert):
    pytest.importorskip("openvino")
    model, example, calibration, _ = tiny_bert
    gm = edgepasses.compress(model, example, "quantize(bits=4,weight_only=true,group_size=32,awq=true)",
                             calibration=calibration, target="openvino")
    compiled = edgepasses.lower(gm, example, target="openvino", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*example), gm(*example), rtol=1e-3, atol=1e-3)


def test_int8_quantizes_embedding_tables_per_row(tiny_bert):
    model, example, calibration, evaluation = tiny_bert
    gm = edgepasses.compress(model, example, "quantize", calibration=calibration)
    lookups = [n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default]
    assert len(lookups) == 2
    for lookup in lookups:  # codes -> float -> x scale per row, then the lookup
        mul = lookup.args[0]
        codes = getattr(gm, mul.args[0].args[0].target)
        assert mul.target == torch.ops.aten.mul.Tensor and codes.dtype == torch.int8
        assert getattr(gm, mul.args[1].target).shape == (codes.shape[0], 1)
    kept = edgepasses.compress(model, example, "quantize(embeddings=false)", calibration=calibration)
    assert _bytes(gm) < _bytes(kept) - 0.7 * model.token_embedding.weight.nbytes
    assert output_sqnr(model, gm, evaluation) > 35.0


def _bytes(gm: torch.fx.GraphModule) -> int:
    return sum(t.nbytes for t in [*gm.parameters(), *gm.buffers()])
