"""calib=auto: each activation's range chosen among min/max, two percentiles and the MSE range by
the squared output error of the linears/convs that read it (`quant.range_choice`)."""
import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from edgepasses.passes.quantize import QuantizeOptions, resolve_setup
from edgepasses.quant import QuantCaps
from edgepasses.quant.calibration import calibrate
from edgepasses.quant.observers import AutoRangeObserver, observer_for
from edgepasses.quant.quantizer import EdgeQuantizer, quantize_graph
from edgepasses.quant.range_choice import choose_activation_ranges
from edgepasses.quant.sensitivity import output_sqnr

METHODS = ("minmax", "percentile", "percentile-99.999", "mse")
U8 = {"dtype": torch.uint8, "quant_min": 0, "quant_max": 255, "qscheme": torch.per_tensor_affine}


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantize(model, batches, **options):
    gm = torch.export.export(model, batches[0]).module()
    options = {"calib": "auto", "bias_correction": "off", **options}
    setup = resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference", gm)
    return quantize_graph(gm, setup, batches, batches[0])


def _prepared(model, batches, **options):
    gm = torch.export.export(model, batches[0]).module()
    options = {"calib": "auto", "bias_correction": "off", **options}
    setup = resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference", gm)
    prepared = prepare_pt2e(gm, EdgeQuantizer(setup))
    calibrate(prepared, batches, batches[0], needed_by="test")
    return prepared


def _input_range(gm) -> tuple[float, float]:
    """The real range of the first quantize_per_tensor (scale, zero_point, quant_min, quant_max, dtype)."""
    q = next(n for n in gm.graph.nodes if "quantize_per_tensor" in str(n.target))
    scale, zero_point, qmin, qmax = q.args[1:5]
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


# ---------------------------------------------------------------------------------------------
# The choice follows what the reading layer's weights make of the clipping error


def _rare_spike_batches() -> list[tuple]:
    """4 batches of 1024x16 standard normal values, one spike of 20..100 in channel 0 per batch:
    under 0.01% of the values, so the 99.99th percentile falls in the bulk (~4) and clips them."""
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1024, 16, generator=g)
        x[torch.randint(0, 1024, (1,), generator=g), 0] = 20 + 80 * torch.rand(1, generator=g)
        batches.append((x,))
    return batches


def _linear_reading_channel_0_with(weight: float) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[:, 0] = weight
    return linear.eval()


@pytest.mark.parametrize("symmetric", [False, True], ids=["uint8", "int8"])
def test_outlier_read_with_a_large_weight_keeps_its_range(symmetric):
    batches = _rare_spike_batches()
    spike = max(b[0][:, 0].max().item() for b in batches)
    model = _linear_reading_channel_0_with(1.0)   # clipping a spike costs (spike - clip)**2 per output
    result = _quantize(model, batches, symmetric=symmetric)
    (chosen,) = result.steps["ranges"]
    assert chosen in ("minmax", "percentile-99.999") and result.steps["ranges"][chosen] == 1
    assert _input_range(result.graph)[1] >= 0.99 * spike
    # ...and it is the better choice: the 99.99th percentile clips the spikes away
    clipped = _quantize(_linear_reading_channel_0_with(1.0), batches, symmetric=symmetric, calib="percentile")
    assert _input_range(clipped.graph)[1] < 6.0
    assert output_sqnr(model, result.graph, batches) > output_sqnr(model, clipped.graph, batches) + 10


@pytest.mark.parametrize("symmetric", [False, True], ids=["uint8", "int8"])
def test_outlier_read_with_zero_weights_is_clipped(symmetric):
    # The same activations; the layer ignores channel 0, so its spikes cost nothing to clip and
    # the range is spent on the bulk.
    batches = _rare_spike_batches()
    model = _linear_reading_channel_0_with(0.0)
    result = _quantize(model, batches, symmetric=symmetric)
    (chosen,) = result.steps["ranges"]
    assert chosen in ("percentile", "mse")
    assert _input_range(result.graph)[1] < 6.0
    kept = _quantize(_linear_reading_channel_0_with(0.0), batches, symmetric=symmetric, calib="minmax")
    assert output_sqnr(model, result.graph, batches) > output_sqnr(model, kept.graph, batches) + 10


