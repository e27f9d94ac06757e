"""Structured pruning: dependency groups (`groups`), importance (`criteria`), the rewrite (`apply`).

The registered pass is `edgepasses.passes.prune`; this package is what it is built from.
"""
from .groups import Analysis, Chan, Group, analyze

__all__ = ["Analysis", "Chan", "Group", "analyze"]
