"""The tvm target: numerics vs eager, fallbacks and strict mode, tuning records reused from the cache."""
import logging
import threading

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.errors import UnsupportedOpError

pytest.importorskip("tvm", reason="TVM is not installed: pip install apache-tvm")

from edgepasses.backends.tvm import TVMTarget, unsupported_ops  # noqa: E402
from edgepasses.backends.tvm.build import tuning_unavailable_reason  # noqa: E402
from edgepasses.quant import cpu_flags, cpu_int8_saturates  # noqa: E402
from edgepasses.testing.unconvertible import WithMysteryOp  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tuning_from_environment(monkeypatch):
    monkeypatch.delenv("EDGEPASSES_TVM_TRIALS", raising=False)


class SmallCNN(nn.Module):
    """conv, relu, a residual add, max-pool, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y)
        y = nn.functional.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def _graph(model, x, pipeline="dce"):
    return edgepasses.compress(model.eval(), (x,), pipeline)


def test_small_cnn_matches_eager():
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 16, 16)
    lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lowered(x + 1), model(x + 1), rtol=1e-4, atol=1e-5)  # buffers reused safely
    lowering = lowered.edge_lowering
    assert (lowering.target, lowering.precision, lowering.partitions, lowering.fallbacks) == ("tvm", "f32", 1, [])
    assert lowering.weights_mb == pytest.approx(sum(p.numel() for p in model.parameters()) * 4 / 1e6)


def test_parallel_loops_run_on_torchs_thread_count(monkeypatch):
    """TVM's own default is half the logical CPUs on x86: one thread on a 2-core machine."""
    import tvm_ffi

    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    model, x = SmallCNN().eval(), torch.randn(1, 3, 16, 16)
    edgepasses.lower(_graph(model, x), (x,), target="tvm")
    pool_size = tvm_ffi.get_global_func("runtime.NumThreads")
    in_another_thread = []
    worker = threading.Thread(target=lambda: in_another_thread.append(pool_size()))
    worker.start()
    worker.join()
    assert pool_size() == torch.get_num_threads()
    assert in_another_thread == [torch.get_num_threads()]


def test_mlp_with_two_outputs_matches_eager():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(12, 16), nn.Linear(16, 3), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)

    torch.manual_seed(0)
    model, x = TwoHeads().eval(), torch.randn(4, 12)
    lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)


def test_unconvertible_op_runs_in_pytorch_with_one_warning(caplog):
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(_graph(model, x), (x,), target="tvm")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
    warnings = [r for r in caplog.records if r.name == "edgepasses" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "edgetest.mystery.default" in message and "node mystery" in message and "has no converter" in message
    lowering = lowered.edge_lowering
    assert lowering.partitions == 2 and [f.op for f in lowering.fallbacks] == ["edgetest.mystery.default"]


def test_strict_raises_naming_the_op():
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    with pytest.raises(UnsupportedOpError, match=r"edgetest.mystery.default \(node mystery"):
        edgepasses.lower(_graph(model, x), (x,), target="tvm", strict=True)


def test_importer_message_is_parsed():
    assert unsupported_ops("Unsupported function types ['mystery.default', 'foo.Tensor']") == {
        "mystery.default", "foo.Tensor"}
    assert unsupported_ops("something else") is None


@pytest.mark.skipif(tuning_unavailable_reason() is not None, reason=str(tuning_unavailable_reason()))
def test_second_compile_reuses_tuning_records(tmp_path, caplog):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 8), nn.ReLU()).eval(), torch.randn(1, 16)
    gm = _graph(model, x)
    # A time limit already spent: tuning ends after the first measured batch, and its records count.
    first = TVMTarget(trials=2, time_limit_s=1e-3).lower(gm, (x,), cache_dir=str(tmp_path))
    assert first.info["tuned"] and not first.info["cache_hit"] and first.info["stopped_at_time_limit"]
    assert list(tmp_path.glob("*/database_tuning_record.json"))
    with caplog.at_level(logging.INFO, logger="edgepasses"):
        second = TVMTarget(trials=2).lower(gm, (x,), cache_dir=str(tmp_path))
    assert second.info["cache_hit"] and second.info["records"] == first.info["records"]
    assert any("reusing tuning records" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), rtol=1e-4, atol=1e-5)


# ---- int8: Q/DQ conv/linear on our kernels, activation matmuls in integer Relax, Q/DQ elementwise --------

qd = torch.ops.quantized_decomposed


