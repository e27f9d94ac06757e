"""The canonical form reaches every layer: PyTorch's fused transformer fast paths are decomposed, GPT-2's
Conv1D (addmm), matmuls by constant weights and conv1d become linear / conv2d, exactly in fp32 and
under the module's name; every pass reaches each Linear/conv or names why not, and warns once when it
reaches none."""
import logging

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses.canonical import export_canonical, export_canonical_graph, frozen_copy
from edgepasses.graph_utils import CONV_OPS, LINEAR_OPS, layer_name, weight_layers
from edgepasses.testing import import_transformers

aten = torch.ops.aten
FUSED_OPS = {aten._transformer_encoder_layer_fwd.default, aten._native_multi_head_attention.default}
PASSES = ("quantize", "sparsify_24", "prune(ratio=0.3)", "lowrank(ratio=0.5,min_saving=-1)")
ENCODER_LAYERS = [f"layers.{i}.{name}" for i in range(2)
                  for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")]


def _layer_names(gm) -> list[str]:
    return [layer_name(n) for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS | CONV_OPS]


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _compiled_canonical(model, inputs: tuple):
    """The canonical graphs the `edge` backend builds from Dynamo's graphs, and the compiled output."""
    graphs = []

    def capture(gm, example_inputs):
        frozen, positions = frozen_copy(gm)
        canonical = export_canonical_graph(frozen, [example_inputs[i] for i in positions])
        graphs.append(canonical)
        return lambda *args: canonical(*[args[i] for i in positions])

    with torch.no_grad():
        out = torch.compile(model, backend=capture)(*inputs)
    return graphs, out


def _encoder(norm_first=False, activation="relu", layers=2, batch_first=True):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


class _Masked(nn.Module):
    """One encoder layer called with masks (bool: True is masked)."""

    def __init__(self, padding: bool, causal: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()
        pad = torch.zeros(2, 10, dtype=torch.bool)
        pad[0, -3:] = True  # the first sequence is 7 tokens long
        self.register_buffer("pad", pad if padding else None)
        self.register_buffer("causal", torch.ones(10, 10).triu(1).bool() if causal else None)

    def forward(self, x):
        return self.layer(x, src_mask=self.causal, src_key_padding_mask=self.pad)


# ------------------------------------------------------------------ fused fast paths

@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_fused_encoder_layer_is_decomposed_exactly_with_every_linear(norm_first, activation):
    model, x = _encoder(norm_first, activation), torch.randn(2, 10, 64)
    graphs, out = _compiled_canonical(model, (x,))
    (gm,) = graphs
    assert not _targets(gm) & FUSED_OPS
    assert _layer_names(gm) == ENCODER_LAYERS
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))  # eager takes the fused fast path


@pytest.mark.parametrize("padding, causal", [(True, False), (False, True), (True, True)])
def test_masks_of_the_fused_encoder_layer_keep_their_meaning(padding, causal):
    model, x = _Masked(padding, causal).eval(), torch.randn(2, 10, 64)
    graphs, out = _compiled_canonical(model, (x,))
    assert not any(_targets(gm) & FUSED_OPS for gm in graphs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


class _FusedAttention(nn.Module):
    """nn.MultiheadAttention's fast-path op, called as its fast path calls it."""

    def __init__(self, need_weights: bool, average: bool, padding: bool):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
        self.need_weights, self.average = need_weights, average
        mask = torch.zeros(2, 10)
        mask[1, -4:] = float("-inf")
        self.register_buffer("mask", mask if padding else None)

    def forward(self, x):
        m = self.mha
        return torch._native_multi_head_attention(
            x, x, x, 64, 4, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, self.mask,
            self.need_weights, self.average, None if self.mask is None else 1)


@pytest.mark.parametrize("need_weights, average, padding",
                         [(False, True, False), (False, True, True), (True, True, True), (True, False, False)])
def test_native_multi_head_attention_is_decomposed_exactly(need_weights, average, padding):
    model, x = _FusedAttention(need_weights, average, padding).eval(), torch.randn(2, 10, 64)
    with torch.no_grad():
        gm = export_canonical(model, (x,))
        expected, got = model(x), gm(x)
    assert not _targets(gm) & FUSED_OPS
    assert _layer_names(gm) == ["mha.in_proj", "mha.out_proj"]
    torch.testing.assert_close(got[0], expected[0])
    if need_weights:
        torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_projections_have_names_of_their_own_in_both_entry_points(batch_first):
    model, x = _encoder(batch_first=batch_first), torch.randn(2, 10, 64)
    with torch.no_grad():
        exported = export_canonical(model, (x,))  # torch.export takes the slow path
        torch.testing.assert_close(exported(x), model(x))
    graphs, out = _compiled_canonical(model, (x,))  # Dynamo the fused one where batch_first
    assert _layer_names(exported) == _layer_names(graphs[0]) == ENCODER_LAYERS
    torch.testing.assert_close(out, exported(x))


# ------------------------------------------------------------------ layer forms

def _transformers():
    return pytest.importorskip("transformers") and import_transformers()


class _GPT2(nn.Module):
    def __init__(self):
        super().__init__()
        transformers = _transformers()
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, use_cache=False)
        self.gpt = transformers.GPT2Model(config).eval()

    def forward(self, ids):
        return self.gpt(input_ids=ids, return_dict=False)[0]


