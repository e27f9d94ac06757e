import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or benchmarks for more than a few seconds")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: cached graphs would hide (re)compiles and fallbacks."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
