"""Feeding calibration data: from the `calibration` option only, checked batch by batch."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..dynamic_shapes import fits, shape_text
from ..errors import OptionError
from ..progress import progress


def as_batch(batch) -> tuple:
    """A calibration batch as the tuple of inputs it stands for (a lone tensor is one input)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _check_batch(index: int, batch: tuple, example_inputs: tuple) -> None:
    if len(batch) != len(example_inputs):
        raise OptionError(f"calibration batch {index} has {len(batch)} input(s); the graph takes "
                          f"{len(example_inputs)} (each batch is a tuple like the example inputs)")
    for position, (got, want) in enumerate(zip(batch, example_inputs)):
        if not isinstance(want, torch.Tensor):
            continue
        if not isinstance(got, torch.Tensor) or not fits(got, want) or got.dtype != want.dtype:
            described = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise OptionError(f"calibration batch {index}, input {position}: got {described}, expected "
                              f"{shape_text(want)} {want.dtype} like the example inputs (the graph is "
                              "compiled for these shapes)")
        check_finite(got, f"calibration batch {index}, input {position}")


def check_finite(value, where: str) -> None:
    """Refuse a float tensor holding NaN or Inf, naming `where` ("calibration batch 3, input 0"): one NaN
    would turn every statistic a data-aware pass gathers (ranges, activation norms, Grams) into NaN."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
        bad = "NaN" if torch.isnan(value).any() else "Inf"
        raise OptionError(f"{where} contains {bad}: statistics calibrated on it (ranges, activation norms) "
                          "would be NaN or meaningless; clean or drop that batch")


def calibrate(run: Callable, batches: Iterable | None, example_inputs: tuple, *, needed_by: str) -> int:
    """Run every calibration batch through `run`; returns how many there were."""
    if batches is None:
        raise OptionError(f"{needed_by} needs calibration data: pass calibration=[(x1,), (x2,), ...] "
                          "(an iterable of input tuples shaped like the example inputs; a few hundred "
                          "samples is typical) to compress() or in torch.compile options")
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(progress(batches, f"calibrating {needed_by}"), start=1):
            batch = as_batch(batch)
            _check_batch(count - 1, batch, example_inputs)
            run(*batch)
    if count == 0:
        raise OptionError(f"{needed_by}: the calibration iterable is empty")
    return count


def checked_batches(batches: Iterable | None, example_inputs: tuple, *, needed_by: str) -> list[tuple]:
    """The calibration batches as a list (to be used more than once), each checked."""
    listed = [] if batches is None else [as_batch(b) for b in batches]
    calibrate(lambda *batch: None, None if batches is None else listed, example_inputs, needed_by=needed_by)
    return listed