def test_each_observer_scores_its_candidates_on_its_own_readers():
    # Layer 1 needs its input's spikes (it carries them into hidden unit 1, which layer 2 reads);
    # layer 2 ignores hidden unit 0, where the spikes also land at 100x: its input is best clipped.
    # No single method suits both tensors; auto picks per tensor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
        model[0].weight[0, 0], model[0].weight[1, 0] = 1.0, 0.05
        model[2].weight[:, 0], model[2].weight[:, 1] = 0.0, 1.0
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1024, 16, generator=g)
        x[torch.randint(0, 1024, (1,), generator=g), 0] = 100.0
        batches.append((x,))
    prepared = _prepared(model, batches)
    choices = choose_activation_ranges(prepared)
    observers = [getattr(prepared, n.target) for n in prepared.graph.nodes
                 if n.op == "call_module" and isinstance(getattr(prepared, n.target), AutoRangeObserver)]
    assert len(observers) == 2 and sum(choices.values()) == 2
    first, second = (o.chosen for o in observers)
    assert first in ("minmax", "percentile-99.999", "mse") and second == "percentile"
    assert observers[0].calculate_qparams()[0] > 10 * observers[1].calculate_qparams()[0]

    sqnr = {calib: output_sqnr(model, _quantize(model, batches, calib=calib).graph, batches)
            for calib in ("auto", "minmax", "percentile", "mse")}
    assert sqnr["auto"] > max(sqnr["minmax"], sqnr["percentile"], sqnr["mse"]) + 1.0, sqnr


# ---------------------------------------------------------------------------------------------
# End to end: auto against each single method on models with outliers


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _mlp_batches():
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(256, 32, generator=g)
        x[torch.randint(0, 256, (2,), generator=g), torch.randint(0, 32, (2,), generator=g)] = 30.0  # rare spikes
        x[:, 3] *= 8  # an outlier channel
        batches.append((x,))
    return batches


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()


def _cnn_batches():
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 3, 16, 16, generator=g)
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=g)] = 25.0
        batches.append((x,))
    return batches


def _sqnr_by_calib(model_fn, batches) -> dict[str, float]:
    result = {}
    for calib in ("auto", "minmax", "percentile", "mse"):
        model = model_fn()
        result[calib] = output_sqnr(model, _quantize(model, batches, calib=calib).graph, batches)
    return result


def test_auto_is_as_good_as_the_best_single_method_on_an_mlp_with_outliers():
    sqnr = _sqnr_by_calib(_mlp, _mlp_batches())
    assert sqnr["auto"] >= max(sqnr["minmax"], sqnr["percentile"], sqnr["mse"]) - 0.1, sqnr


def test_auto_on_a_cnn_with_outliers_is_near_the_best_single_method():
    # Each tensor is scored by the error of the conv reading it, before its ReLU: a proxy, not the
    # network's output error. Here the 4 choices land 0.15 dB under calib=minmax (31.00 against
    # 31.15; minmax itself is 0.65 dB under the best mix of candidates, 31.80), so the bound is looser
    # than the MLP's; what must hold is that auto never does worse than the worst fixed method by
    # picking per tensor, and stays close to the best.
    sqnr = _sqnr_by_calib(_cnn, _cnn_batches())
    others = [sqnr["minmax"], sqnr["percentile"], sqnr["mse"]]
    assert sqnr["auto"] > min(others) and sqnr["auto"] >= max(others) - 0.5, sqnr


# ---------------------------------------------------------------------------------------------
# Observers shared by tensors of different shapes