def _whisper_encoder():
    transformers = _transformers()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = transformers.WhisperConfig(num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=128, max_source_positions=32, vocab_size=100, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return WhisperEncoder(config).eval()


GPT2_LAYERS = [f"gpt.h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_conv1d_becomes_a_linear_under_its_module_name_in_both_entry_points():
    model, ids = _GPT2().eval(), torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        gm = export_canonical(model, (ids,))
        torch.testing.assert_close(gm(ids), model(ids))
    assert aten.addmm.default not in _targets(gm)
    assert _layer_names(gm) == GPT2_LAYERS
    # the flattening views around Conv1D's addmm are folded: the linear reads [batch, tokens, features]
    assert all(n.args[0].meta["val"].dim() == 3 for n in gm.graph.nodes if n.target is aten.linear.default)
    graphs, out = _compiled_canonical(model, (ids,))
    assert [name for g in graphs for name in _layer_names(g)] == GPT2_LAYERS
    torch.testing.assert_close(out, model(ids))


def test_whisper_conv1d_becomes_conv2d_exactly():
    model, x = _whisper_encoder(), torch.randn(1, 16, 64)
    with torch.no_grad():
        gm = export_canonical(model, (x,))
        torch.testing.assert_close(gm(x)[0], model(x)[0])
    assert aten.conv1d.default not in _targets(gm)
    assert [n for n in _layer_names(gm) if n.startswith("conv")] == ["conv1", "conv2"]


def test_a_batch_norm_after_conv1d_still_folds_into_its_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.Conv1d(16, 8, 3),
                          nn.BatchNorm1d(8)).eval()
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        gm = edgepasses.compress(model, (x,), "fold_bn", target="reference")
        torch.testing.assert_close(gm(x), model(x))
    assert _stats(gm)["folded"] == 2


class _Forms(nn.Module):
    """Weights applied in every form the canonical form rewrites, and a few it cannot."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 8))       # [in, out], as Conv1D keeps it
        self.b = nn.Parameter(torch.randn(8))
        self.w_out_in = nn.Parameter(torch.randn(8, 16))
        self.batched = nn.Parameter(torch.randn(2, 8, 8))
        self.no_bias = nn.Linear(8, 8, bias=False)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv1d(8, 8, 3, padding="same", dilation=2, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):  # [2, 5, 16]
        a = x @ self.w
        b = torch.mm(x[0], self.w)
        c = torch.addmm(self.b, x.view(-1, 16), self.w).view(2, 5, 8)
        d = x @ self.w_out_in.T
        e = torch.bmm(a, self.batched)
        f = self.no_bias(a + c + d)
        g = self.depthwise(self.grouped(f.transpose(1, 2)))
        return b.sum() + e.sum() + self.up(g.unsqueeze(-1)).sum()


def test_matmuls_by_constant_weights_and_conv1d_take_the_linear_and_conv2d_forms_exactly():
    model, x = _Forms().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        gm = export_canonical(model, (x,))
        torch.testing.assert_close(gm(x), model(x))
    forms = {(layer.name, layer.form, layer.unreachable) for layer in weight_layers(gm)}
    assert {(name, form) for name, form, why in forms if why is None} == {
        ("w", "linear"), ("w_out_in", "linear"), ("no_bias", "linear"), ("grouped", "conv2d"),
        ("depthwise", "conv2d")}
    assert {(form, why.split(":")[0]) for _, form, why in forms if why} == {
        ("bmm", "matmul by a constant 3-D weight (one per batch entry)"), ("conv_transpose2d", "transposed convolution")}
    for node in gm.graph.nodes:
        if node.target in LINEAR_OPS | CONV_OPS:
            assert node.meta["val"].shape and node.meta.get("stack_trace")


# ------------------------------------------------------------------ every pass reaches every layer

def _stats(gm):
    return gm.edge_report.records[0].stats


def _reached(gm, step: str) -> set[str]:
    """Names of the layers a pass changed, read from the graph itself."""
    if step == "quantize":
        return {layer_name(n) for n in gm.graph.nodes if n.target in LINEAR_OPS | CONV_OPS
                and "dequantize" in str(getattr(n.args[1], "target", ""))}
    if step == "sparsify_24":
        return {layer_name(n) for n in gm.graph.nodes if n.meta.get("sparse24")}
    return set(_stats(gm)["layers"])


@pytest.mark.parametrize("step", PASSES)
def test_each_pass_reaches_every_gpt2_and_encoder_layer(step):
    for model, x, names in [(_GPT2().eval(), torch.randint(0, 100, (2, 16)), GPT2_LAYERS),
                            (_encoder(), torch.randn(2, 16, 64), ENCODER_LAYERS)]:
        with torch.no_grad():
            gm = edgepasses.compress(model, (x,), step, calibration=[(x,)], target="reference")
        stats = _stats(gm)
        assert stats["skipped"] == {}
        if step.startswith("prune"):  # channels in groups: some are tied to the residual stream, left whole
            assert stats["groups_pruned"] >= 2
        else:
            assert _reached(gm, step.split("(")[0]) == set(names)


def test_prune_reaches_whisper_convs_and_leaves_no_layer_outside_a_group():
    model, x = _whisper_encoder(), torch.randn(1, 16, 64)
    with torch.no_grad():
        gm = edgepasses.compress(model, (x,), "prune(ratio=0.3)", calibration=[(x,)], target="reference")
        gm(x)
    stats = _stats(gm)
    assert stats["skipped"] == {} and stats["groups_pruned"] > 0
    assert any("conv1" in name for name in stats["channels_removed"])


@pytest.mark.parametrize("step", ["sparsify_24", "lowrank(ratio=0.5,min_saving=-1)"])
def test_whisper_convs_are_reached(step):
    model, x = _whisper_encoder(), torch.randn(1, 16, 64)
    with torch.no_grad():
        gm = edgepasses.compress(model, (x,), step, calibration=[(x,)], target="reference")
    assert {"conv1", "conv2"} <= _reached(gm, step.split("(")[0])


def test_forms_no_pass_reaches_are_skipped_with_their_reason():
    model, x = _Forms().eval(), torch.randn(2, 5, 16)
    for step in PASSES:
        with torch.no_grad():
            gm = edgepasses.compress(model, (x,), step, calibration=[(x,)], target="reference")
        skipped = _stats(gm)["skipped"]
        assert skipped["up"] == "transposed convolution", step
        assert skipped["bmm"].startswith("matmul by a constant 3-D weight"), step
        if step == "quantize":  # every Linear and conv form, grouped and depthwise convs included
            assert set(skipped) == {"up", "bmm"}
    assert "depthwise" in _stats(
        edgepasses.compress(model, (x,), "sparsify_24", target="reference"))["skipped"]["depthwise"]


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_recurrent_layers_are_named_as_skipped_beside_the_layers_reached():
    model, x = _Recurrent().eval(), torch.randn(2, 5, 8)
    with torch.no_grad():
        gm = edgepasses.compress(model, (x,), "sparsify_24", target="reference")
    stats = _stats(gm)
    assert list(stats["layers"]) == ["head"]
    assert stats["skipped"] == {"lstm": "recurrent layer: its weights stay inside one fused aten.lstm op"}


class _Upsampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up2(torch.relu(self.up(x)))


@pytest.mark.parametrize("step", PASSES)
def test_a_pass_that_reaches_nothing_warns_once_with_the_forms_it_skipped(step, caplog):
    model, x = _Upsampler().eval(), torch.randn(1, 8, 4, 4)
    with caplog.at_level(logging.WARNING, logger="edgepasses"), torch.no_grad():
        gm = edgepasses.compress(model, (x,), step, calibration=[(x,)], target="reference")
    assert not gm.edge_report.records[0].modified
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "edgepasses"]
    assert "2 conv_transpose2d (transposed convolution)" in warning