class QuantCNN(nn.Module):
    """conv (padding, so zero points meet the border), depthwise conv, conv, residual add, max-pool, linear.
    At width 16 the two dense convs run TVM's int8 code (`int8_conv`), at 8 our C++ kernel."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(torch.relu(self.dw(y))) + y)
        return self.fc(nn.functional.max_pool2d(y, 2).mean((2, 3)))


class QuantMLP(nn.Module):
    """Linear with bias → relu → Linear without bias, on [batch, tokens, features] (rows flattened)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(12, 16), nn.Linear(16, 6, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class QuantAttention(nn.Module):
    """Scores of two projected activations: an activation × activation matmul."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)


def _int8_graph(model, x, options=""):
    torch.manual_seed(1)
    calibration = [(torch.randn_like(x),) for _ in range(4)]
    return edgepasses.compress(model.eval(), (x,), f"fold_bn,quantize{options}", calibration=calibration, target="tvm")


def _output_step(gm) -> float:
    """One quantisation step of the output: the last linear's input scale times its largest weight."""
    from edgepasses.graph_utils import constant_value

    layer = gm.graph.output_node().args[0][0]
    assert layer.target == torch.ops.aten.linear.default
    x_scale, w_dq = layer.args[0].args[1], layer.args[1]
    w_qmax = w_dq.args[0].args[5]  # the weight quantize's quant_max
    return float(x_scale * constant_value(gm, w_dq.args[1]).max() * w_qmax)


def _assert_within_one_step(got, want, step):
    """Equal to float rounding, except where a value sat on a rounding boundary and its code moved by one."""
    diff = (got - want).abs()
    close = diff <= 1e-5 + 1e-4 * want.abs()
    assert close.float().mean() >= 0.99, f"{(~close).sum()} of {diff.numel()} values differ"
    assert diff.max() <= step * 1.01 + 1e-5, f"max diff {diff.max():.3g} > one step {step:.3g}"


@pytest.mark.parametrize("options, act_dtype, width, convs_in_tvm", [
    ("", torch.uint8, 8, 0), ("(symmetric=true,overflow_fix=off)", torch.int8, 8, 0), ("", torch.uint8, 16, 2)])
def test_int8_cnn_matches_fake_quant_graph(options, act_dtype, width, convs_in_tvm):
    torch.manual_seed(0)
    model, x = QuantCNN(width), torch.randn(2, 3, 16, 16)
    gm = _int8_graph(model, x, options)
    dtypes = {n.args[5] for n in gm.graph.nodes if n.target == qd.quantize_per_tensor.default}
    assert dtypes == {act_dtype}
    assert any(n.target == qd.dequantize_per_channel.default for n in gm.graph.nodes)  # per-channel weights
    lowered = edgepasses.lower(gm, (x,), target="tvm", strict=True)  # strict: no Q/DQ conv/linear left behind
    lowering = lowered.edge_lowering
    assert (lowering.partitions, lowering.fallbacks, lowering.int8_ops) == (1, [], 4)
    # TVM's int8 code takes the 7-bit weights of AVX2 CPUs without VNNI; elsewhere our C++ kernel runs them.
    assert lowered.info["int8_conv_kernels"] == (convs_in_tvm if cpu_int8_saturates() and "avx2" in cpu_flags() else 0)
    with torch.no_grad():
        for sample in (x, 2 * torch.randn_like(x)):
            _assert_within_one_step(lowered(sample), gm(sample), _output_step(gm))


def test_int8_linears_with_and_without_bias_match_fake_quant_graph():
    torch.manual_seed(0)
    model, x = QuantMLP(), torch.randn(2, 5, 12)
    gm = _int8_graph(model, x)
    lowered = edgepasses.lower(gm, (x,), target="tvm", strict=True)
    assert (lowered.edge_lowering.fallbacks, lowered.edge_lowering.int8_ops) == ([], 2)
    with torch.no_grad():
        _assert_within_one_step(lowered(x), gm(x), _output_step(gm))


def test_int8_activation_matmul_runs_in_integers():
    torch.manual_seed(0)
    model, x = QuantAttention(), torch.randn(2, 6, 8)
    gm = _int8_graph(model, x)
    assert any(n.target == torch.ops.aten.matmul.default for n in gm.graph.nodes)
    lowered = edgepasses.lower(gm, (x,), target="tvm", strict=True)
    assert (lowered.edge_lowering.fallbacks, lowered.edge_lowering.int8_ops) == ([], 3)  # 2 linear + matmul
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=1e-4, atol=1e-5)  # a softmax of scores: no step bound


def test_quantize_rounds_half_to_even_like_torch():
    class QDQ(nn.Module):
        def forward(self, x):
            q = qd.quantize_per_tensor(x, 0.25, 3, 0, 255, torch.uint8)
            return qd.dequantize_per_tensor(q, 0.25, 3, 0, 255, torch.uint8) + 0.0

    # x / 0.25 = ±0.5, ±1.5, ±2.5, ...: exactly halfway, where half-away-from-zero rounding would differ.
    x = torch.tensor([[0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 63.0, -2.0]])
    gm = edgepasses.compress(QDQ().eval(), (x,), "dce")
    lowered = edgepasses.lower(gm, (x,), target="tvm", strict=True)
    with torch.no_grad():
        assert torch.equal(lowered(x), QDQ()(x))


def test_quantized_layer_without_integer_form_warns_and_strict_raises(caplog):
    torch.manual_seed(0)
    model, x = QuantMLP(), torch.randn(2, 5, 12)
    gm = _int8_graph(model, x, "(per_channel=false)")  # per-tensor weights: no kernel form
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="tvm")
    assert lowered.edge_lowering.int8_ops == 0 and lowered.edge_lowering.fallbacks == []
    assert any("float fake-quant" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedOpError, match="no integer converter"):
        edgepasses.lower(gm, (x,), target="tvm", strict=True)
