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
