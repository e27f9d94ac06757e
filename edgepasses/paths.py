"""Where edgepasses keeps what it builds or trains once per machine (kernels, TVM tuning, the
models the bench trains): $EDGEPASSES_CACHE, else $XDG_CACHE_HOME/edgepasses, else
~/.cache/edgepasses. Compile caches a user asks for live in their own `cache_dir`."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("EDGEPASSES_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepasses"
