"""model_type: "transformer" where the exported graph has attention, else "cnn"; and what quantize
makes of it (SmoothQuant before quantizing transformers, unless overridden)."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.analysis.structure import model_type
from edgepasses.canonical import export_canonical
from edgepasses.passes.quantize import (
    TRANSFORMER_SMOOTH_ALPHA,
    QuantizeOptions,
    resolve_setup,
)
from edgepasses.quant import QuantCaps
from edgepasses.testing import import_transformers


pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    """Hand-written single-head attention: softmax(q kᵀ / √d) @ v."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v


class MultiHeadAttention(Attention):
    """Heads split by view/transpose, dropout between softmax and the value matmul (off in eval)."""

    def __init__(self, dim: int = 16):
        super().__init__(dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (layer(x).view(b, t, 2, c // 2).transpose(1, 2) for layer in (self.q, self.k, self.v))
        weights = self.drop(torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1))
        return (weights @ v).transpose(1, 2).reshape(b, t, c)


class EinsumAttention(Attention):
    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        weights = torch.softmax(torch.einsum("bid,bjd->bij", q, k) / 4, dim=-1)
        return torch.einsum("bij,bjd->bid", weights, v)


def _cnn_with_softmax() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10), nn.Softmax(dim=-1)).eval()


def _tiny_bert(attn_implementation: str = "sdpa"):
    transformers = import_transformers()
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=99, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _token_ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert_graph():
    return export_canonical(_tiny_bert(), (_token_ids(0),))


def _ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_transformer_encoder_layer_is_a_transformer():
    gm = edgepasses.compress(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval(),
                             (torch.randn(2, 5, 16),), "dce")
    assert "aten.scaled_dot_product_attention.default" in _ops(gm)   # the fused op
    assert model_type(gm) == "transformer"


@pytest.mark.parametrize("module", [Attention(), MultiHeadAttention()], ids=["one-head", "heads-and-dropout"])
def test_hand_written_softmax_matmul_attention_is_a_transformer(module):
    gm = export_canonical(module.eval(), (torch.randn(2, 5, 16),))
    assert "aten.scaled_dot_product_attention.default" not in _ops(gm)   # softmax -> matmul form
    assert model_type(gm) == "transformer"


def test_einsum_attention_is_a_transformer():
    assert model_type(export_canonical(EinsumAttention().eval(), (torch.randn(2, 5, 16),))) == "transformer"


def test_hugging_face_bert_is_a_transformer(bert_graph):
    assert "aten.scaled_dot_product_attention.default" in _ops(bert_graph)
    assert model_type(bert_graph) == "transformer"


def test_hugging_face_bert_with_eager_attention_is_a_transformer():
    gm = export_canonical(_tiny_bert("eager"), (_token_ids(0),))
    assert "aten.scaled_dot_product_attention.default" not in _ops(gm)   # softmax -> matmul
    assert model_type(gm) == "transformer"


def test_resnet18_is_a_cnn():
    torchvision = pytest.importorskip("torchvision")
    gm = export_canonical(torchvision.models.resnet18(weights=None).eval(), (torch.randn(1, 3, 32, 32),))
    assert model_type(gm) == "cnn"


def test_cnn_ending_in_a_classifier_softmax_is_a_cnn():
    gm = export_canonical(_cnn_with_softmax(), (torch.randn(1, 3, 12, 12),))
    assert "aten.softmax.int" in _ops(gm)   # a softmax with no matmul after it
    assert model_type(gm) == "cnn"


def test_setup_smooths_transformers_only_and_the_user_overrides_win(bert_graph):
    bert = bert_graph
    cnn = export_canonical(_cnn_with_softmax(), (torch.randn(1, 3, 12, 12),))

    def alpha(gm, **options):
        return resolve_setup(QuantizeOptions(**options), QuantCaps(), "reference", gm).smooth_alpha

    assert alpha(bert) == TRANSFORMER_SMOOTH_ALPHA and alpha(cnn) is None
    assert alpha(bert, model_type="cnn") is None and alpha(cnn, model_type="transformer") == TRANSFORMER_SMOOTH_ALPHA
    assert alpha(bert, smooth_alpha=0.0) is None and alpha(cnn, smooth_alpha=0.5) == 0.5
    assert alpha(bert, weight_only=True) is None   # SmoothQuant is for static int8
    assert alpha(None) is None                      # no graph: no transformer settings


def _quantize_stats(model, example, calibration, pipeline: str) -> dict:
    gm = edgepasses.compress(model, example, pipeline, calibration=calibration, target="reference")
    return gm.edge_report.records[-1].stats


def test_quantize_smooths_a_bert_found_by_its_attention_unless_told_it_is_a_cnn():
    calibration = [(_token_ids(seed),) for seed in range(1, 4)]
    stats = _quantize_stats(_tiny_bert(), calibration[0], calibration, "quantize")
    # q/k/v (one group: one input), the attention output, the intermediate and output dense, the pooler
    assert stats["smoothed_groups"] == 5 and stats["layers_quantized"] > 0
    overridden = _quantize_stats(_tiny_bert(), calibration[0], calibration, "quantize(model_type=cnn)")
    assert "smoothed_groups" not in overridden and overridden["layers_quantized"] == stats["layers_quantized"]


def test_quantize_does_not_smooth_a_cnn():
    g = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(2, 3, 12, 12, generator=g),) for _ in range(3)]
    stats = _quantize_stats(_cnn_with_softmax(), calibration[0], calibration, "quantize")
    assert "smoothed_groups" not in stats and stats["layers_quantized"] == 3
