"""Small transformers decoders on OpenVINO and the reference target, and the partitioning
they exposed: quantize/dequantize pairs kept together, OpenVINO programs fed by input name."""
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the quantized_decomposed ops)
from torch import nn

from edgepasses.analysis.sqnr import sqnr_db
from edgepasses.backends.partition import lower_by_partition, quant_groups, with_quant_partners
from edgepasses.canonical import export_canonical
from edgepasses.testing import import_transformers
from edgepasses.testing.unconvertible import WithMysteryOp

pytest.importorskip("transformers")
transformers = import_transformers()
qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
VOCAB, TOKENS = 100, 16


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama() -> nn.Module:
    """GQA (4 query heads, 2 key/value heads), RoPE and a KV cache."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(seed))


def compile_and_run(model: nn.Module, target: str, pipeline: str):
    torch._dynamo.reset()
    options = {"pipeline": pipeline, "target": target, "on_compile": (seen := []).append}
    if "quantize" in pipeline:
        options["calibration"] = [(tokens(seed),) for seed in range(1, 5)]
    x = tokens(0)
    with torch.no_grad():
        ref, out = model(x).logits, torch.compile(model, backend="edge", options=options)(x).logits
    return ref, out, seen[0].lowering


MODELS = {"gpt2": gpt2, "llama": llama}
CASES = [pytest.param(m, t, id=f"{m}-{t}") for m in MODELS for t in ("openvino", "reference")]


def _skip_without(target: str) -> None:
    if target == "openvino":
        pytest.importorskip("openvino")


@pytest.mark.parametrize("name, target", CASES)
def test_fp32_decoder_matches_eager_in_one_program(name, target):
    _skip_without(target)
    torch.manual_seed(0)
    ref, out, lowering = compile_and_run(MODELS[name](), target, "fold_bn")
    assert (ref - out).abs().max().item() <= 1e-4
    assert lowering.partitions == 1 and lowering.fallbacks == []


@pytest.mark.parametrize("name, target", CASES)
def test_int8_decoder_runs_whole_with_its_sqnr(name, target):
    _skip_without(target)
    torch.manual_seed(0)
    ref, out, lowering = compile_and_run(MODELS[name](), target, "fold_bn,quantize")
    sqnr = sqnr_db(ref, out)
    print(f"{name} int8 on {target}: SQNR {sqnr:.1f} dB vs fp32, {lowering.int8_ops} int8 ops")
    assert sqnr >= 20, sqnr  # random-init weights: ~31-35 dB measured
    assert lowering.partitions == 1 and lowering.fallbacks == [] and lowering.int8_ops >= 9


class SharedQuantizedInput(nn.Module):
    """One quantized input read by two linears, with a relu (the op a test marks unsupported)
    between the first linear and the add that joins them: the partitioner cannot put both
    dequantizes in one partition without a cycle through the relu."""

    def __init__(self, overload: str):
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        self.overload = overload
        self.register_buffer("scale", torch.tensor(0.05))
        self.register_buffer("zero_point", torch.tensor(128))

    def _qparams(self):
        if self.overload == "tensor":
            return self.scale, self.zero_point
        return 0.05, 128

    def forward(self, x):
        scale, zero_point = self._qparams()
        quantize = getattr(qd.quantize_per_tensor, self.overload)
        dequantize = getattr(qd.dequantize_per_tensor, self.overload)
        codes = quantize(x, scale, zero_point, 0, 255, torch.uint8)
        a = torch.relu(self.first(dequantize(codes, scale, zero_point, 0, 255, torch.uint8)))
        return a + self.second(dequantize(codes, scale, zero_point, 0, 255, torch.uint8))


def _partition_boundaries(lowered: torch.fx.GraphModule, prefix: str) -> list:
    """meta['val'] of every value that enters or leaves a partition."""
    values = []
    for node in lowered.graph.nodes:
        if node.op == "call_module" and node.target.startswith(prefix):
            values += [a.meta["val"] for a in node.all_input_nodes]
            values += [u.meta["val"] for u in node.users]
    return values


def _quantized_graph(overload: str):
    model, x = SharedQuantizedInput(overload).eval(), torch.randn(2, 8)
    gm = torch.export.export(model, (x,)).module()
    return model, x, gm, next(n for n in gm.graph.nodes if n.target == aten.relu.default)


@pytest.mark.parametrize("overload", ["default", "tensor"])
def test_partitioner_gives_each_partition_its_own_quantize(overload):
    model, x, gm, relu = _quantized_graph(overload)
    lowered = lower_by_partition(gm, {relu: "marked unsupported by the test"}, lambda sub, _: sub, prefix="part_")
    boundaries = _partition_boundaries(lowered, "part_")
    assert boundaries and all(v.dtype != torch.uint8 for v in boundaries)  # no u8 codes cross a boundary
    for name, sub in lowered.named_children():
        if name.startswith("part_"):
            for group in quant_groups(sub):  # each quantize sits with every dequantize reading it
                assert all(n.graph is sub.graph for n in group)
    torch.testing.assert_close(lowered(x), model(x))


def test_partner_of_an_unsupported_dequantize_stays_in_pytorch_and_is_reported():
    model, x, gm, _ = _quantized_graph("default")
    dequantize = next(n for n in gm.graph.nodes if n.target == qd.dequantize_per_tensor.default)
    unsupported = with_quant_partners(gm, {dequantize: "marked unsupported by the test"})
    kept = {n.target for n in unsupported}
    assert qd.quantize_per_tensor.default in kept and "partner" in unsupported[dequantize.args[0]]
    lowered = lower_by_partition(gm, unsupported, lambda sub, _: sub, prefix="part_")
    assert all(v.dtype != torch.uint8 for v in _partition_boundaries(lowered, "part_"))
    assert {n.target for n in lowered.graph.nodes} >= {qd.quantize_per_tensor.default,
                                                      qd.dequantize_per_tensor.default}
    torch.testing.assert_close(lowered(x), model(x))


class ReadsFirstInputOnlyForItsDtype(WithMysteryOp):
    """`y.to(torch.float32)` on a float y exports as `_assert_tensor_metadata(y)` alone: the second
    partition takes y as its first input, and OpenVINO's converter drops it."""

    def forward(self, y, x):
        y = y.to(torch.float32)
        return super().forward(x)


