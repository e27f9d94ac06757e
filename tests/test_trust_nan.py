"""NaN/Inf: calibration data with NaN/Inf is an error naming the batch and input for
every data-aware pass; compiled programs do not propagate NaN/Inf inputs as eager does, and
verify=True refuses such inputs at call time (docs/trust.md says exactly what happens without it)."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.errors import NonFiniteInputError, OptionError

DATA_AWARE = ["sparsify_24", "smooth", "prune(ratio=0.25,criterion=activation)", "lowrank(data_aware=true)",
              "quantize"]
NAN_MESSAGE = (r"^calibration batch 3, input 0 contains {bad}: statistics calibrated on it \(ranges, activation "
               r"norms\) would be NaN or meaningless; clean or drop that batch$")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


def _calibration(bad: float) -> list[tuple]:
    torch.manual_seed(1)
    batches = [(torch.randn(2, 16),) for _ in range(6)]
    batches[3][0][1, 5] = bad
    return batches


@pytest.mark.parametrize("pipeline", DATA_AWARE)
def test_nan_in_calibration_is_an_error_naming_batch_and_input_in_compress(pipeline):
    with pytest.raises(OptionError, match=NAN_MESSAGE.format(bad="NaN")):
        edgepasses.compress(_mlp(), (torch.randn(2, 16),), pipeline=pipeline, calibration=_calibration(float("nan")))


@pytest.mark.parametrize("pipeline", ["sparsify_24", "quantize"])
def test_inf_in_calibration_is_an_error_under_torch_compile_before_any_graph_compiles(pipeline):
    compiled = torch.compile(_mlp(), backend="edge", options={"pipeline": pipeline, "target": "reference",
                                                              "calibration": _calibration(float("-inf"))})
    with pytest.raises(OptionError, match=NAN_MESSAGE.format(bad="Inf")), torch.no_grad():
        compiled(torch.randn(2, 16))


def test_a_keyword_calibration_batch_is_named_by_its_keyword():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, features):
            return self.l(features)

    calibration = [{"features": torch.randn(1, 4)}, {"features": torch.tensor([[1.0, float("nan"), 0.0, 0.0]])}]
    compiled = torch.compile(Keyword().eval(), backend="edge", options={"pipeline": "sparsify_24",
                                                                        "target": "reference",
                                                                        "calibration": calibration})
    with pytest.raises(OptionError, match=r"^calibration batch 1, input 'features' contains NaN"), torch.no_grad():
        compiled(features=torch.randn(1, 4))


def test_nan_example_inputs_without_calibration_only_skip_the_sqnr_stats():
    """Without calibration, sparsify_24 scores SQNR on the example inputs: NaN there is no calibration
    batch to refuse, so the stats are left out."""
    x = torch.randn(2, 16)
    x[0, 0] = float("nan")
    gm = edgepasses.compress(_mlp(), (x,), pipeline="sparsify_24")
    layers = gm.edge_report.records[0].stats["layers"]
    assert layers and all(layer["sqnr_db"] is None for layer in layers.values())


def test_int8_programs_clamp_nan_and_inf_to_finite_values_as_documented():
    """What docs/trust.md says happens without verify: the quantize ops clamp, so a NaN row comes out
    finite where eager gives NaN; NaN and -Inf give the same output, the bottom of the range."""
    model, x = _mlp(), torch.randn(2, 16)
    gm = edgepasses.compress(model, (x,), pipeline="quantize", calibration=_calibration(0.0))
    program = edgepasses.lower(gm, (x,), target="reference")
    nan, minus_inf = x.clone(), x.clone()
    nan[0, 3], minus_inf[0, 3] = float("nan"), float("-inf")
    with torch.no_grad():
        assert torch.isnan(model(nan)[0]).all()
        assert torch.isfinite(program(nan)).all()
        torch.testing.assert_close(program(nan), program(minus_inf))
        torch.testing.assert_close(program(nan)[1], program(x)[1])  # the other row is untouched


@pytest.mark.parametrize("pipeline", ["quantize", "fold_bn"])
def test_verify_refuses_nan_inputs_at_call_time(pipeline):
    options = {"pipeline": pipeline, "target": "reference", "verify": True, "calibration": _calibration(0.0)}
    compiled = torch.compile(_mlp(), backend="edge", options=options)
    x = torch.randn(2, 16)
    with torch.no_grad():
        compiled(x)
        x[1, 2] = float("inf")
        with pytest.raises(NonFiniteInputError, match=r"^verify: input 0 of graph 1 contains Inf, which compiled "
                                                      r"programs need not propagate as eager PyTorch does \(int8 "
                                                      r"clamps it into range; .*\): clean the input, or pass "
                                                      r"verify=False to run it anyway$"):
            compiled(x)


def test_openvino_float_programs_turn_nan_into_numbers_at_relu():
    """Why verify checks float programs too: OpenVINO's ReLU gives max(NaN, 0) = 0."""
    pytest.importorskip("openvino")
    model, x = _mlp(), torch.randn(2, 16)
    program = edgepasses.lower(edgepasses.compress(model, (x,)), (x,), target="openvino")
    x[0, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(model(x)[0]).all() and torch.isfinite(program(x)[0]).all()
