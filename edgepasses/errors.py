"""The errors a user sees. They derive from Dynamo's `ShortenTraceback`, the one exception family
Dynamo re-raises from a backend unwrapped, so `torch.compile(..., backend="edge")` raises them as
they are (a bad option is a real `ValueError`) rather than as `BackendCompilerFailed`."""
from __future__ import annotations

from torch._dynamo.exc import ShortenTraceback


def first_line(exc: BaseException) -> str:
    """What an exception says in one line (its first), or its type's name when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class EdgeError(ShortenTraceback):
    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


class OptionError(EdgeError, ValueError):
    """An unknown pass, option, preset or target, or a value of the wrong type."""


class GradientsNeededError(EdgeError):
    """The graph would need autograd; edgepasses compiles inference graphs only."""


class ExportFailedError(EdgeError):
    """torch.export could not capture the model."""


class UnsupportedOpError(EdgeError):
    """A target cannot run an op and strict mode forbids running it in PyTorch."""


class PassVerificationError(EdgeError):
    """verify=True found a pass that left the graph malformed or its meta["val"] stale."""


class ArtifactError(EdgeError):
    """A saved artifact is missing files, corrupt or modified, or of an unknown format version."""


class DynamicShapesError(OptionError):
    """Dynamo handed the backend a graph input it cannot compile as a dynamic shape (an unbacked size)."""


class StaleWeightsError(EdgeError, RuntimeError):
    """A parameter or buffer was replaced by another tensor after its graph compiled."""


class NonFiniteInputError(EdgeError, ValueError):
    """verify=True: a compiled program was called with NaN/Inf, whose outputs need not match eager's."""


class InputMismatchError(EdgeError, ValueError):
    """A compiled program was called with input shapes or dtypes it was not compiled for."""

