"""A progress display for long loops: rich's bar when rich is installed, else nothing (core needs torch only);
and quiet stretches, where many trial compiles would repeat the same WARNINGs."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, showing a bar on stderr while they are consumed (`total`: when `items` has no len)."""
    try:
        from rich.console import Console
        from rich.progress import track
    except ImportError:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else total
    # rich's default console is stdout, where a finished bar left an empty line in Markdown reports
    yield from track(items, description=description, total=total, transient=True, console=Console(stderr=True))


@contextlib.contextmanager
def warnings_held_back(*names: str):
    """Only errors from the `edgepasses` logger (and the others named) inside: trial compiles whose result
    is thrown away, or whose chosen one says its WARNINGs itself."""
    loggers = [logging.getLogger(n) for n in ("edgepasses", *names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
