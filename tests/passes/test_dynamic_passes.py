"""Every pass on symbolic shapes: `torch.compile(dynamic=True)` of a transformers BERT encoder and of a
residual CNN compiles once, keeps every dynamic input dim dynamic through the pass, and matches eager
at several input sizes.

The models are prepared so that the lossy passes are exact here: a quarter of the channels of every
prunable group is zero (prune, by weight norm, removes exactly those) and every weight is already 2:4
sparse (sparsify_24 keeps it); lowrank keeps the full rank. A wrong shape argument, a size frozen to
the example's, or a recompile then shows as a mismatch, an error or a second compile.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgepasses.testing import import_transformers

LOSSLESS_LOWRANK = "lowrank(ratio=1.0,min_saving=-10)"  # full rank: the factors multiply back to W
# (pipeline, model): each pass changes each model (BERT has no batch norm for fold_bn)
PASSES = [(pipeline, family) for pipeline in ("fold_bn", "prune(ratio=0.25)", LOSSLESS_LOWRANK, "sparsify_24",
                                              "smooth", "quantize") for family in ("bert", "cnn")
          if (pipeline, family) != ("fold_bn", "bert")]
QUANTIZE_MIN_SQNR_DB = 20.0


# ------------------------------------------------------------------ exact-under-the-passes weights

def _zero_every_fourth_output(conv_or_linear: nn.Module, bn: nn.BatchNorm2d | None = None) -> None:
    """Output channels 0, 4, 8, ... give exact zeros (after the batch norm, when there is one)."""
    with torch.no_grad():
        conv_or_linear.weight[::4] = 0
        if conv_or_linear.bias is not None:
            conv_or_linear.bias[::4] = 0
        if bn is not None:
            bn.running_mean[::4] = 0
            bn.bias[::4] = 0


def _make_two_of_four(model: nn.Module) -> None:
    """Zero inputs 2 and 3 of every group of 4 along each weight's reduction dim."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.shape[1] % 4 == 0:
                module.weight[:, 2::4] = 0
                module.weight[:, 3::4] = 0


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = _conv_bn(3, 16), _conv_bn(16, 16), _conv_bn(16, 16)
        self.down, self.head = _conv_bn(16, 32, stride=2), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = F.relu(self.down(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    for block in (model.stem, model.a, model.b, model.down):
        with torch.no_grad():
            block[1].running_mean.uniform_(-0.5, 0.5)
            block[1].running_var.uniform_(0.5, 2.0)
            block[1].weight.uniform_(0.5, 1.5)
            block[1].bias.uniform_(-0.2, 0.2)
        _zero_every_fourth_output(block[0], block[1])  # stem and b share the residual's channels
    _make_two_of_four(model)
    return model


def _bert() -> nn.Module:
    transformers = import_transformers()
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    for layer in model.encoder.layer:
        _zero_every_fourth_output(layer.intermediate.dense)  # GELU(0) = 0: the MLP units prune can take
    _make_two_of_four(model)
    return model


# ------------------------------------------------------------------ inputs and runs

def _tokens(batch: int, seq: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # padding in one row
    return {"input_ids": torch.randint(0, 50, (batch, seq), generator=generator), "attention_mask": mask}


def _images(batch: int, size: int, seed: int) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


# Sizes avoid 1 (Dynamo specializes it) and equal batch and length (Dynamo would give both one symbol).
MODELS = {
    "bert": (_bert, [_tokens(2, s, seed) for seed, s in enumerate((8, 12, 16))],
             [_tokens(2, 8, 10), _tokens(3, 12, 11), _tokens(5, 24, 12)],
             {(0, 0), (0, 1), (1, 0), (1, 1)}),
    "cnn": (_cnn, [_images(b, 16, seed) for seed, b in enumerate((4, 6))],
            [_images(5, 16, 10), _images(7, 24, 11), _images(9, 20, 12)],
            {(0, 0), (0, 2), (0, 3)}),
}


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _sqnr_db(expected: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (actual - expected).double().pow(2).mean().item()
    return math.inf if noise == 0 else 10 * math.log10(expected.double().pow(2).mean().item() / noise)


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, (build, *_) in MODELS.items()}


@pytest.mark.parametrize("pipeline,family", PASSES, ids=[f"{p}-{f}" for p, f in PASSES])
def test_pass_keeps_dims_dynamic_and_matches_eager(models, pipeline, family, one_thread):
    _, calibration, shapes, dynamic_dims = MODELS[family]
    model, compilations = models[family], []
    compiled = torch.compile(model, backend="edge", dynamic=True, options={
        "target": "reference", "pipeline": pipeline, "calibration": calibration, "verify": True,
        "on_compile": compilations.append})
    with torch.no_grad():
        results = [(_call(model, inputs), _call(compiled, inputs)) for inputs in shapes]

    assert len(compilations) == 1, [str(c.graph) for c in compilations]
    compilation = compilations[0]
    assert {(d.position, d.dim) for d in compilation.dynamic} == dynamic_dims, compilation.dynamic
    record = compilation.report.records[0]
    assert record.modified, record.stats
    if pipeline.startswith("prune"):  # exactly the zero channels (MLP units in BERT: heads meet sdpa)
        removed = {"bert": ["16 of 64 removed"], "cnn": ["4 of 16 removed", "4 of 16 removed", "8 of 32 removed"]}
        assert sorted(record.stats["channels_removed"].values()) == removed[family], record.stats
        assert isinstance(record.stats["macs_before"], int) and record.stats["macs_after"] < record.stats["macs_before"]
    for inputs, (expected, actual) in zip(shapes, results):
        if pipeline == "quantize":
            assert _sqnr_db(expected, actual) > QUANTIZE_MIN_SQNR_DB, _shape_of(inputs)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"{_shape_of(inputs)}: {m}")


def _shape_of(inputs) -> str:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    return f"inputs of shape {tuple(first.shape)}"


class MergesChannelsWithLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc1(x)
        merged = y.reshape(y.shape[0], -1) * 2  # fc1's channels and the dynamic length in one dim
        return self.fc2(merged.reshape(y.shape[0], -1, 8))


def test_prune_leaves_channels_merged_with_a_dynamic_dim_whole_and_says_why(one_thread):
    """A fixed channel set cannot be cut out of a dim whose size is the input's length times 8: the group
    stays whole, with that reason, and the graph stays dynamic."""
    model, compilations = MergesChannelsWithLength().eval(), []
    compiled = torch.compile(model, backend="edge", dynamic=True, options={
        "target": "reference", "pipeline": "prune(ratio=0.5)", "on_compile": compilations.append})
    with torch.no_grad():
        for batch, length in ((2, 5), (3, 7), (4, 11)):
            x = torch.randn(batch, length, 8)
            torch.testing.assert_close(compiled(x), model(x))
    stats = compilations[0].report.records[0].stats
    assert len(compilations) == 1 and {(d.position, d.dim) for d in compilations[0].dynamic} == {(0, 0), (0, 1)}
    assert "merges channels with a dynamic dim" in stats["left_whole"]["fc1"], stats
    assert stats["channels_removed"] == {}
