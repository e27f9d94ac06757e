"""Every hostile case, area by area (bench/hostile.py runs and classifies them; test_hostile.py asserts
each one's expected outcome)."""
from __future__ import annotations

import importlib

from edgepasses.bench.hostile import AREAS, Case

MODULES = {area: f"hostile_{area}" for area in AREAS}


def all_cases() -> list[Case]:
    cases = []
    for area, module in MODULES.items():
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for case in found.cases():
            assert case.area == area, f"{case.name}: area {case.area}, listed in {module}"
            cases.append(case)
    return cases
