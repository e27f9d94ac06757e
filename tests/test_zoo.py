"""The model zoo and the digits data: shapes, the train/test split, training and its cache."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from edgepasses import zoo  # noqa: E402  (after the importorskips)
from edgepasses.zoo.digits import (accuracy, calibration_batches, eval_batches,  # noqa: E402
                                     load_digits_split)

EXPECTED_OUTPUT_SHAPES = {
    "resnet18": (1, 1000), "resnet50": (1, 1000), "mobilenet_v2": (1, 1000), "densenet121": (1, 1000),
    "shufflenet_v2": (1, 1000), "regnet_x_400mf": (1, 1000), "bert_encoder": (1, 128, 768), "digits_cnn": (1, 10),
    "digits_resnet18": (1, 10), "char_lm": (1, 64, 96), "minilm_l6": (1, 384),
}
TRAINED_MODELS = {"digits_cnn", "digits_resnet18", "char_lm", "minilm_l6"}  # with a task metric


@pytest.fixture
def untrained_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models trained here built with their initial weights: shape tests need no training."""
    from edgepasses.zoo.char_lm import CharTransformer

    monkeypatch.setattr(zoo, "load_or_train", lambda name, factory, **recipe: factory().eval())
    monkeypatch.setattr(zoo, "load_or_train_char_lm", lambda: CharTransformer().eval())


@pytest.fixture
def empty_cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGEPASSES_CACHE", str(tmp_path))
    return tmp_path


def _shapes(inputs: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in inputs]


def test_zoo_names_cover_every_model():
    assert set(zoo.ZOO_NAMES) == set(EXPECTED_OUTPUT_SHAPES)


@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_model_builds_in_eval_mode_and_gives_expected_shape(name, untrained_digits):
    model = zoo.get_model(name)
    assert model.name == name and model.description
    assert not model.module.training
    with torch.no_grad():
        output = model.module(*model.example_inputs)
    assert tuple(output.shape) == EXPECTED_OUTPUT_SHAPES[name]
    assert (model.accuracy_fn is not None) == (name in TRAINED_MODELS)
    calibration = model.calibration(2)
    assert len(calibration) == 2
    assert all(_shapes(inputs) == _shapes(model.example_inputs) for inputs in calibration)


def test_batch_size_reaches_example_and_calibration_inputs(untrained_digits):
    for name, shape in [("bert_encoder", (4, 128)), ("digits_cnn", (4, 1, 8, 8))]:
        model = zoo.get_model(name, batch_size=4)
        assert _shapes(model.example_inputs) == [shape]
        assert _shapes(model.calibration(1)[0]) == [shape]


def test_random_weights_are_reproducible():
    first, second = zoo.get_model("shufflenet_v2"), zoo.get_model("shufflenet_v2")
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_name_raises_and_lists_valid_names():
    with pytest.raises(ValueError, match="no_such_model") as raised:
        zoo.get_model("no_such_model")
    assert all(name in str(raised.value) for name in zoo.ZOO_NAMES)


@pytest.mark.parametrize("size", [8, 32])
def test_digits_split_is_stratified_and_normalised_with_train_statistics(size):
    data = load_digits_split(size)
    assert data.train_x.shape == (1437, 1, size, size) and data.test_x.shape == (360, 1, size, size)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(float(data.train_x.mean())) < 1e-4 and abs(float(data.train_x.std()) - 1) < 1e-4
    assert torch.bincount(data.test_y, minlength=10).min() >= 35  # every class, about 36 each


@pytest.mark.parametrize("size", [8, 32])
def test_calibration_batches_come_from_train_split(size):
    train_images = load_digits_split(size).train_x.flatten(1)
    batches = calibration_batches(3, 5, size)
    assert len(batches) == 3
    for (images,) in batches:
        assert images.shape == (5, 1, size, size)
        matches = (images.flatten(1)[:, None] == train_images[None]).all(dim=-1)
        assert matches.any(dim=1).all()


def test_calibration_beyond_train_split_raises():
    with pytest.raises(ValueError, match="train split has 1437"):
        calibration_batches(100, 32, 8)


def test_accuracy_feeds_full_batches_and_counts_only_real_images():
    def predict_zero(images: torch.Tensor) -> torch.Tensor:
        assert images.shape[0] == 64  # 360 test images: the last batch is padded
        return torch.nn.functional.one_hot(torch.zeros(64, dtype=torch.int64), 10).float()

    test_labels = torch.cat([labels for _, labels in eval_batches(64, 8)])
    expected = 100.0 * float((test_labels == 0).float().mean())
    assert accuracy(predict_zero, size=8, batch_size=64) == pytest.approx(expected)


def test_digits_cnn_trains_once_then_loads_from_cache(empty_cache, caplog):
    with caplog.at_level(logging.INFO, logger="edgepasses.zoo"):
        trained = zoo.get_model("digits_cnn")
    assert "training digits_cnn" in caplog.text
    assert (empty_cache / "digits_cnn_v1.pt").exists()
    assert not trained.module.training
    assert trained.accuracy_fn(trained.module) >= 90.0

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgepasses.zoo"):
        cached = zoo.get_model("digits_cnn")
    assert "training" not in caplog.text
    with torch.no_grad():
        assert torch.equal(cached.module(*cached.example_inputs), trained.module(*trained.example_inputs))


@pytest.mark.slow
def test_digits_resnet18_trains_to_90_percent(empty_cache):
    model = zoo.get_model("digits_resnet18")
    # Eager takes any batch: 256 at a time is much faster than accuracy_fn's batches of 1.
    assert accuracy(model.module, size=32) >= 90.0
