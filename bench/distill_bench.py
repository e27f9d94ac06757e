"""`python -m edgepasses.bench.distill_bench`: how much of a 50 %-pruned digits CNN's accuracy distillation recovers.

Top-1 on the digits test split of: the original CNN, the pruned graph
(`fold_bn,prune(ratio=0.5,round_to=4)`), and the pruned graph after `distill` from the
original with logits only and with logits plus the feature loss, at each step count
(20 steps is the "flash" estimate the search uses). One thread, seeded: repeatable.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import edgepasses
from edgepasses.distill import distill

from edgepasses.zoo import digits
from edgepasses.zoo import get_model

PIPELINE = "fold_bn,prune(ratio=0.5,round_to=4)"


def train_batches(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = digits.load_digits_split()
    whole = len(data.train_y) // batch_size * batch_size  # the graph is specialised to full batches
    return [(data.train_x[i:i + batch_size], data.train_y[i:i + batch_size]) for i in range(0, whole, batch_size)]


def run(steps: tuple[int, ...] = (20, 300), lr: float = 3e-3, feature_loss: float = 1.0) -> list[str]:
    model = get_model("digits_cnn", batch_size=64)
    train = train_batches(64)
    original = model.accuracy_fn(model.module)
    pruned_gm = edgepasses.compress(model.module, model.example_inputs, PIPELINE)
    pruned = model.accuracy_fn(pruned_gm)
    prune_stats = pruned_gm.edge_report.records[1].stats
    lines = [f"digits_cnn, {PIPELINE} (params {prune_stats['params_before']} -> {prune_stats['params_after']}), "
             f"top-1 on the test split",
             "| model | steps | top-1 % | loss start -> end | seconds |", "|---|---|---|---|---|",
             f"| original | - | {original:.2f} | - | - |", f"| pruned 0.5 | - | {pruned:.2f} | - | - |"]
    for n in steps:
        for label, weight in (("distill, logits", 0.0), ("distill, logits + features", feature_loss)):
            torch.manual_seed(0)
            gm = edgepasses.compress(model.module, model.example_inputs, PIPELINE)
            start = time.perf_counter()
            distill(gm, model.module, train, n, feature_loss=weight, lr=lr)
            seconds = time.perf_counter() - start
            s = gm.edge_distill
            lines.append(f"| {label} | {n} | {model.accuracy_fn(gm):.2f} | {s['loss_start']:.3f} -> "
                         f"{s['loss_end']:.3f} | {seconds:.2f} |")
            if weight and n == steps[-1]:
                lines.append(f"feature layers: {'; '.join(s['feature_layers'])}; skipped: "
                             f"{'; '.join(f'{k}: {v}' for k, v in s['feature_skipped'].items()) or 'none'}")
    feature_note = lines.pop(next(i for i, line in enumerate(lines) if line.startswith("feature layers")))
    return lines + ["", feature_note]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 300])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--feature-loss", type=float, default=1.0)
    parser.add_argument("--md", metavar="PATH", help="write the Markdown to PATH (default: replace the distill-bench "
                        "section of docs/benchmarks.md, when run in a checkout that has it)")
    args = parser.parse_args(argv)
    from .report import Machine, write_markdown

    torch.set_num_threads(1)
    machine = Machine.here()  # before the run adds its own load
    text = "\n".join(run(tuple(args.steps), args.lr, args.feature_loss))
    print(text)
    command = " ".join(["python -m edgepasses.bench.distill_bench", *(sys.argv[1:] if argv is None else argv)])
    write_markdown(args.md, "distill-bench", text + "\n", machine=machine, command=command)


if __name__ == "__main__":
    main()
