"""Ordered target lists: each partition goes to the first target that runs all its ops."""
import logging

import pytest
import torch

import edgepasses
from edgepasses.backends import get_target, parse_target_names
from edgepasses.backends.chain import TargetChain
from edgepasses.errors import OptionError, UnsupportedOpError
from edgepasses.testing.unconvertible import WithMysteryOp

pytest.importorskip("openvino", reason="openvino is not installed")


@pytest.fixture(scope="module")
def mystery():
    torch.manual_seed(0)
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    return model, x, edgepasses.compress(model, (x,), "dce", target="openvino")


def test_the_op_openvino_cannot_run_goes_to_the_next_target(mystery, caplog):
    model, x, gm = mystery
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="openvino,reference")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
    lowering = lowered.edge_lowering
    assert lowering.target == "openvino,reference" and lowering.fallbacks == []
    by_target = {p.target: p for p in lowering.placements}
    assert [p.target for p in lowering.placements].count("openvino") == 2  # before and after the op
    assert by_target["reference"].ops == 1 and "reference -> reference" not in lowering.placement_text()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per hand-over"
    assert "edgetest.mystery" in warnings[0].getMessage() and "reference" in warnings[0].getMessage()


def test_a_graph_the_first_target_runs_whole_stays_on_it():
    model, x = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).eval(), torch.randn(2, 6)
    lowered = edgepasses.lower(edgepasses.compress(model, (x,), "dce"), (x,), target="openvino,reference")
    assert lowered.edge_lowering.target == "openvino"
    assert lowered.edge_lowering.placement_text() == "whole graph -> openvino, 2 op(s)"


def test_the_last_target_leftovers_follow_strict(mystery):
    """tvm cannot run the op either; it is left to PyTorch (warned), or refused with strict."""
    pytest.importorskip("tvm", reason="TVM is not installed")
    model, x, gm = mystery
    with pytest.raises(UnsupportedOpError, match="mystery"):
        edgepasses.lower(gm, (x,), target="openvino,tvm", strict=True)


def test_torch_compile_takes_a_target_list(mystery):
    model, x, _ = mystery
    compiled = torch.compile(model, backend="edge", options={"target": "openvino,reference", "pipeline": "dce"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_auto_is_the_list_of_targets_that_run_here():
    auto = get_target("auto")
    assert isinstance(auto, TargetChain)
    assert auto.name in ("openvino,reference", "tensorrt,openvino,reference")
    assert auto.quant_caps is auto.targets[0].quant_caps


@pytest.mark.parametrize("spec, message", [
    ("openvino,nope", "unknown target"), ("auto,reference", "stands alone"), ("reference,reference", "twice"),
    ("openvino,", "unknown target")])
def test_bad_target_lists_are_refused(spec, message):
    with pytest.raises(OptionError, match=message):
        parse_target_names(spec)


def test_an_unavailable_target_in_a_list_is_skipped_and_a_single_one_refused():
    assert get_target("tensorrt,reference").name == ("reference" if not torch.cuda.is_available()
                                                     else "tensorrt,reference")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run here"):
            get_target("tensorrt")


def test_target_options_configure_the_target_and_unknown_ones_are_refused():
    pytest.importorskip("tvm", reason="TVM is not installed")
    assert get_target("tvm", {"tvm": {"trials": 3}}).trials == 3
    with pytest.raises(OptionError, match="target_options\\['tvm'\\]"):
        get_target("tvm", {"tvm": {"trails": 3}})
    with pytest.raises(OptionError, match="unknown target"):
        get_target("openvino", {"nvdla": {}})


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10)).eval()


def test_sparse_linears_run_on_the_2_4_kernel_of_a_later_target_and_the_rest_on_openvino(caplog):
    """OpenVINO has no 2:4 kernel: in "openvino,reference" the 2:4 Linears go to the reference kernel,
    not dense onto OpenVINO, and nothing warns (no layer runs dense)."""
    model, x = _mlp(), torch.randn(4, 64)
    gm = edgepasses.compress(model, (x,), "sparsify_24(ignore=['4']),dce")
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="openvino,reference")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    lowering = lowered.edge_lowering
    assert lowering.target == "openvino,reference" and lowering.sparse24_ops == 2 and lowering.fallbacks == []
    assert [p.target for p in lowering.placements].count("reference") == 2
    assert [p.target for p in lowering.placements].count("openvino") >= 1
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=1e-4, atol=1e-5)


def test_int8_sparse_linears_keep_their_quantize_partners_on_the_same_target():
    model, x = _mlp(), torch.randn(4, 64)
    calibration = [(torch.randn(4, 64),) for _ in range(4)]
    gm = edgepasses.compress(model, (x,), "sparsify_24(ignore=['4']),quantize,dce", calibration=calibration,
                             target="openvino")
    lowered = edgepasses.lower(gm, (x,), target="openvino,reference")
    assert {p.target for p in lowered.edge_lowering.placements} == {"openvino", "reference"}
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(lowered(x).flatten(), gm(x).flatten(), dim=0)
    assert cosine > 0.999


def test_a_chain_without_a_2_4_kernel_after_openvino_runs_sparse_layers_dense_on_it():
    pytest.importorskip("tvm", reason="TVM is not installed")
    model, x = _mlp(), torch.randn(4, 64)
    gm = edgepasses.compress(model, (x,), "sparsify_24(ignore=['4']),dce")
    lowered = edgepasses.lower(gm, (x,), target="openvino,tvm")
    assert lowered.edge_lowering.target == "openvino" and lowered.edge_lowering.sparse24_ops == 0


@pytest.mark.parametrize("sparsify", ["sparsify_24", "sparsify_24(ignore=['.*key'])"])
def test_int8_2_4_projections_of_a_transformers_bert_take_their_quantization_along(sparsify):
    """q, k and v read one quantized input. The 2:4 ones go to the reference target with their own copy of
    that quantize and their weights' dequantizes; a projection left dense keeps its int8 on OpenVINO. (An
    OpenVINO partition that ended in the sparse layers' dequantizes failed to convert.)"""
    pytest.importorskip("transformers")
    from edgepasses.testing import import_transformers

    transformers = import_transformers()
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=200)
    bert = transformers.BertModel(config).eval()
    mask = torch.ones(1, 16, dtype=torch.long)
    ids, calibration = torch.randint(0, 200, (1, 16)), [(torch.randint(0, 200, (1, 16)), mask) for _ in range(4)]
    gm = edgepasses.compress(bert, (ids, mask), f"{sparsify},quantize,dce", calibration=calibration,
                             target="openvino")
    lowered = edgepasses.lower(gm, (ids, mask), target="openvino,reference")
    placements = lowered.edge_lowering.placements
    assert [p.target for p in placements].count("reference") >= 1 and lowered.edge_lowering.int8_ops > 0
    with torch.no_grad():
        want, got = gm(ids, mask)[0], lowered(ids, mask)[0]
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.999
