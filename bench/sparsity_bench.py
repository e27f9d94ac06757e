"""Does 2:4 sparsity buy time on the reference target, and what does it cost in accuracy?

    python -m edgepasses.bench.sparsity_bench [--rounds N] [--warmup N] [--only a,b,c]

(a) the BERT-style encoder, batch 1: eager fp32 vs the reference target dense vs the reference
    target after `sparsify_24` (its Linears on `edge::sparse24_linear`), end to end, one run;
(b) the digits CNN: top-1 with magnitude vs activation-aware (Wanda) masks, no fine-tuning;
(c) the BERT encoder: output SQNR of magnitude vs activation-aware masks on held-out batches;
(d) torch.nn.TransformerEncoder (4 layers, d 768), batch 1: as (a), under torch.compile (its fused fast path).
Latency: medians with min–max over interleaved rounds (`timing.measure_side_by_side`).
"""
from __future__ import annotations

import torch

import edgepasses
from edgepasses.graph_utils import SPARSE24, constant_value
from edgepasses.measure.timing import measure_side_by_side
from edgepasses.quant.sensitivity import output_sqnr
from edgepasses.zoo import get_model
from edgepasses.zoo.digits import load_digits_split

from .architectures import count_weight_layers
from .sections import run_sections


def _stats(gm) -> dict:
    return next(r.stats for r in gm.edge_report.records if r.step.startswith("sparsify_24"))


def bench_bert_speed(warmup: int, rounds: int) -> list[str]:
    zoo = get_model("bert_encoder", 1)
    return _speed(f"(a) {zoo.description}, batch 1", zoo.module, zoo.example_inputs, zoo.calibration(4),
                  warmup, rounds)