def test_partition_program_takes_only_the_inputs_openvino_kept():
    pytest.importorskip("openvino")
    from edgepasses.backends.openvino import OpenVINOProgram, OpenVINOTarget

    torch.manual_seed(0)
    model, args = ReadsFirstInputOnlyForItsDtype().eval(), (torch.randn(1, 4), torch.randn(1, 3, 12, 12))
    lowered = OpenVINOTarget().lower(export_canonical(model, args), args)
    programs = [m for m in lowered.children() if isinstance(m, OpenVINOProgram)]
    fewer = [p for p in programs if len(p.input_positions) < len(p.exported.graph_signature.user_inputs)]
    assert len(programs) == 2 and fewer, [p.input_positions for p in programs]
    with torch.no_grad():
        torch.testing.assert_close(lowered(*args), model(*args), rtol=1e-5, atol=1e-5)


class CacheAndGroupedAttention(nn.Module):
    """The two forms OpenVINO's frontend rejects, as transformers writes them: a cache that starts
    as `torch.tensor([])` and grows by `cat(dim=-2)`, and attention with `enable_gqa=True`."""

    def forward(self, q, k, v):
        k = torch.cat([torch.tensor([]), k], dim=-2)
        v = torch.cat([torch.tensor([]), v], dim=-2)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), k


def test_empty_cache_cat_and_grouped_attention_convert_in_one_program():
    pytest.importorskip("openvino")
    args = (torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    model, seen = CacheAndGroupedAttention(), []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="edge", options={"target": "openvino", "strict": True,
                                                             "on_compile": seen.append})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-5, atol=1e-5)
    assert seen[0].lowering.partitions == 1
