"""The `edge` entry point, its guarded registration, and the installed layout."""
import importlib.metadata
import subprocess
import sys

import pytest


def test_entry_point_and_console_script_are_declared():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert eps["edge"].value == "edgepasses.backend:edge_backend"
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert scripts["edgepasses"].value == "edgepasses.cli:main"


@pytest.mark.parametrize("order", [
    "import edgepasses; from torch._dynamo.backends.registry import lookup_backend; lookup_backend('edge')",
    "from torch._dynamo.backends.registry import lookup_backend; lookup_backend('edge'); import edgepasses",
    "import torch; torch._dynamo.list_backends(); import edgepasses; torch._dynamo.lookup_backend('edge')",
])
def test_registration_is_guarded_in_any_import_order(order):
    script = order + "; import torch; assert torch._dynamo.list_backends().count('edge') == 1"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_backends_and_kernels_install_under_the_edgepasses_namespace():
    import edgepasses.backends
    import edgepasses.kernels

    assert edgepasses.backends.__name__ == "edgepasses.backends"
    assert "kernels" not in sys.modules or sys.modules["kernels"].__name__ != "edgepasses.kernels"


def test_every_pass_registers_without_the_optional_torchao():
    # torchao is the `quantize` extra: only quantize itself may need it, when it runs.
    script = ("import sys; sys.modules['torchao'] = None; import edgepasses; "
              "assert {'fold_bn', 'dce', 'prune', 'smooth', 'lowrank', 'quantize'} <= set(edgepasses.registered_passes())")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
