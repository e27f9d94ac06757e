"""The tvm target's blocked-layout convolutions (`conv_nchwc`): numerics of every schedule it can pick,
the layouts it leaves alone, and the measured tiles kept beside the tuning records."""
import numpy as np
import pytest
import torch
from torch import nn

import edgepasses

pytest.importorskip("tvm", reason="TVM is not installed: pip install apache-tvm")

import tvm  # noqa: E402

from edgepasses.backends.tvm import TVMTarget, conv_nchwc  # noqa: E402
from edgepasses.backends.tvm.build import host_target, prepare  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tuning_from_environment(monkeypatch):
    monkeypatch.delenv("EDGEPASSES_TVM_TRIALS", raising=False)


class ResidualNet(nn.Module):
    """A 3-channel stem (input channels in one block of 3), 3x3 convs on a 7-wide map (tiles that do not divide it), a
    residual add, a stride-2 conv beside a 1x1 downsample, max-pool, global pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv1(y) + y)
        y = torch.relu(self.down(y) + self.skip(y))
        return self.fc(nn.functional.max_pool2d(y, 2).mean((2, 3)))


def _model_and_input():
    torch.manual_seed(0)
    return ResidualNet().eval(), torch.randn(2, 3, 14, 7)


def test_blocked_convolutions_match_eager():
    model, x = _model_and_input()
    gm = edgepasses.compress(model, (x,), "dce")
    lowered = TVMTarget(trials=0).lower(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-5)
    # the stem (its 3 input channels as one block), conv1 (+ residual + relu), down (+ skip + relu), skip
    assert lowered.info["conv_tiles"]["convs"] == 4 and lowered.info["conv_tiles"]["measured"] == 0


def _blocked_conv_functions():
    model, x = _model_and_input()
    target = host_target()
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    mod = prepare(conv_nchwc.to_nchwc(mod, target), target)
    return target, [f for f in mod.functions.values()
                    if isinstance(f, tvm.tirx.PrimFunc) and conv_nchwc.is_blocked_conv(f)]


def _run(func, target, inputs):
    lib = conv_nchwc.compile_func(func, target)
    args = [tvm.runtime.tensor(a) for a in inputs]
    lib.mod["main"](*args)
    return args[-1].numpy()


def test_every_tile_candidate_computes_the_unscheduled_result():
    target, funcs = _blocked_conv_functions()
    assert funcs
    rng = np.random.default_rng(0)
    for func in funcs:
        inputs = [rng.standard_normal([int(d) for d in p.shape]).astype(p.dtype) for p in func.params]
        expected = _run(func, target, inputs)
        tiles = conv_nchwc.tile_candidates(*conv_nchwc._output_hw(func))
        assert len(tiles) > 1
        for tile in tiles:
            got = _run(conv_nchwc.schedule(func, tile).mod["main"], target, inputs)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"tile {tile}")


def test_default_tile_prefers_dividing_columns_within_the_register_budget():
    assert conv_nchwc.default_tile(56, 56) == (1, 4, 0)
    assert conv_nchwc.default_tile(14, 14) == (2, 2, 0)
    assert conv_nchwc.default_tile(7, 7) == (1, 6, 0)  # nothing divides 7: the most pixels, the last tile cut short
    assert conv_nchwc.default_tile(1, 1) == (1, 1, 0)
    for h, w in [(56, 56), (28, 28), (14, 14), (7, 7), (3, 5)]:
        tiles = conv_nchwc.tile_candidates(h, w)
        assert all(r * c <= conv_nchwc.ACCUMULATORS and h % r == 0 for r, c, outer in tiles if not outer)
        assert all(r == h and c <= conv_nchwc.ACCUMULATORS for r, c, outer in tiles if outer)
        assert any(outer for *_, outer in tiles) == (h * w <= conv_nchwc.SMALL_MAP)


def test_measured_tiles_are_kept_and_read_back(tmp_path):
    model, x = _model_and_input()
    gm = edgepasses.compress(model, (x,), "dce")
    # A time limit already spent: MetaSchedule stops after its first batch; the tiles are measured before.
    first = TVMTarget(trials=1, time_limit_s=1e-3).lower(gm, (x,), cache_dir=str(tmp_path))
    assert first.info["conv_tiles"]["measured"] == 4
    assert list(tmp_path.glob("*/conv_tiles.json"))
    second = TVMTarget(trials=1).lower(gm, (x,), cache_dir=str(tmp_path))
    assert second.info["cache_hit"] and second.info["conv_tiles"] == {**second.info["conv_tiles"], "measured": 0}
    with torch.no_grad():
        torch.testing.assert_close(second(x), model(x), rtol=1e-4, atol=1e-5)
