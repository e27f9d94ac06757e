"""QAT: prepare_qat's fake-quant graph trains in eager with straight-through gradients, and
convert_qat gives the quantize pass's Q/DQ form, int8 on OpenVINO; bad input gets clear errors."""
import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgepasses
from edgepasses.errors import OptionError
from edgepasses.graph_utils import constant_value
from edgepasses.testing import count_ops

pytest.importorskip("torchao")
from torchao.quantization.pt2e.fake_quantize import FakeQuantize  # noqa: E402

from edgepasses.quant.qat import WeightFakeQuantize  # noqa: E402


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3), nn.Linear(8, 4)
        with torch.no_grad():  # statistics of a trained net, so that fold_bn changes the weights
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv1(x)))).relu()
        return self.fc(y.mean((2, 3)))


X = (torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)),)


def _calibration(n: int = 4, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(X[0].shape, generator=g),) for _ in range(n)]


def _fake_quant_outputs(gm):
    """Each fake-quant module -> (its input, its output) in the last forward, the output kept for its gradient."""
    outputs = {}

    def keep(module, args, output):
        output.retain_grad()
        outputs[module] = (args[0], output)

    for module in gm.modules():
        if isinstance(module, FakeQuantize):
            module.register_forward_hook(keep)
    return outputs


def test_gradients_reach_every_weight_and_convert_quantizes_the_weights_as_trained():
    model = ConvBnNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = edgepasses.prepare_qat(model, X, calibration=_calibration())
    params = dict(gm.named_parameters())
    # fold_bn's folded conv weights were buffers: they are parameters now, and nothing stale is left
    assert len(params) == 6 and all(p.requires_grad for p in params.values())
    assert not [n for n, b in gm.named_buffers() if b.is_floating_point() and "weight" in n]
    fake_quants = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
    assert sum(isinstance(m, WeightFakeQuantize) for m in fake_quants) == 3 and len(fake_quants) == 6

    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(*X).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched

    converted = edgepasses.convert_qat(gm)
    quantize_per_channel = torch.ops.quantized_decomposed.quantize_per_channel.default
    quantized = [n for n in converted.graph.nodes if n.target == quantize_per_channel]
    assert len(quantized) == 3
    for node in quantized:  # each scale is that of the weight after the optimizer step: symmetric, [-q, q]
        weight, scale = (constant_value(converted, a) for a in node.args[:2])
        quant_min, quant_max = node.args[4:6]  # 127, or 63 where the CPU's int8 sums saturate (overflow_fix)
        assert quant_min == -quant_max and quant_max in (63, 127)
        torch.testing.assert_close(scale, weight.abs().amax(dim=tuple(range(1, weight.dim()))) / quant_max)


def test_fake_quant_passes_the_upstream_gradient_inside_its_range_and_zero_outside():
    gm = edgepasses.prepare_qat(ConvBnNet().eval(), X, "quantize(calib=minmax)", calibration=_calibration())
    outputs = _fake_quant_outputs(gm)
    x = (X[0] * 3).requires_grad_()  # beyond the calibrated range in places
    gm(x).square().sum().backward()

    input_fq = next(m for m, (inp, _) in outputs.items() if inp is x)
    scale, zero_point = input_fq.scale.item(), input_fq.zero_point.item()
    low, high = (input_fq.quant_min - zero_point) * scale, (input_fq.quant_max - zero_point) * scale
    upstream = outputs[input_fq][1].grad
    inside, outside = (x > low + scale) & (x < high - scale), (x < low - scale) | (x > high + scale)
    assert inside.any() and outside.any()
    assert torch.equal(x.grad[inside], upstream[inside])
    assert (x.grad[outside] == 0).all()
    # A weight's range is its own: every weight is inside, so it gets its fake-quantized copy's gradient.
    for module, (weight, fake_quantized) in outputs.items():
        if isinstance(module, WeightFakeQuantize):
            assert torch.equal(weight.grad, fake_quantized.grad)


# Without bias correction: QAT leaves out the post-training steps that adjust weights from data.
@pytest.mark.parametrize("pipeline", ["fold_bn,quantize(calib=minmax,bias_correction=off),dce",
                                      "quantize(calib=entropy,ignore=[fc],bias_correction=off)"])
def test_convert_without_training_gives_the_quantize_pass_graph(pipeline):
    model, calibration = ConvBnNet().eval(), _calibration()
    gm = edgepasses.prepare_qat(model, X, pipeline, calibration=calibration, target="reference")
    with torch.no_grad():  # train() and eval() are allowed, and change nothing the graph computes
        in_eval = gm.eval()(*X)
        torch.testing.assert_close(gm.train()(*X), in_eval, rtol=0, atol=0)
    converted = edgepasses.convert_qat(gm)
    expected = edgepasses.compress(model, X, pipeline, calibration=calibration, target="reference")
    with torch.no_grad():
        torch.testing.assert_close(converted(*X), expected(*X), rtol=0, atol=1e-5)
    quant_ops = {op: n for op, n in count_ops(expected).items() if op.startswith("quantized_decomposed")}
    assert {op: count_ops(converted)[op] for op in quant_ops} == quant_ops
    assert not any(p.requires_grad for p in converted.parameters())
    assert not any(m.training for m in converted.modules())
    report = converted.edge_report
    assert report.pipeline == expected.edge_report.pipeline
    assert [r.step for r in report.records] == [r.step for r in expected.edge_report.records]
    quantize_stats = next(r.stats for r in report.records if r.step.startswith("quantize"))
    assert quantize_stats["training"] == "qat" and quantize_stats["calibration_batches"] == 4
    with pytest.raises(OptionError, match="once"):  # convert consumed it
        edgepasses.convert_qat(gm)


