"""The pass-test harness: the way to unit-test a pass, ours or a user's.

    from edgepasses.testing import run_pass_case
    case = run_pass_case("fold_bn", model, (x,), check_not=["batch_norm"], op_counts={"aten.conv2d": 2})

Structure is checked on `gm.code` with `torch.testing.FileCheck` and by counting ops;
numerics with `assert_close` (exact passes) or an SQNR floor in dB (lossy passes).
Models to feed it come from `edgepasses.testing.strategies` (hypothesis; needs the
`testing` extra).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.testing import FileCheck

from ..analysis.sqnr import sqnr_db
from ..api import compress

__all__ = ["CaseResult", "count_ops", "import_transformers", "run_pass_case"]


def import_transformers():
    """`transformers`, with its dependency `kernels` (the Hugging Face hub package) imported first from
    where it is installed. Run from a checkout's root (`python -m pytest` puts '' on sys.path), this
    project's own top-level kernels/ folder would shadow it, and transformers' models fail to import."""
    import importlib
    import sys
    from pathlib import Path

    if "kernels" not in sys.modules:
        ours = Path(importlib.import_module("edgepasses.kernels").__file__).resolve().parent
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if (Path(p or ".").resolve() / "kernels") != ours]
        try:
            importlib.import_module("kernels")
        except ImportError:  # not installed: transformers does without it
            pass
        finally:
            sys.path[:] = saved
    return importlib.import_module("transformers")


@dataclass
class CaseResult:
    gm: torch.fx.GraphModule
    expected: object
    actual: object
    sqnr_db: float

    @property
    def report(self):
        return self.gm.edge_report


def count_ops(gm: torch.fx.GraphModule) -> Counter:
    """call_function nodes by target name without overload, e.g. {"aten.conv2d": 3, "aten.relu": 2}."""
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            counts[name.rsplit(".", 1)[0] if name.startswith(("aten.", "quantized_", "edge.")) else name] += 1
    return counts


def _check_structure(gm, check: Iterable[str], check_not: Iterable[str], counts: dict[str, int] | None):
    code = gm.code
    for pattern in check:
        FileCheck().check(pattern).run(code)
    for pattern in check_not:
        FileCheck().check_not(pattern).run(code)
    if counts:
        found = count_ops(gm)
        wrong = {op: (n, found.get(op, 0)) for op, n in counts.items() if found.get(op, 0) != n}
        if wrong:
            detail = ", ".join(f"{op}: expected {n}, found {m}" for op, (n, m) in wrong.items())
            raise AssertionError(f"op counts differ: {detail}\n{gm.code}")


def _min_sqnr(expected, actual) -> float:
    pairs = zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual))
    return min((sqnr_db(e, a) for e, a in pairs if isinstance(e, torch.Tensor)), default=float("inf"))


def run_pass_case(pipeline: str, module: torch.nn.Module, inputs: tuple, *,
                  check: Iterable[str] = (), check_not: Iterable[str] = (),
                  op_counts: dict[str, int] | None = None,
                  rtol: float = 1e-4, atol: float = 1e-5, sqnr_floor: float | None = None,
                  calibration: Iterable[tuple] | None = None, verify: bool = True) -> CaseResult:
    """Compress `module` with `pipeline`, check the graph's structure, then its numerics.

    Exact passes: `assert_close(rtol, atol)` against eager. Lossy passes: give `sqnr_floor`
    (dB) instead; every output must reach it. `verify` re-propagates fake tensors after each pass.
    """
    with torch.no_grad():
        expected = module(*inputs)
        gm = compress(module, inputs, pipeline, calibration=calibration, verify=verify)
        actual = gm(*inputs)
    _check_structure(gm, check, check_not, op_counts)
    quality = _min_sqnr(expected, actual)
    if sqnr_floor is None:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    elif quality < sqnr_floor:
        raise AssertionError(f"SQNR {quality:.1f} dB is below the floor {sqnr_floor} dB for {pipeline!r}")
    return CaseResult(gm, expected, actual, quality)
