"""Multi-objective search over pipelines: per-group quantize / prune / lowrank / sparsify_24 choices,
latency measured on the target, size, accuracy (or an SQNR proxy), budgets as hard constraints, the
Pareto front (`Front.pick`). Optuna (NSGA-II or TPE) with resumable storage in the run directory;
trials on Ray with `workers="ray"`. Needs `pip install 'edgepasses[search]'`."""
from .front import Front, Point
from .run import load_front, search
from .space import SearchSpace, layer_groups

__all__ = ["search", "load_front", "Front", "Point", "SearchSpace", "layer_groups"]
