import os
import sys

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or benchmarks for more than a few seconds")


@pytest.fixture(autouse=True, scope="session")
def _reference_target_interpreted():
    """Tests read the reference target's lowered graph and lower hundreds of small ones: the default
    Inductor compile (seconds per graph) is off here; the tests of the compiled path ask for it."""
    from edgepasses.backends import reference

    reference.COMPILE_DEFAULT = False
    yield
    reference.COMPILE_DEFAULT = True


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: cached graphs would hide (re)compiles and fallbacks."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def local_ray():
    """A local Ray instance (its own processes), or a skip where Ray is not installed (`make test`
    installs it: the ray extra); installed but not importable is a failure, not a skip."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("ray")
    except PackageNotFoundError:
        pytest.skip("Ray is not installed (pip install 'edgepasses[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """Torch on one thread: repeatable float sums, and on two shared cores the small tensor ops of
    calibration run 10-20x faster than with the thread pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_bert():
    """(model, example inputs, calibration batches, evaluation batches): a 2-layer BERT-style
    encoder with LayerNorm outlier channels, the case SmoothQuant and AWQ are for."""
    from edgepasses.zoo.bert import BertConfig, BertEncoder, example_token_ids

    config = BertConfig(vocab_size=200, hidden=64, layers=2, heads=4, seq_len=16, outlier_dims=3)
    calibration = [(example_token_ids(config, seed=s),) for s in range(1, 9)]
    evaluation = [(example_token_ids(config, seed=s),) for s in range(100, 104)]
    return BertEncoder(config).eval(), calibration[0], calibration, evaluation


USER_MODELS = """
import torch.nn as nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

not_a_model = 3
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's directory, the current one: usermodels.py (`usermodels:build`) and calib.pt (4 batches)."""
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usermodels", raising=False)
    torch.save([(torch.randn(2, 3, 16, 16),) for _ in range(4)], tmp_path / "calib.pt")
    return tmp_path
