"""smooth (SmoothQuant): exact in float, folds into LayerNorm when it can, beats plain int8 on outliers."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.errors import OptionError
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.testing import count_ops, run_pass_case

pytest.importorskip("torchao")


class NormThenLinears(nn.Module):
    """A LayerNorm read only by Linears: the 1/s folds into its weight and bias."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.a, self.b = nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(16, 4)
        with torch.no_grad():
            self.norm.weight[:2] = 20.0

    def forward(self, x):
        h = self.norm(x)
        return self.a(h), self.b(h)


def test_smooth_is_exact_in_float_and_folds_into_a_layer_norm_read_only_by_linears():
    x = (torch.randn(4, 16),)
    case = run_pass_case("smooth(alpha=0.5)", NormThenLinears().eval(), x, calibration=[x, (torch.randn(4, 16),)])
    stats = case.report.records[0].stats
    assert stats == {"groups": 1, "linears": 2, "folded_into_layer_norm": 1, "multiplies_inserted": 0}
    assert "aten.mul" not in count_ops(case.gm)


def test_smooth_inserts_a_multiply_where_the_activation_has_other_readers(tiny_bert):
    model, example, calibration, _ = tiny_bert
    case = run_pass_case("smooth", model, example, calibration=calibration, rtol=1e-4, atol=1e-4)
    stats = case.report.records[0].stats
    # Post-LN BERT: every LayerNorm output also feeds a residual add, so nothing folds.
    layers = model.config.layers
    assert stats["linears"] == 6 * layers and stats["multiplies_inserted"] == stats["groups"] == 4 * layers


def test_smooth_then_int8_beats_plain_int8_on_activation_outliers(tiny_bert):
    model, example, calibration, evaluation = tiny_bert
    # Embedding tables stay float here: their int8 error would mask the activations' difference.
    # smooth_alpha=0: quantize's own smoothing (on by default for transformers) off.
    plain = edgepasses.compress(model, example, "quantize(calib=minmax,embeddings=false,smooth_alpha=0)",
                                calibration=calibration)
    smoothed = edgepasses.compress(model, example, "smooth(alpha=0.5),quantize(calib=minmax,embeddings=false,"
                                   "smooth_alpha=0)", calibration=calibration)
    assert output_sqnr(model, smoothed, evaluation) > output_sqnr(model, plain, evaluation) + 1.0


@pytest.mark.parametrize("pipeline, calibration, message", [
    ("smooth(alpha=1.5)", [], r"'alpha' must be in \[0, 1\]"),
    ("smooth", None, "smooth needs calibration data"),
    ("smooth(ignore=[nosuch])", [], "'nosuch' matched no Linear"),
])
def test_bad_smooth_input_gets_a_clear_error(pipeline, calibration, message):
    x = (torch.randn(4, 16),)
    with pytest.raises(OptionError, match=message):
        edgepasses.compress(NormThenLinears().eval(), x, pipeline, calibration=calibration)
