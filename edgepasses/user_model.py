"""The user's own model for the CLI: `package.module:factory` or a `.pt2` file, with inputs and data.

A factory is imported from the current directory or PYTHONPATH and called with no arguments; it
must return an `nn.Module`. A `.pt2` file (`torch.export.save`) is checked like an artifact's graph
before it is deserialized (`pt2_check`: no pickles, no code), and its example inputs give the shapes
when none are given. Calibration is a file of input tuples loaded with `weights_only=True`.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from .errors import OptionError
from .pt2_check import load_checked


def parse_shape(text: str) -> tuple[int, ...]:
    """`1,3,224,224` -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise OptionError(f"input shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224")
    return shape


def load_model(spec: str) -> tuple[torch.nn.Module, tuple | None]:
    """(the model in eval mode, the example inputs a .pt2 carries or None)."""
    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec))
    return _call_factory(spec), None


def _call_factory(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise OptionError(f"model {spec!r}: expected package.module:factory (a callable returning an nn.Module) "
                          "or a .pt2 file written by torch.export.save")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: the user's own modules
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise OptionError(f"model {spec!r}: {exc} (run from the directory that holds it, or set PYTHONPATH)") from exc
    model = factory() if callable(factory) else factory
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model {spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _load_pt2(file: Path) -> tuple[torch.nn.Module, tuple]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise OptionError(f"model {file}: {exc.strerror or exc}") from exc
    exported = load_checked(data, file)
    args, kwargs = exported.example_inputs or ((), {})
    if kwargs:
        raise OptionError(f"model {file}: keyword example inputs are not supported; export with positional ones")
    return _as_inference(exported.module()), tuple(args)


def _as_inference(module: torch.nn.Module) -> torch.nn.Module:
    """An exported module's graph already holds the ops of the mode it was exported in (export the
    model in eval mode); its `training` flags only say so. Its eval() is not supported, so set them."""
    for sub in module.modules():
        sub.training = False
    return module


def example_inputs(shapes: list[str], carried: tuple | None, spec: str) -> tuple[torch.Tensor, ...]:
    """Random float32 inputs of the given shapes, or the ones a .pt2 carries."""
    if shapes:
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(parse_shape(s), generator=generator) for s in shapes)
    if carried:
        return carried
    raise OptionError(f"model {spec!r}: give its input shapes, e.g. --input-shape 1,3,224,224 (repeat per input)")


def load_calibration(file: str | None, inputs: tuple) -> list[tuple] | None:
    """The batches `torch.save`d in `file` (a list of input tuples), loaded without unpickling code."""
    if file is None:
        return None
    try:
        batches = torch.load(file, weights_only=True)
    except OSError as exc:
        raise OptionError(f"calibration {file}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - weights_only refuses anything but tensors and containers
        raise OptionError(f"calibration {file}: torch.load(weights_only=True) refused it ({type(exc).__name__}): "
                          "save a list of tuples of tensors with torch.save") from exc
    if not isinstance(batches, (list, tuple)) or not batches:
        raise OptionError(f"calibration {file}: expected a non-empty list of input tuples like "
                          f"[(x1,), (x2,), ...]; got {type(batches).__name__}")
    return [tuple(b) if isinstance(b, (list, tuple)) else (b,) for b in batches]