def test_quantizer_shared_by_a_pool_input_and_output_keeps_the_mse_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8, generator=g),) for _ in range(3)]
    prepared = _prepared(model, batches)
    pool = next(n for n in prepared.graph.nodes if n.target is torch.ops.aten.max_pool2d.default)
    before, after = pool.args[0], next(iter(pool.users))
    shared = getattr(prepared, before.target)
    assert getattr(prepared, after.target) is shared  # one observer on both sides of the pool
    assert isinstance(shared, AutoRangeObserver) and shared.mixed_shapes and shared.sample is None

    assert sum(choose_activation_ranges(prepared).values()) == 1   # the network input only
    assert shared.chosen is None
    scale, zero_point = shared.calculate_qparams()
    low, high = shared.candidate_ranges()["mse"]
    expected_scale, expected_zero_point = shared._calculate_qparams(torch.tensor(low), torch.tensor(high))
    assert (scale.item(), zero_point.item()) == (expected_scale.item(), expected_zero_point.item())

    converted = convert_pt2e(prepared, fold_quantize=False)
    quantizers = [n.args[1:3] for n in converted.graph.nodes
                  if str(n.target) == "quantized_decomposed.quantize_per_tensor.default"]
    assert (scale.item(), zero_point.item()) in {(float(s), int(z)) for s, z in quantizers}
    with torch.no_grad():
        torch.testing.assert_close(converted(*batches[0]), model(*batches[0]), rtol=0.1, atol=0.1)
    # the quantize_graph path reports the same
    assert sum(_quantize(model, batches).steps["ranges"].values()) == 1


# ---------------------------------------------------------------------------------------------
# AutoRangeObserver on its own


def test_sample_is_bounded_by_sample_elements_in_whole_leading_entries():
    observer = observer_for("auto", **U8)()
    limit = AutoRangeObserver.SAMPLE_ELEMENTS
    entry = 3000                                     # does not divide the limit
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(100, entry, generator=g) for _ in range(5)]
    batches[-1][-1, -1] = 50.0                       # seen past the sample: still in the range
    for batch in batches:
        assert observer(batch) is batch
    assert observer.sample.shape == (limit // entry, entry) and observer.sample.numel() <= limit
    torch.testing.assert_close(observer.sample, torch.cat(batches)[:limit // entry], rtol=0, atol=0)
    assert observer.candidate_ranges()["minmax"][1] == 50.0
    assert observer.sample.dtype == torch.float32


def test_an_entry_larger_than_the_budget_keeps_no_sample_and_the_range_stays_mse():
    observer = observer_for("auto", **U8)()
    observer(torch.randn(1, AutoRangeObserver.SAMPLE_ELEMENTS + 1))
    assert observer.sample is None
    prepared_like = observer.calculate_qparams()
    low, high = observer.candidate_ranges()["mse"]
    torch.testing.assert_close(prepared_like, observer._calculate_qparams(torch.tensor(low), torch.tensor(high)))


def test_candidates_and_choose():
    observer = observer_for("auto", **U8)()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[0, 0], x[1, 1] = 40.0, -30.0
    observer(x)
    ranges = observer.candidate_ranges()
    assert set(ranges) == set(METHODS)
    assert ranges["minmax"] == (-30.0, 40.0)
    for method, (low, high) in ranges.items():
        assert -30.0 <= low <= high <= 40.0, method
        observer.choose(method)
        expected = observer._calculate_qparams(torch.tensor(low), torch.tensor(high))
        torch.testing.assert_close(observer.calculate_qparams(), expected, msg=method)
    assert ranges["percentile"][1] < 5.0          # the two outliers are 0.012% of the values
    # fake_quantize is what convert_pt2e will compute with that range
    scale, zero_point = observer._calculate_qparams(torch.tensor(-30.0), torch.tensor(40.0))
    torch.testing.assert_close(observer.fake_quantize(x, (-30.0, 40.0)),
                               torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero_point), 0, 255))


def test_constant_or_unobserved_input_has_no_candidates_and_is_skipped():
    observer = observer_for("auto", **U8)()
    assert observer.candidate_ranges() == {}
    observer(torch.full((4, 4), 2.0))
    assert observer.candidate_ranges() == {}
    observer.calculate_qparams()  # min/max of a constant: no crash
