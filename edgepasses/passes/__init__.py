"""Built-in passes, one per file; the file name is the registered pass name."""
from . import dce, fold_bn, lowrank, prune, quantize, smooth, sparsify_24  # noqa: F401  (importing registers them)
