"""edgepasses: compression and decomposition of PyTorch models as FX graph passes.

`torch.compile(model, backend="edge")` works without importing this package (entry point);
importing it also registers the backend when the package is used from a source tree.
"""
from .api import compress, export, lower, quant_report
from .artifacts import load, save
from .distill import distill
from .finetune import finetune
from .pass_base import PassContext, PassResult, option, register_pass, registered_passes
from .pipeline import PRESETS, Pipeline

__all__ = ["compress", "export", "finetune", "distill", "save", "load", "lower", "quant_report", "prepare_qat", "convert_qat", "search", "Pipeline", "PRESETS",
           "PassContext", "PassResult", "option", "register_pass", "registered_passes"]
__version__ = "0.1.0"

_QAT = ("prepare_qat", "convert_qat")


def __getattr__(name: str):
    # QAT builds on torchao, an optional extra: imported on first use, so `import edgepasses` needs torch only.
    if name in _QAT:
        from .quant import qat

        return getattr(qat, name)
    if name == "search":  # Optuna is the optional `search` extra
        from .search import search

        return search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quiet_torchao_import() -> None:
    # torchao registers an Enum with torch's pytree when imported, and this torch logs a deprecation
    # WARNING about it on every run: nothing our users can act on, and it would precede every
    # one-line error of the CLI.
    import logging

    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "register_constant() on Enum subclasses is deprecated" not in record.getMessage())


def _register_backend() -> None:
    # Guarded: torch's registry asserts on duplicate names, and when Dynamo loads us through the
    # entry point it registers the function itself right after this import.
    from torch._dynamo.backends import registry

    if "edge" not in registry._COMPILER_FNS and registry._BACKENDS.get("edge") is None:
        from .backend import edge_backend

        registry.register_backend(edge_backend, name="edge")


_quiet_torchao_import()
_register_backend()
