"""The architecture catalogue of the coverage matrix (`edgepasses bench coverage`).

Small configurations of real architectures from transformers, timm and torchvision (plus
`nn.TransformerEncoder`), built with seeded random weights from their configs: nothing is
downloaded. Each builder returns `Built(model, example_inputs, calibration)`: the model in eval
mode, one input tuple, and a few calibration tuples of the same shapes. Sizes are chosen so that
one compile takes seconds (hidden 64-128, 2 layers, images 64 px where the model allows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from edgepasses.testing import import_transformers

from edgepasses.zoo import _recalibrate_batch_norm

SEQ_LEN = 16
VOCAB = 1000
IMAGE = 64
CALIBRATION_BATCHES = 3
WEIGHTS_SEED = 0
INPUTS_SEED = 0  # example inputs; calibration batches follow from the same generator


class Built(NamedTuple):
    model: nn.Module
    example_inputs: tuple
    calibration: list[tuple]


@dataclass(frozen=True)
class Architecture:
    name: str
    source: str  # "transformers" | "timm" | "torchvision" | "torch"
    description: str
    build: Callable[[], Built]


# Inputs ---------------------------------------------------------------------------------------

def _batches(make: Callable[[torch.Generator], tuple]) -> tuple[tuple, list[tuple]]:
    """The example input tuple and CALIBRATION_BATCHES more of the same shapes, seeded."""
    generator = torch.Generator().manual_seed(INPUTS_SEED)
    example = make(generator)
    return example, [make(generator) for _ in range(CALIBRATION_BATCHES)]


def _tokens(vocab: int = VOCAB, seq_len: int = SEQ_LEN) -> Callable[[torch.Generator], tuple]:
    return lambda g: (torch.randint(0, vocab, (1, seq_len), generator=g),)


def _images(size: int = IMAGE, channels: int = 3) -> Callable[[torch.Generator], tuple]:
    return lambda g: (torch.randn(1, channels, size, size, generator=g),)


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    """The module `factory` builds, with weights from WEIGHTS_SEED; the caller's RNG is spared."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        return factory()


def _built(model: nn.Module, make_inputs: Callable[[torch.Generator], tuple], image_size: int | None = None) -> Built:
    if image_size is not None:  # random batch-norm statistics make activations vanish or explode
        model = _recalibrate_batch_norm(model, (1, 3, image_size, image_size))
    example, calibration = _batches(make_inputs)
    return Built(model.eval(), example, calibration)


# transformers -------------------------------------------------------------------------------

def _text_model(config_name: str, model_name: str = "AutoModel", **config) -> Callable[[], Built]:
    def build() -> Built:
        transformers = import_transformers()
        cfg = getattr(transformers, config_name)(**config)
        model_class = getattr(transformers, model_name)
        model = _seeded(lambda: model_class.from_config(cfg) if model_name == "AutoModel" else model_class(cfg))
        return _built(model, _tokens(cfg.vocab_size))
    return build


def _image_model(config_name: str, image_size: int, **config) -> Callable[[], Built]:
    def build() -> Built:
        transformers = import_transformers()
        cfg = getattr(transformers, config_name)(image_size=image_size, **config)
        model = _seeded(lambda: transformers.AutoModel.from_config(cfg))
        return _built(model, _images(image_size), image_size)
    return build


def _whisper_encoder() -> Built:
    import_transformers()
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                        max_source_positions=32, vocab_size=VOCAB,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    frames = 2 * cfg.max_source_positions  # the encoder's two convs halve the frames once
    model = _seeded(lambda: WhisperEncoder(cfg))
    return _built(model, lambda g: (torch.randn(1, cfg.num_mel_bins, frames, generator=g),))


_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # GQA: 2 KV heads


# timm / torchvision ---------------------------------------------------------------------------

def _timm(name: str, image_size: int = IMAGE, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        import timm

        model = _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))
        return _built(model, _images(image_size), image_size)
    return build


def _torchvision(name: str, image_size: int = IMAGE, **kwargs) -> Callable[[], Built]:
    def build() -> Built:
        import torchvision

        model = _seeded(lambda: getattr(torchvision.models, name)(weights=None, **kwargs))
        return _built(model, _images(image_size), image_size)
    return build


def _torchvision_vit() -> Built:
    from torchvision.models import VisionTransformer

    def factory() -> nn.Module:
        model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                  mlp_dim=128, num_classes=10)
        nn.init.trunc_normal_(model.heads.head.weight, std=0.02)  # torchvision zeroes it: a constant output
        return model

    return _built(_seeded(factory), _images(32))


def _transformer_encoder() -> Built:
    def factory() -> nn.Module:
        layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    return _built(_seeded(factory), lambda g: (torch.randn(1, SEQ_LEN, 64, generator=g),))


