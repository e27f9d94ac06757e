"""The edge backend on OpenVINO: numerics, fallbacks, strict mode, recompiles, bad input."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import edgepasses
from edgepasses.errors import GradientsNeededError, OptionError, UnsupportedOpError
from edgepasses.testing.unconvertible import WithMysteryOp

pytest.importorskip("openvino")


def test_resnet18_in_a_fresh_process_without_importing_edgepasses():
    script = textwrap.dedent("""
        import sys, torch, torchvision
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        x = torch.randn(1, 3, 224, 224)
        compiled = torch.compile(model, backend="edge", options={"target": "openvino", "strict": True})
        with torch.no_grad():
            err = (compiled(x) - model(x)).abs().max().item()
        assert "edgepasses" in sys.modules  # loaded through the entry point, not by us
        print(f"max_abs_err={err:.3g}")
        assert err < 1e-4, err
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_abs_err=" in done.stdout


def test_unconvertible_op_is_partitioned_and_named_in_one_warning(caplog):
    model, x = WithMysteryOp().eval(), torch.randn(1, 3, 12, 12)
    compilations = []
    compiled = torch.compile(model, backend="edge", options={"target": "openvino", "on_compile": compilations.append})
    with caplog.at_level(logging.WARNING, logger="edgepasses"), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    warnings = [r for r in caplog.records if r.name == "edgepasses" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "edgetest.mystery.default" in message and "node mystery" in message
    assert "unconvertible.py\", line" in message and "no conversion rule" in message  # the forward's source line
    lowering = compilations[0].lowering
    assert lowering.partitions == 2 and [f.op for f in lowering.fallbacks] == ["edgetest.mystery.default"]


def test_strict_raises_naming_op_node_and_source_line():
    compiled = torch.compile(WithMysteryOp().eval(), backend="edge", options={"target": "openvino", "strict": True})
    with pytest.raises(UnsupportedOpError, match=r"edgetest.mystery.default \(node mystery, File .*unconvertible.py"):
        compiled(torch.randn(1, 3, 12, 12))


def test_one_compile_for_repeated_calls_with_the_same_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    counter = CompileCounterWithBackend("edge")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 3, 9, 9)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_precision_is_set_and_reported():
    model, x = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).eval(), torch.randn(4, 64)
    for precision, tol in (("f32", 1e-5), ("bf16", 5e-2)):
        torch._dynamo.reset()
        seen = []
        compiled = torch.compile(model, backend="edge", options={"precision": precision, "on_compile": seen.append})
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)
        if precision == "f32":
            assert seen[0].lowering.precision == "f32"
        else:  # what the runtime ran: bf16 on CPUs with bf16 units, else OpenVINO says f32
            assert seen[0].lowering.precision in ("bf16", "f32")


@pytest.mark.parametrize("options, message", [
    ({"pipeline": "fold_bn,nosuchpass"}, "unknown pass 'nosuchpass'.*registered passes: dce, fold_bn"),
    ({"nosuchoption": 1}, "unknown option.*nosuchoption.*valid options: pipeline: str, target: str"),
    ({"target": "tpu"}, "unknown target 'tpu'; valid targets: auto, openvino, reference, tensorrt, tvm"),
    ({"precision": "int3"}, "option 'precision' must be one of 'f32', 'bf16'"),
    ({"strict": "yes"}, "option 'strict' must be bool"),
])
def test_bad_options_raise_value_errors_listing_valid_ones(options, message):
    compiled = torch.compile(nn.Linear(2, 2).eval(), backend="edge", options=options)
    with pytest.raises(ValueError, match=message) as info:
        compiled(torch.randn(1, 2))
    assert isinstance(info.value, OptionError)


def test_training_mode_is_an_error_unless_allowed():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train(), torch.randn(8, 4)
    with pytest.raises(GradientsNeededError, match=r"training mode.*model.eval\(\)"):
        torch.compile(model, backend="edge")(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="edge", options={"allow_training": True})
    torch.testing.assert_close(compiled(x), model(x))


def test_inputs_requiring_grad_under_grad_mode_are_an_error():
    model = nn.Linear(4, 2).eval()
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(GradientsNeededError, match="torch.no_grad"):
        torch.compile(model, backend="edge")(x)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="edge")(x), model(x))


def test_dynamic_batch_compiles_one_openvino_model_for_every_size():
    model, compilations = nn.Linear(4, 2).eval(), []
    compiled = torch.compile(model, backend="edge", dynamic=True,
                             options={"target": "openvino", "on_compile": compilations.append})
    with torch.no_grad():
        for batch in (3, 5, 9):  # Dynamo specializes size 1: batch 1 would compile a graph of its own
            x = torch.randn(batch, 4)
            torch.testing.assert_close(compiled(x), model(x))
    assert len(compilations) == 1 and compilations[0].lowering.target == "openvino"
    assert [(d.input, d.dim) for d in compilations[0].dynamic] == [("args[0]", 0)]


class TwoOutputsWithGraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, scale=2.0):
        y = self.a(x)
        if y.sum().item() > -1e9:  # data-dependent: Dynamo splits the graph here
            y = y * scale
        return self.b(y), y.relu()


def test_graph_breaks_and_tuple_outputs():
    model, x = TwoOutputsWithGraphBreak().eval(), torch.randn(2, 4)
    counter = CompileCounterWithBackend("edge")
    with torch.no_grad():
        got = torch.compile(model, backend=counter)(x, scale=3.0)
        torch.testing.assert_close(got, model(x, scale=3.0))
    assert counter.frame_count >= 2


def test_lower_after_compress_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = edgepasses.compress(model, (x,), "fold_bn,dce")
    lowered = edgepasses.lower(gm, (x,), target="openvino", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-5, atol=1e-5)
    assert lowered.edge_lowering.fallbacks == []
