"""distill: logit (and feature) distillation of a compressed graph from the original model."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import zoo
from edgepasses.zoo import digits
from edgepasses.distill import distill
from edgepasses.errors import OptionError


@pytest.fixture(autouse=True)
def one_thread():
    # Repeatable float sums, and on two shared cores a tiny model trains far faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
    torch.set_num_threads(threads)


def _train_batches(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = digits.load_digits_split()
    whole = len(data.train_y) // batch_size * batch_size  # static shapes: only full batches
    return [(data.train_x[i:i + batch_size], data.train_y[i:i + batch_size]) for i in range(0, whole, batch_size)]


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def test_half_pruned_digits_cnn_recovers_most_of_its_accuracy():
    model = zoo.get_model("digits_cnn", batch_size=64)  # the graph is specialised to batches of 64
    original = model.accuracy_fn(model.module)
    gm = edgepasses.compress(model.module, model.example_inputs, "fold_bn,prune(ratio=0.5,round_to=4)")
    pruned = model.accuracy_fn(gm)
    distill(gm, model.module, _train_batches(64), steps=300, feature_loss=1.0, lr=3e-3)
    recovered = model.accuracy_fn(gm)
    stats = gm.edge_distill
    print(f"digits_cnn top-1: original {original:.2f}%, pruned 0.5 {pruned:.2f}%, after distilling 300 steps "
          f"{recovered:.2f}% (loss {stats['loss_start']:.3f} -> {stats['loss_end']:.3f}, {stats['seconds']:.1f} s; "
          f"features: {stats['feature_layers']}; skipped: {stats['feature_skipped']})")
    assert recovered - pruned > 0.5 * (original - pruned)
    assert stats["loss_end"] < stats["loss_start"]
    assert any("paired by correlation" in layer for layer in stats["feature_layers"])  # pruned convs still match
    assert not any(p.requires_grad for p in gm.parameters())


def test_int8_graph_keeps_its_qdq_form_and_trains_its_float_weights():
    teacher, x = _cnn(), torch.randn(8, 3, 8, 8)
    calibration = [(torch.randn(8, 3, 8, 8),) for _ in range(4)]
    gm = edgepasses.compress(teacher, (x,), "fold_bn,quantize", calibration=calibration)
    code, before = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    teacher_weight = teacher[4].weight.clone()
    distill(gm, teacher, [torch.randn(8, 3, 8, 8) for _ in range(8)], steps=60, feature_loss=1.0, lr=1e-2)
    stats = gm.edge_distill
    assert gm.code == code  # the same quantize/dequantize graph the targets lower
    assert stats["fake_quantized"] == 6 and stats["loss_end"] < 0.7 * stats["loss_start"]
    after = gm.state_dict()
    assert not torch.equal(after["4.weight"], before["4.weight"])
    assert not torch.equal(after["0_weight_bnfold"], before["0_weight_bnfold"])
    for name in ("_scale_0", "_zero_point_0", "_scale_1"):  # quantisation parameters stay fixed
        assert torch.equal(after[name], before[name])
    assert torch.equal(teacher[4].weight, teacher_weight)  # the graph shared this tensor: replaced, not written
    assert len(stats["feature_layers"]) == 3


@pytest.mark.parametrize("pipeline", ["sparsify_24", "sparsify_24,quantize"])
def test_2to4_graph_keeps_its_zeros(pipeline):
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    gm = edgepasses.compress(teacher, (torch.randn(8, 16),), pipeline, calibration=[(torch.randn(8, 16),)])
    weights = {k: v.clone() for k, v in gm.state_dict().items() if "weight" in k}
    assert all((w == 0).float().mean() == 0.5 for w in weights.values())
    distill(gm, teacher, [torch.randn(8, 16) for _ in range(4)], steps=30, lr=1e-2)
    for name, old in weights.items():
        new = gm.state_dict()[name]
        assert not torch.equal(new, old)
        assert torch.equal(new[old == 0], torch.zeros_like(new[old == 0]))


def test_flash_distillation_of_a_tiny_model_is_fast():
    teacher, x = _cnn(), torch.randn(8, 3, 8, 8)
    gm = edgepasses.compress(teacher, (x,), "fold_bn,prune(ratio=0.5)")
    distill(gm, teacher, [(torch.randn(8, 3, 8, 8), None) for _ in range(4)], steps=20, feature_loss=1.0)
    assert gm.edge_distill["seconds"] < 2.0, gm.edge_distill


@pytest.fixture(scope="module")
def folded():
    teacher, x = _cnn(), torch.randn(8, 3, 8, 8)
    return edgepasses.compress(teacher, (x,), "fold_bn"), teacher, x


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 1, "teacher": _cnn().train()}, "teacher is in training mode"),
    ({"steps": 1, "feature_loss": 1.0, "feature_layers": ["layer9.*"]}, r"'layer9\.\*' matched no conv/linear"),
    ({"steps": 1, "feature_layers": ["0"]}, "feature_loss is 0"),
    ({"steps": 1, "feature_loss": -1.0}, "feature_loss must be a weight >= 0"),
    ({"steps": 1, "temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_distill_input_gets_a_clear_error(folded, kwargs, message):
    gm, teacher, x = folded  # every check comes before training: the graph is not changed
    kwargs = {"teacher": teacher, "data": [x], **kwargs}
    with pytest.raises(OptionError, match=message):
        distill(gm, **kwargs)
