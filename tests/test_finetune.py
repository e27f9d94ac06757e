"""finetune: recovery training of a compressed graph, with labels and/or distillation."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import zoo
from edgepasses.zoo import digits
from edgepasses.errors import OptionError


def _train_batches(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = digits.load_digits_split()
    whole = len(data.train_y) // batch_size * batch_size  # static shapes: only full batches
    return [(data.train_x[i:i + batch_size], data.train_y[i:i + batch_size]) for i in range(0, whole, batch_size)]


@pytest.mark.slow
def test_pruned_digits_cnn_recovers_to_within_a_point_after_a_short_finetune():
    model = zoo.get_model("digits_cnn", batch_size=64)  # the graph is specialised to batches of 64
    train = _train_batches(64)
    original = model.accuracy_fn(model.module)
    threads = torch.get_num_threads()
    # One thread: repeatable float sums, and on two shared cores a tiny model trains far faster.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.set_num_threads(1)
        try:
            gm = edgepasses.compress(model.module, model.example_inputs, "fold_bn,prune(ratio=0.3,round_to=4)")
            pruned = model.accuracy_fn(gm)
            edgepasses.finetune(gm, train, steps=400, lr=3e-3)
        finally:
            torch.set_num_threads(threads)
    recovered = model.accuracy_fn(gm)
    stats = gm.edge_report.records[1].stats
    print(f"digits_cnn top-1: original {original:.2f}%, pruned 0.3 {pruned:.2f}%, after 400 steps {recovered:.2f}% "
          f"(params {stats['params_before']} -> {stats['params_after']})")
    assert stats["params_after"] < 0.6 * stats["params_before"]
    assert recovered >= original - 1.0
    assert not any(p.requires_grad for p in gm.parameters())


def test_distillation_alone_moves_the_student_toward_the_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8)
    gm = edgepasses.compress(teacher, (x,), "prune(ratio=0.5)")
    data = [(torch.randn(32, 8), None) for _ in range(4)]
    gap = lambda: (gm(x) - teacher(x)).pow(2).mean().item()  # noqa: E731
    with torch.no_grad():
        before = gap()
    edgepasses.finetune(gm, data, steps=200, teacher=teacher, lr=1e-2)
    with torch.no_grad():
        assert gap() < 0.5 * before
    assert all(isinstance(p, nn.Parameter) for p in gm.parameters())


@pytest.mark.parametrize("kwargs, data, message", [
    ({"steps": 0}, [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], "steps must be >= 1"),
    ({"steps": 1}, [(torch.randn(4, 8), None)], "without labels needs a teacher"),
    ({"steps": 1, "temperature": 0.0}, [], "temperature must be > 0"),
    ({"steps": 1, "teacher": nn.Linear(8, 4).train()}, [], "teacher is in training mode"),
])
def test_bad_finetune_input_gets_a_clear_error(kwargs, data, message):
    gm = edgepasses.compress(nn.Linear(8, 4).eval(), (torch.randn(4, 8),), "dce")
    with pytest.raises(OptionError, match=message):
        edgepasses.finetune(gm, data, **kwargs)


def test_finetuning_twice_trains_the_weights_again():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    gm = edgepasses.compress(model, (torch.randn(4, 8),), "dce")
    data = [(torch.randn(4, 8), torch.randint(0, 4, (4,)))]
    edgepasses.finetune(gm, data, steps=2)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    edgepasses.finetune(gm, data, steps=2)  # the first run left every parameter frozen
    assert any(not torch.equal(before[k], v) for k, v in gm.state_dict().items())