@pytest.mark.parametrize("pipeline, calibration, message", [
    ("fold_bn,dce", _calibration(), "exactly one quantize step; 'fold_bn,dce' has no quantize step"),
    ("quantize,quantize", _calibration(), "has 2 quantize steps"),
    ("quantize(weight_only=true)", _calibration(), r"weight_only=true\) is not supported for QAT"),
    ("quantize(min_sqnr=30)", _calibration(), r"min_sqnr=...\) is not supported for QAT"),
    ("quantize", None, "prepare_qat needs calibration data: pass calibration="),
    ("quantize", [], "calibration iterable is empty"),
    ("quantize", [(torch.randn(1, 3, 10, 10),)], r"calibration batch 0, input 0: got \(1, 3, 10, 10\)"),
    ("quantize(bits=4)", _calibration(), "target 'reference' runs bits 8"),
])
def test_bad_qat_input_gets_a_clear_error(pipeline, calibration, message):
    with pytest.raises(OptionError, match=message):
        edgepasses.prepare_qat(ConvBnNet().eval(), X, pipeline, calibration=calibration, target="reference")


def test_nothing_to_quantize_warns_and_trains_in_float(caplog):
    model, x = nn.Sequential(nn.ReLU(), nn.Tanh()).eval(), (torch.randn(2, 3),)
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        gm = edgepasses.prepare_qat(model, x, "quantize", calibration=[x], target="reference")
    assert [r.getMessage() for r in caplog.records if r.name == "edgepasses"][0].startswith("prepare_qat: nothing")
    converted = edgepasses.convert_qat(gm)
    assert converted.edge_report.records[0].modified is False
    torch.testing.assert_close(converted(*x), model(*x))


def test_convert_qat_takes_only_a_prepared_graph():
    gm = edgepasses.compress(ConvBnNet().eval(), X, "fold_bn")
    with pytest.raises(OptionError, match="takes the graph prepare_qat returned"):
        edgepasses.convert_qat(gm)


# ---------------------------------------------------------------- QAT on real data

BATCH = 64


def _digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


@contextlib.contextmanager
def _one_thread():
    # Tensors this small gain nothing from a second thread, and on 2 shared cores its synchronisation
    # made training 20x slower; one thread also gives the same accuracies on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_qat():
    """A briefly trained float CNN, QAT'd for 10 epochs (220 steps) from its int8 ranges, converted."""
    from edgepasses.zoo.digits import accuracy, calibration_batches, load_digits_split, train

    data = load_digits_split()
    top1 = lambda fn: accuracy(fn, data, batch_size=BATCH)  # noqa: E731
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = train(_digits_cnn(), data, epochs=2, lr=1e-2, batch_size=BATCH)
        example = (data.train_x[:BATCH],)
        gm = edgepasses.prepare_qat(model, example, calibration=calibration_batches(8, BATCH))
        top1_before = top1(gm)  # the fake-quant graph as calibrated: post-training int8
        optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3)
        shuffle = torch.Generator().manual_seed(0)
        for _ in range(10):
            for batch in torch.randperm(len(data.train_x), generator=shuffle).split(BATCH)[:-1]:  # static shapes
                optimizer.zero_grad()
                F.cross_entropy(gm(data.train_x[batch]), data.train_y[batch]).backward()
                optimizer.step()
        converted = edgepasses.convert_qat(gm)
        return {"float": top1(model), "ptq_int8": top1_before, "qat_int8": top1(converted),
                "converted": converted, "example": example, "top1": top1}


def test_qat_on_digits_keeps_top1_of_float_and_of_post_training_int8(digits_qat, capsys):
    qat = digits_qat["qat_int8"]
    with capsys.disabled():
        print(f"\ndigits top-1: float {digits_qat['float']:.2f}%, post-training int8 {digits_qat['ptq_int8']:.2f}%, "
              f"QAT int8 {qat:.2f}%")
    assert qat >= digits_qat["float"] - 0.5 and qat >= digits_qat["ptq_int8"] - 0.5


def test_qat_graph_runs_as_int8_on_openvino(digits_qat):
    pytest.importorskip("openvino")
    converted, example = digits_qat["converted"], digits_qat["example"]
    lowered = edgepasses.lower(converted, example, target="openvino", strict=True)
    assert lowered.edge_lowering.int8_ops >= 3  # both convs and the linear ran as int8
    assert digits_qat["top1"](lowered) >= digits_qat["float"] - 0.5