def bench_transformer_encoder_speed(warmup: int, rounds: int) -> list[str]:
    """torch.nn.TransformerEncoder as users build it, through torch.compile: in eval mode without grad Dynamo
    records PyTorch's fused fast path, which the canonical form decomposes so that sparsify_24 sees its
    Linears."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(768, 12, batch_first=True)
    module = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    args = (torch.randn(1, 128, 768),)
    calibration = [(torch.randn(1, 128, 768),) for _ in range(4)]
    programs, compilations = {}, {}
    for name, pipeline in (("reference, dense", "dce"), ("reference, sparsify_24", "sparsify_24"),
                           ("reference, quantize (int8)", "quantize")):
        compilations[name] = []
        programs[name] = torch.compile(module, backend="edge", options={
            "pipeline": pipeline, "target": "reference", "calibration": calibration,
            "on_compile": compilations[name].append})
    with torch.no_grad():
        for program in programs.values():
            program(*args)  # compiles
    sparse = compilations["reference, sparsify_24"][0]
    stats = next(r.stats for r in sparse.report.records if r.step.startswith("sparsify_24"))
    int8 = compilations["reference, quantize (int8)"][0]
    quantized = next(r.stats for r in int8.report.records if r.step.startswith("quantize"))
    return _timed("(d) torch.nn.TransformerEncoder (4 layers, d 768, 12 heads, ffn 2048, seq 128), batch 1, "
                  "torch.compile", {"eager fp32": module, **programs}, args,
                  f"sparsify_24: {stats['layers_sparsified']} of the model's {count_weight_layers(module)} Linear "
                  f"layers masked (nn.MultiheadAttention's packed q/k/v in_proj is one), "
                  f"{sparse.lowering.sparse24_ops} on edge::sparse24_linear; quantize: "
                  f"{quantized['linear_conv_quantized']} Linear layers int8, {int8.lowering.int8_ops} on our int8 "
                  "kernels", warmup, rounds)


def _speed(title: str, module, args: tuple, calibration: list, warmup: int, rounds: int) -> list[str]:
    """Eager vs the reference target dense vs after sparsify_24 (compress + lower)."""
    dense = edgepasses.lower(edgepasses.compress(module, args, "dce"), args, target="reference")
    sparse_gm = edgepasses.compress(module, args, "sparsify_24", calibration=calibration)
    sparse = edgepasses.lower(sparse_gm, args, target="reference")
    summary = (f"sparsify_24: {_stats(sparse_gm)['layers_sparsified']} of the model's {count_weight_layers(module)} "
               f"Linear layers masked, {sparse.edge_lowering.sparse24_ops} on edge::sparse24_linear")
    return _timed(title, {"eager fp32": module, "reference, dense": dense, "reference, sparsify_24": sparse}, args,
                  summary, warmup, rounds)


def _timed(title: str, candidates: dict, args: tuple, summary: str, warmup: int, rounds: int) -> list[str]:
    """The candidates interleaved in one run, as ratios to eager and to the reference target dense."""
    with torch.no_grad():
        timings = measure_side_by_side({k: (lambda fn=fn: fn(*args)) for k, fn in candidates.items()}, warmup,
                                       rounds)
    base, own = timings["eager fp32"].median_ms, timings["reference, dense"].median_ms
    lines = [f"## {title}: latency", "", summary, "",
             "| graph | median ms | min–max | vs eager fp32 | vs reference dense |", "|---|---:|---|---:|---:|"]
    lines += [f"| {name} | {t.median_ms:.2f} | {t.min_ms:.2f}–{t.max_ms:.2f} | {base / t.median_ms:.2f}x | "
              f"{own / t.median_ms:.2f}x |" for name, t in timings.items()]
    return lines


def _train_batches(batch_size: int) -> list[tuple]:
    data = load_digits_split()
    usable = len(data.train_x) // batch_size * batch_size
    return list(zip(data.train_x[:usable].split(batch_size), data.train_y[:usable].split(batch_size)))


def _finetuned(gm, steps: int) -> float:
    """Fine-tunes `gm` (one thread: a tiny model trains faster so on a few shared cores) and checks the mask held."""
    zeros = [w == 0 for w in _masked_weights(gm)]
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        edgepasses.finetune(gm, _train_batches(64), steps=steps, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    assert all((w[z] == 0).all() for w, z in zip(_masked_weights(gm), zeros)), "fine-tuning refilled a mask"
    return steps


def _masked_weights(gm) -> list[torch.Tensor]:
    return [constant_value(gm, n.args[1]) for n in gm.graph.nodes if n.meta.get(SPARSE24)]


def bench_digits(steps: int = 400) -> list[str]:
    zoo = get_model("digits_cnn", 64)  # graphs specialised to the fine-tuning batch
    calibration = zoo.calibration(16)
    lines = ["## (b) digits CNN (trained), top-1 % on the test split", "",
             f"| masks | logit SQNR dB | top-1 % | after {steps} fine-tuning steps (masks kept) | layers masked |",
             "|---|---:|---:|---:|---|", f"| none (original) | - | {zoo.accuracy_fn(zoo.module):.2f} | - | - |"]
    test_x = load_digits_split().test_x
    held_out = [(x,) for x in test_x[: len(test_x) // 64 * 64].split(64)]
    for criterion, data in (("magnitude", None), ("activation", calibration)):
        gm = edgepasses.compress(zoo.module, zoo.example_inputs, f"fold_bn,sparsify_24(criterion={criterion})",
                                 calibration=data)
        sqnr, before = output_sqnr(zoo.module, gm, held_out), zoo.accuracy_fn(gm)
        _finetuned(gm, steps)
        lines.append(f"| {criterion} | {sqnr:.2f} | {before:.2f} | {zoo.accuracy_fn(gm):.2f} | "
                     f"{', '.join(_stats(gm)['layers'])} |")
    skipped = _stats(gm)["skipped"]
    return lines + ["", "left dense: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]


def bench_bert_sqnr() -> list[str]:
    zoo = get_model("bert_encoder", 1)
    data = zoo.calibration(16)
    calibration, held_out = data[:8], data[8:]
    lines = [f"## (c) {zoo.description}: output SQNR vs float on 8 held-out batches", ""]
    for criterion, batches in (("magnitude", None), ("activation", calibration)):
        gm = edgepasses.compress(zoo.module, zoo.example_inputs, f"sparsify_24(criterion={criterion})",
                                 calibration=batches)
        lines.append(f"{criterion:>10}: {output_sqnr(zoo.module, gm, held_out):6.2f} dB")
    return lines


def main(argv: list[str] | None = None) -> None:
    run_sections("2:4 sparsity bench", __doc__.split("\n")[0], lambda warmup, rounds: {
        "a": lambda: bench_bert_speed(warmup, rounds), "b": bench_digits, "c": bench_bert_sqnr,
        "d": lambda: bench_transformer_encoder_speed(warmup, rounds)}, argv)


if __name__ == "__main__":
    main()
