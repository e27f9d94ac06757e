"""The tvm target on graphs with dynamic dims: one static program per input shape, built on its first
call, with one warning at lowering time (backends/tvm/per_shape.py)."""
import logging

import pytest
import torch
from torch import nn
from torch.export import Dim

pytest.importorskip("tvm", reason="TVM is not installed: pip install apache-tvm")

import edgepasses  # noqa: E402
from edgepasses.backends.tvm import TVMProgram  # noqa: E402
from edgepasses.backends.tvm.per_shape import PerShapeProgram  # noqa: E402
from edgepasses.canonical import export_canonical_graph  # noqa: E402
from edgepasses.errors import InputMismatchError  # noqa: E402

WARNING = "target 'tvm' compiles one program per input shape"


@pytest.fixture(autouse=True)
def _no_tuning_from_environment(monkeypatch):
    monkeypatch.delenv("EDGEPASSES_TVM_TRIALS", raising=False)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_torch_compile_dynamic_runs_each_shape_with_one_warning(caplog):
    model = _cnn()
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(model, backend="edge", dynamic=True,
                             options={"target": "tvm", "pipeline": "dce", "on_compile": seen.append})
    shapes = [(2, 3, 12, 10), (3, 3, 12, 10), (5, 3, 16, 14)]  # batch, height and width vary (H != W: Dynamo
    # gives dims of equal sizes one symbol)
    with caplog.at_level(logging.WARNING, logger="edgepasses"), torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        compiled(torch.randn(shapes[0]))  # a shape seen before reuses its program
    assert len(seen) == 1 and len(seen[0].dynamic) == 3, f"one compile serves every shape: {seen}"
    assert len(_warnings(caplog)) == 1 and "each new input shape costs a TVM build" in _warnings(caplog)[0]
    assert seen[0].lowering.target == "tvm"


def test_lower_builds_a_program_per_shape_and_refuses_what_is_out_of_range(caplog):
    model = _cnn()
    x = torch.randn(2, 3, 8, 8)
    gm = export_canonical_graph(model, (x,), ({0: Dim.DYNAMIC(min=1, max=8)},))
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        lowered = edgepasses.lower(gm, (x,), target="tvm")
    assert isinstance(lowered, PerShapeProgram) and "input[0] in 1..8" in _warnings(caplog)[0].replace("_1", "")
    assert list(lowered.programs) == [(((2, 3, 8, 8), torch.float32),)], "the example's program is built at lowering"
    with torch.no_grad():
        for batch in (4, 1):
            y = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(lowered(y), model(y), rtol=1e-4, atol=1e-5)
        assert len(lowered.programs) == 3 and all(isinstance(p, TVMProgram) for p in lowered.programs.values())
        with pytest.raises(InputMismatchError, match="outside the range 1..8"):
            lowered(torch.randn(9, 3, 8, 8))
        with pytest.raises(InputMismatchError, match="dtype float32; got float64"):
            lowered(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert lowered.edge_lowering.target == "tvm" and lowered.edge_lowering.partitions == 1


def test_a_compile_cache_hit_lowers_the_stored_dynamic_graph_per_shape_again(tmp_path):
    """A per-shape program is no one library to store: the entry holds the compressed graph, dynamic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    options = {"cache_dir": str(tmp_path), "target": "tvm", "pipeline": "dce"}
    for expected in ("miss", "hit"):
        torch._dynamo.reset()
        seen = []
        compiled = torch.compile(model, backend="edge", dynamic=True, options={**options, "on_compile": seen.append})
        with torch.no_grad():
            for batch in (2, 5):
                x = torch.randn(batch, 16)
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert [c.cache for c in seen] == [expected] and seen[0].lowering.target == "tvm"
