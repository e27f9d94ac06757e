"""A progress display for long loops: rich's bar when rich is installed, else nothing (core needs torch only)."""
from __future__ import annotations

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
