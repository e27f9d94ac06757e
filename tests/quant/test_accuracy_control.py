"""Accuracy control with the user's metric: the fewest layers float for the metric to stay within max_drop."""
import itertools

import pytest
import torch

import edgepasses
from edgepasses.errors import OptionError

PIPELINE = "quantize(bias_correction=off)"


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 8)).eval()


def _batches(seed: int, count: int):
    g = torch.Generator().manual_seed(seed)
    # One input channel 30x the rest: per-tensor int8 loses the small ones in the first layer.
    return [(torch.randn(32, 16, generator=g) * torch.cat([torch.full((1,), 30.0), torch.ones(15)]),)
            for _ in range(count)]


def _cosine_metric(model, batches):
    """Mean cosine of a candidate's outputs to the float model's: 1.0 for the float model itself."""
    with torch.no_grad():
        expected = [model(*b) for b in batches]

    def metric(candidate) -> float:
        with torch.no_grad():
            return torch.stack([torch.nn.functional.cosine_similarity(candidate(*b), e, dim=-1).mean()
                                for b, e in zip(batches, expected)]).mean().item()

    return metric


def test_a_loose_budget_keeps_every_layer_int8_and_a_tight_one_keeps_the_fewest_float():
    model, calibration = _mlp(), _batches(0, 4)
    metric = _cosine_metric(model, _batches(1, 4))
    x = calibration[0]
    loose = edgepasses.compress(model, x, PIPELINE, calibration=calibration, metric=metric, max_drop=0.5)
    stats = loose.edge_report.records[-1].stats
    assert stats["float_layers"] == [] and stats["metric"] == stats["metric_all_int8"]

    all_int8 = stats["metric_all_int8"]
    max_drop = (1.0 - all_int8) / 4  # a quarter of what full int8 loses
    tight = edgepasses.compress(model, x, PIPELINE, calibration=calibration, metric=metric, max_drop=max_drop)
    stats = tight.edge_report.records[-1].stats
    assert stats["metric_float"] == pytest.approx(1.0)
    assert 1 <= len(stats["float_layers"]) < 3
    assert stats["metric"] >= 1.0 - max_drop and metric(tight) == pytest.approx(stats["metric"])
    # Held out: the layers kept float help on data the metric did not see either.
    held_out = _cosine_metric(model, _batches(2, 4))
    assert held_out(tight) > held_out(loose)


def test_under_torch_compile_the_metric_scores_the_whole_compiled_model():
    model, calibration = _mlp(), _batches(0, 4)
    metric = _cosine_metric(model, _batches(1, 4))
    all_int8 = metric(edgepasses.compress(model, calibration[0], PIPELINE, calibration=calibration))
    max_drop = (1.0 - all_int8) / 4
    compilations = []
    compiled = torch.compile(model, backend="edge", dynamic=False, options={
        "pipeline": PIPELINE, "target": "reference", "calibration": calibration, "metric": metric,
        "max_drop": max_drop, "on_compile": compilations.append})
    assert metric(compiled) >= 1.0 - max_drop - 1e-3  # the reference target's int8 kernels, not fake-quant
    stats = compilations[0].report.records[-1].stats
    assert stats["float_layers"] and stats["metric"] >= 1.0 - max_drop


@pytest.mark.parametrize("metric, max_drop, message", [
    (lambda model: "good", 0.01, "metric must return a number.*returned str"),
    (lambda model: 1 / 0, 0.01, "metric raised ZeroDivisionError"),
    (lambda model: float("nan"), 0.01, "metric returned nan"),
    ("accuracy", 0.01, "metric must be a function"),
    (lambda model: 1.0, -0.1, r"max_drop must be a number in \[0, 1\)"),
    (lambda model: 1.0, 1.0, r"max_drop must be a number in \[0, 1\)"),
])
def test_bad_metric_or_max_drop_gets_a_clear_error(metric, max_drop, message):
    model, calibration = _mlp(), _batches(0, 2)
    with pytest.raises(OptionError, match=message):
        edgepasses.compress(model, calibration[0], PIPELINE, calibration=calibration, metric=metric,
                            max_drop=max_drop)


def test_a_metric_the_float_model_itself_cannot_reach_is_an_error():
    model, calibration = _mlp(), _batches(0, 2)
    falling = itertools.count()  # each call scores lower: not even float passes twice

    def metric(candidate) -> float:
        return 1.0 - 0.1 * next(falling)

    with pytest.raises(OptionError, match="the float model itself does not reach"):
        edgepasses.compress(model, calibration[0], PIPELINE, calibration=calibration, metric=metric, max_drop=0.01)


def test_metric_and_min_sqnr_together_are_an_error():
    model, calibration = _mlp(), _batches(0, 2)
    with pytest.raises(OptionError, match="min_sqnr and a metric"):
        edgepasses.compress(model, calibration[0], "quantize(min_sqnr=30)", calibration=calibration,
                            metric=lambda m: 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_calibration_with_nan_or_inf_names_the_batch(bad):
    model, calibration = _mlp(), _batches(0, 3)
    calibration[2][0][5, 3] = bad
    with pytest.raises(OptionError, match=r"calibration batch 2, input 0 contains (NaN|Inf)"):
        edgepasses.compress(model, calibration[0], "quantize", calibration=calibration)