def _catalogue() -> dict[str, Architecture]:
    entries = [
        # transformers: text encoders, decoders (GQA), encoder halves, vision
        Architecture("bert", "transformers", "BertModel, hidden 64, 2 layers", _text_model("BertConfig", **_BERT_LIKE)),
        Architecture("distilbert", "transformers", "DistilBertModel, dim 64, 2 layers",
                     _text_model("DistilBertConfig", vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
                                 hidden_dim=128, max_position_embeddings=64)),
        Architecture("roberta", "transformers", "RobertaModel, hidden 64, 2 layers",
                     _text_model("RobertaConfig", **{**_BERT_LIKE, "max_position_embeddings": 66})),
        Architecture("gpt2", "transformers", "GPT2Model (Conv1D layers), 64 wide, 2 layers",
                     _text_model("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=0, eos_token_id=0)),
        Architecture("llama", "transformers", "LlamaModel, hidden 64, 2 layers, GQA 4 heads / 2 KV heads",
                     _text_model("LlamaConfig", **_DECODER)),
        Architecture("qwen2", "transformers", "Qwen2Model, hidden 64, 2 layers, GQA 4 heads / 2 KV heads",
                     _text_model("Qwen2Config", **_DECODER)),
        Architecture("t5_encoder", "transformers", "T5EncoderModel, d_model 64, 2 layers",
                     _text_model("T5Config", "T5EncoderModel", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                                 num_layers=2, num_heads=4)),
        Architecture("whisper_encoder", "transformers", "WhisperEncoder, d_model 64, 2 layers, 16 mel x 64 frames",
                     _whisper_encoder),
        Architecture("vit", "transformers", "ViTModel, 32 px, patch 8, hidden 64, 2 layers",
                     _image_model("ViTConfig", 32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128)),
        Architecture("swin", "transformers", "SwinModel, 64 px, embed 32, depths 2-2, window 4",
                     _image_model("SwinConfig", 64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                  window_size=4)),
        Architecture("mobilevit", "transformers", "MobileViTModel, 64 px, reduced widths",
                     _image_model("MobileViTConfig", 64, hidden_sizes=[32, 48, 64],
                                  neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96])),
        # timm
        # Its attention biases are sized for a 7x7 last stage, so 224 px, with narrow stages instead.
        Architecture("efficientformer_l1", "timm", "efficientformer_l1, 224 px, depths 1-1-1-2, widths 16-32-48-64",
                     _timm("efficientformer_l1", 224, depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64))),
        Architecture("levit_128s", "timm", "levit_128s, 64 px", _timm("levit_128s", img_size=IMAGE)),
        Architecture("mobilevit_xxs", "timm", "mobilevit_xxs, 64 px", _timm("mobilevit_xxs")),
        Architecture("regnetx_002", "timm", "regnetx_002, 64 px", _timm("regnetx_002")),
        Architecture("convnext_atto", "timm", "convnext_atto, 64 px", _timm("convnext_atto")),
        Architecture("mobilenetv3_small_050", "timm", "mobilenetv3_small_050, 64 px", _timm("mobilenetv3_small_050")),
        Architecture("deit_tiny", "timm", "deit_tiny_patch16_224, 64 px, 2 blocks",
                     _timm("deit_tiny_patch16_224", img_size=IMAGE, depth=2)),
        # torchvision
        Architecture("resnet18", "torchvision", "resnet18, 64 px", _torchvision("resnet18")),
        Architecture("mobilenet_v3_small", "torchvision", "mobilenet_v3_small, 64 px",
                     _torchvision("mobilenet_v3_small")),
        Architecture("efficientnet_b0", "torchvision", "efficientnet_b0, 64 px", _torchvision("efficientnet_b0")),
        Architecture("shufflenet_v2", "torchvision", "shufflenet_v2_x0_5, 64 px", _torchvision("shufflenet_v2_x0_5")),
        Architecture("tv_vit", "torchvision", "VisionTransformer (nn.MultiheadAttention), 32 px, patch 8, "
                     "hidden 64, 2 layers", _torchvision_vit),
        # torch
        Architecture("transformer_encoder", "torch", "nn.TransformerEncoder, batch_first, d_model 64, 2 layers, "
                     "seq 16", _transformer_encoder),
    ]
    return {a.name: a for a in entries}


ARCHITECTURES: dict[str, Architecture] = _catalogue()
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


def build(name: str) -> Built:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid names: {', '.join(ARCHITECTURE_NAMES)}")
    return ARCHITECTURES[name].build()


def _weight_layer_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                               nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    try:
        import_transformers()
        from transformers.pytorch_utils import Conv1D  # GPT-2's transposed Linear
    except ImportError:
        return types
    return types + (Conv1D,)


def count_weight_layers(model: nn.Module) -> int:
    """Linear and conv layers (transformers' Conv1D included); an nn.MultiheadAttention adds its
    packed in_proj as one layer (its out_proj is an nn.Linear, counted as such)."""
    types = _weight_layer_types()
    layers = sum(isinstance(m, types) for m in model.modules())
    return layers + sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
