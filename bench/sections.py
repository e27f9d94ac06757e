"""The command line of the sectioned bench scripts (lowrank_bench, sparsity_bench)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch


def run_sections(title: str, description: str, make_sections: Callable[[int, int], dict[str, Callable[[], list[str]]]],
                 argv: list[str] | None = None) -> None:
    """The command line of a sectioned bench script: `--rounds`, `--warmup`, `--only a,b,...`; prints each
    section's lines as it finishes, with its wall time and the load average (timings are only as quiet as that)."""
    probe = make_sections(0, 0)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", default=",".join(probe), help="comma-separated sections to run")
    parser.add_argument("--md", metavar="PATH", help="write the Markdown to PATH (default: replace this script's "
                        "section of docs/benchmarks.md, when run in a checkout that has it)")
    args = parser.parse_args(argv)
    from .report import Machine, write_markdown

    machine = Machine.here()  # before the run adds its own load
    sections = make_sections(args.warmup, args.rounds)
    written: list[str] = []
    print(f"# {title} (torch threads {torch.get_num_threads()}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    for key in args.only.split(","):
        start = time.perf_counter()
        lines = sections[key]()
        print("\n".join(lines))
        print(f"\n({time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f})\n", flush=True)
        written += [*lines, "", f"({time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} at its end)", ""]
    name = "-".join(title.lower().replace(":", "").split())  # "2:4 sparsity bench" -> "24-sparsity-bench"
    module = sys.modules["__main__"].__spec__.name if getattr(sys.modules["__main__"], "__spec__", None) else title
    doc = write_markdown(args.md, name, "\n".join(written), machine=machine,
                         command=" ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)]))
    if doc is not None:
        print(f"wrote {doc}", file=sys.stderr)
