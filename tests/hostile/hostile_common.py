"""What the hostile cases share: tiny models, compiling and running them, checks against eager,
scratch folders, and the test helpers this suite reuses (imported from their test files, not copied)."""
from __future__ import annotations

import atexit
import functools
import importlib.util
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

TESTS = Path(__file__).resolve().parents[1]


# ---- reused test modules ----------------------------------------------------------------------------

def import_test_module(relative: str, name: str):
    """A test module of this repository by its path (the tests are no package), imported once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def artifact_trust():
    """tests/test_artifact_trust.py: the crafted graph.pt2 attacks and the manifest helpers."""
    return import_test_module("test_artifact_trust.py", "hostile_reused_artifact_trust")


def kernel_args():
    """tests/kernels/test_kernel_args.py: the kernels' argument mutations."""
    return import_test_module("kernels/test_kernel_args.py", "hostile_reused_kernel_args")


# ---- scratch ----------------------------------------------------------------------------------------

_ROOT: list[Path] = []


def scratch(name: str = "case") -> Path:
    """A fresh folder, removed when the process exits."""
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="edgepasses-hostile-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT[0]))


# ---- models and data --------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def mlp() -> nn.Module:
    """Linear(8, 16), ReLU, Linear(16, 4): input (2, 8)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def x_mlp(seed: int = 1) -> torch.Tensor:
    return randn(2, 8, seed=seed)


def ln_mlp() -> nn.Module:
    """LayerNorm(16), Linear(16, 32), ReLU, Linear(32, 8): every data-aware pass has work here (smooth
    a LayerNorm->Linear, 2:4 and prune the Linears, lowrank the 32x16); input (2, 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():  # a LayerNorm with outlier channels, as smooth is for
        model[0].weight.mul_(torch.linspace(0.5, 4.0, 16))
    return model


def x_ln(seed: int = 1) -> torch.Tensor:
    return randn(2, 16, seed=seed)


def convnet() -> nn.Module:
    """Conv2d(3, 8), BatchNorm2d, ReLU, Flatten, Linear: input (2, 3, 8, 8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5, generator=gen(3))
        model[1].running_var.uniform_(0.5, 2.0, generator=gen(4))
    return model


def x_conv(seed: int = 1) -> torch.Tensor:
    return randn(2, 3, 8, 8, seed=seed)


def calibration(make_x, n: int = 4, seed: int = 10) -> list[tuple]:
    return [(make_x(seed + i),) for i in range(n)]


# ---- running ------------------------------------------------------------------------------------

def compile_run(model: nn.Module, options, *inputs, calls: int = 1, **compile_kwargs):
    """torch.compile(model, backend='edge', options=options) called `calls` times on `inputs`
    (no grad); returns the last output (or the list of outputs when calls > 1)."""
    compiled = torch.compile(model, backend="edge", options=options, **compile_kwargs)
    with torch.no_grad():
        outs = [compiled(*inputs) for _ in range(calls)]
    return outs[-1] if calls == 1 else outs


def sqnr_db(reference: torch.Tensor, got: torch.Tensor) -> float:
    noise = (reference.double() - got.double()).pow(2).mean().item()
    signal = reference.double().pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def close(expected: torch.Tensor, got, *, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    assert isinstance(got, torch.Tensor), f"got {type(got).__name__}, not a tensor"
    assert got.shape == expected.shape, f"shape {tuple(got.shape)}, eager {tuple(expected.shape)}"
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True)


def eager_of(model: nn.Module, *inputs):
    with torch.no_grad():
        return model(*inputs)


def matches_eager(model_fn, *inputs, atol: float = 1e-4):
    """A check: the result equals eager's output of a fresh `model_fn()` on `inputs`."""
    def check(got):
        close(eager_of(model_fn(), *inputs), got, atol=atol)
    return check


def sqnr_at_least(model_fn, inputs: tuple, floor_db: float):
    """A check for lossy programs: finite, and at least `floor_db` dB of SQNR against eager."""
    def check(got):
        expected = eager_of(model_fn(), *inputs)
        assert got.shape == expected.shape, f"shape {tuple(got.shape)}, eager {tuple(expected.shape)}"
        assert torch.isfinite(got).all(), "non-finite outputs for finite inputs"
        db = sqnr_db(expected, got)
        assert db >= floor_db, f"SQNR {db:.1f} dB < {floor_db} dB"
    return check


def nonfinite_as_eager(model_fn, inputs: tuple, floor_db: float = 15.0, reference=None):
    """A check for NaN/Inf inputs: every output eager makes NaN/Inf is NaN/Inf too (no plausible finite
    values masking it), and the outputs eager keeps finite are finite and close (SQNR floor) to eager's,
    or to `reference()`'s for lossy pipelines (the compressed graph's outputs)."""
    def check(got):
        expected = eager_of(model_fn(), *inputs)
        assert got.shape == expected.shape, f"shape {tuple(got.shape)}, eager {tuple(expected.shape)}"
        bad = ~torch.isfinite(expected)
        assert bad.any(), "the case is broken: eager gave no NaN/Inf"
        masked = bad & torch.isfinite(got)
        assert not masked.any(), (f"{int(masked.sum())} of {int(bad.sum())} outputs eager makes NaN/Inf came out "
                                  f"finite (e.g. {got[masked][0].item():.4g})")
        good = ~bad
        assert torch.isfinite(got[good]).all(), "outputs eager keeps finite came out NaN/Inf"
        if good.any():
            wanted = expected if reference is None else reference()
            db = sqnr_db(wanted[good], got[good])
            assert db >= floor_db, f"finite outputs: SQNR {db:.1f} dB < {floor_db} dB"
    return check


def nonfinite_as_documented(model_fn, inputs: tuple, floor_db: float = 15.0):
    """A check for NaN/Inf inputs where docs/trust.md says the program turns them into numbers (int8
    activations clamp to the calibrated range; OpenVINO's and TVM's ReLU maps NaN to 0): outputs eager
    makes NaN/Inf come out finite, and the others finite and close (SQNR floor) to eager's."""
    def check(got):
        expected = eager_of(model_fn(), *inputs)
        bad = ~torch.isfinite(expected)
        assert bad.any(), "the case is broken: eager gave no NaN/Inf"
        assert torch.isfinite(got).all(), "the documented behaviour is finite outputs; got NaN/Inf"
        db = sqnr_db(expected[~bad], got[~bad])
        assert db >= floor_db, f"finite outputs: SQNR {db:.1f} dB < {floor_db} dB"
    return check


@functools.cache
def has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True
