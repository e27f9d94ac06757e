"""The `edgepasses` command.

    edgepasses bench --model resnet18 --pipeline edge-fp32 [--peer nncf] [--json PATH] [--md PATH]
    edgepasses bench --model mypkg.models:build --input-shape 1,3,224,224   # your model (or a .pt2), same table
    edgepasses bench kernels [--op int8_linear] [--shape 16,4096,4096]   # each edge:: op vs OpenVINO, torch
    edgepasses bench coverage [--model bert ...] [--column int8-openvino ...] [--md docs/coverage.md]  # matrix
    edgepasses bench accuracy [--pipeline P ...] [--section sentence|digits|charlm|control ...] [--md docs/accuracy.md]
    edgepasses bench hostile [--area options ...]   # the hostile-input suite: counts by outcome (source tree)
    edgepasses bench transformers [--model minilm_l6 ...] [--tokens 8,64 ...]   # int8 vs every peer, profiled
    edgepasses compress mypkg.models:build --input-shape 1,3,224,224 --pipeline fold_bn,quantize \\
        --calibration calib.pt --target openvino --out out/   # your own model (or a .pt2) -> an artifact
    edgepasses passes [--markdown]   # registered passes, each option described, and the presets
    edgepasses demo        # every zoo model: eager, OpenVINO fp32, NNCF int8, edge int8, edge pipeline="auto"
    edgepasses report --model bert_encoder [--min-sqnr 30]   # int8 sensitivity, layers ranked
    edgepasses search --model digits_resnet18 --budget accuracy_drop=1 --trials 60 --out runs/r18  # Pareto front
    edgepasses report runs/r18                                # the search report (Markdown, HTML, PNG)
    edgepasses compare --model bert_encoder --pipeline quantize --pipeline "smooth,quantize"  # SQNR
    edgepasses onnx --model resnet18 --pipeline "fold_bn,quantize" [--out r18.onnx]   # Q/DQ ONNX, checked
    edgepasses prune-check [--model resnet18 ...] [--ratio 0.3 ...] [--md PATH]  # pruned shapes, OpenVINO

Without --md, the bench commands and prune-check replace their own section of docs/benchmarks.md
when run in a checkout that has it (bench/report.py: machine, load average, date and commit on top).
The benchmark modules (torchvision, OpenVINO) are imported only by the subcommands that need them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import EdgeError, OptionError, first_line
from .pipeline import DEFAULT_PIPELINE, Pipeline


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the subcommand, what is wrong), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (a count of rounds, batches, trials)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _passes(args: argparse.Namespace) -> int:
    from .pass_docs import passes_markdown, passes_text

    print(passes_markdown() if args.markdown else passes_text())
    return 0


def _is_user_model(spec: str) -> bool:
    """`package.module:factory` or a .pt2 file (edgepasses compress's MODEL), not a zoo name."""
    return ":" in spec or spec.endswith(".pt2")


def _check_bench_args(args: argparse.Namespace, user_models: bool = False) -> None:
    """Fail fast, before any model is built, on an unknown model or a bad pipeline."""
    from edgepasses.zoo import ZOO_NAMES

    unknown = [name for name in args.model
               if name not in ZOO_NAMES and not (user_models and _is_user_model(name))]
    if unknown:
        yours = ", package.module:factory or a .pt2 file" if user_models else ""
        args.parser.error(f"unknown model(s) {', '.join(unknown)}; valid models: {', '.join(ZOO_NAMES)}{yours}")
    for pipeline in args.pipeline:
        try:
            Pipeline.parse(pipeline)
        except OptionError as exc:
            args.parser.error(str(exc))


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is M,K,N (e.g. 16,4096,4096); got {text!r}") from None
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"shape dims must be positive; got {text!r}")
    return m, k, n


def _bench_kernels(args: argparse.Namespace) -> int:
    from edgepasses.bench.kernels import DEFAULT_SHAPES, OPS, bench_kernels, to_markdown

    unknown = [op for op in args.op if op not in OPS]
    if unknown:
        args.parser.error(f"unknown op(s) {', '.join(unknown)}; valid ops: {', '.join(OPS)}")
    rows = bench_kernels(args.op or list(OPS), args.shape or list(DEFAULT_SHAPES), args.warmup, args.rounds,
                         json_path=args.json)
    text = to_markdown(rows)
    print(text)
    _write_md(args, "kernels", text + "\n")
    return 0


def _bench_coverage(args: argparse.Namespace) -> int:
    from edgepasses.bench.architectures import ARCHITECTURE_NAMES
    from edgepasses.bench.coverage import COLUMN_NAMES, run_matrix, stderr_progress

    for kind, given, valid in (("model", args.model, ARCHITECTURE_NAMES), ("column", args.column, COLUMN_NAMES)):
        unknown = [name for name in given if name not in valid]
        if unknown:
            args.parser.error(f"unknown {kind}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return _emit(args, run_matrix(args.model, args.column, progress=stderr_progress))


def _emit(args: argparse.Namespace, result: Any) -> int:
    """A bench result (with to_markdown/to_json) on stdout, and in the --md/--json files asked for."""
    text = result.to_markdown()
    print(text)
    _write_md(args, args.suite, text)
    if args.json:
        Path(args.json).write_text(result.to_json())
    return 0


def _bench_accuracy(args: argparse.Namespace) -> int:
    from edgepasses.bench.accuracy import DEFAULT_PIPELINES, DEFAULT_ROUNDS, SECTIONS, run_accuracy
    from edgepasses.bench.coverage import stderr_progress

    args.pipeline = args.pipeline or list(DEFAULT_PIPELINES)
    _check_bench_args(args)
    return _emit(args, run_accuracy(args.pipeline, args.section or SECTIONS, warmup=args.warmup,
                                    rounds=DEFAULT_ROUNDS if args.rounds is None else args.rounds,
                                    progress=stderr_progress))


def _bench_hostile(args: argparse.Namespace) -> int:
    from edgepasses.bench.coverage import stderr_progress
    from edgepasses.bench.hostile import run_hostile

    summary = run_hostile(stderr_progress, areas=args.area or None)
    _emit(args, summary)
    return 0 if summary.ok else 1


def _parse_tokens(text: str) -> tuple[int, int]:
    try:
        batch, tokens = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"BATCH,TOKENS (e.g. 8,64); got {text!r}") from None
    if min(batch, tokens) < 1:
        raise argparse.ArgumentTypeError(f"batch and tokens must be positive; got {text!r}")
    return batch, tokens


def _bench_transformers(args: argparse.Namespace) -> int:
    from edgepasses.bench.coverage import stderr_progress
    from edgepasses.bench.transformers import (DEFAULT_MODELS, DEFAULT_PIPELINES, DEFAULT_ROUNDS, DEFAULT_SHAPES,
                                               DEFAULT_WARMUP, check_choices, run_transformers)

    try:
        check_choices(args.model, args.tokens)
    except ValueError as error:
        args.parser.error(str(error))
    args.pipeline = args.pipeline or list(DEFAULT_PIPELINES)
    _check_bench_args(argparse.Namespace(**{**vars(args), "model": []}))  # the pipelines
    return _emit(args, run_transformers(args.model or DEFAULT_MODELS, args.tokens or DEFAULT_SHAPES, args.pipeline,
                                        warmup=DEFAULT_WARMUP if args.warmup is None else args.warmup,
                                        rounds=DEFAULT_ROUNDS if args.rounds is None else args.rounds,
                                        progress=stderr_progress))


def _write_md(args: argparse.Namespace, section: str, text: str) -> None:
    """--md PATH: the Markdown in PATH; without it, this command's section of docs/benchmarks.md when run
    in a checkout that has it (bench/report.py), headed by the machine and load taken at the start."""
    from edgepasses.bench.report import write_markdown

    written = write_markdown(args.md, section, text, machine=getattr(args, "machine", None),
                             command=" ".join(["edgepasses", *sys.argv[1:]]))
    if written is not None and not args.md:
        print(f"wrote section {section!r} of {written}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> int:
    from edgepasses.bench.report import Machine

    args.machine = Machine.here()  # before the run adds its own load
    if args.suite == "transformers":
        return _bench_transformers(args)
    args.warmup = 10 if args.warmup is None else args.warmup  # transformers' default is smaller
    if args.suite == "accuracy":
        return _bench_accuracy(args)
    if args.suite == "hostile":
        return _bench_hostile(args)
    args.rounds = 50 if args.rounds is None else args.rounds  # accuracy's default is smaller
    if args.suite == "kernels":
        return _bench_kernels(args)
    if args.suite == "coverage":
        return _bench_coverage(args)
    if not args.model:
        args.parser.error("bench models needs --model (repeatable)")
    args.pipeline = args.pipeline or [DEFAULT_PIPELINE]
    _check_bench_args(args, user_models=True)
    from edgepasses.bench.runner import bench_model

    models = _bench_models(args)
    results = []
    for model in models:
        results.append(bench_model(model, args.pipeline, batch_size=args.batch, target=args.target,
                                   precision=args.precision, warmup=args.warmup, rounds=args.rounds,
                                   progress=True, peers=tuple(args.peer), direct=args.direct))
        print(results[-1].to_markdown() + "\n", flush=True)  # each table as soon as it is measured
    if args.md or models == args.model:  # the user's own models stay out of docs/benchmarks.md
        _write_md(args, "models", "\n\n".join(r.to_markdown() for r in results) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    return 0


def _bench_models(args: argparse.Namespace) -> list:
    """--model as bench_model takes it: zoo names, and the user's models loaded now, so that a bad model,
    shape or file fails before anything is measured."""
    from edgepasses.bench.runner import user_model

    if (args.input_shape or args.calibration) and not any(map(_is_user_model, args.model)):
        args.parser.error("--input-shape and --calibration are for a package.module:factory or .pt2 model")
    return [user_model(m, args.input_shape, args.calibration) if _is_user_model(m) else m for m in args.model]


def _demo(args: argparse.Namespace) -> int:
    from edgepasses.bench.demo import main as demo_main

    return demo_main()


def _report(args: argparse.Namespace) -> int:
    if args.run_dir:
        from .search.report import write_report

        _check_run_dir(args.run_dir)
        paths = write_report(args.run_dir)
        print(Path(paths["md"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    if not args.model:
        args.parser.error("report needs a search run directory or --model (the int8 sensitivity report)")
    from edgepasses.bench.quant_report import quant_report_for
    from edgepasses.zoo import ZOO_NAMES

    if args.model not in ZOO_NAMES:
        args.parser.error(f"unknown model {args.model}; valid models: {', '.join(ZOO_NAMES)}")
    print(quant_report_for(args.model, args.pipeline, args.batches, args.min_sqnr))
    return 0


# What a search run's search.json must hold for its report (search/run.py, search/report.py index them).
_RUN_KEYS = ("objectives", "target")


def _check_run_dir(run_dir: str) -> None:
    """A search run directory whose search.json the report can read, else an OptionError saying what is wrong."""
    from .search.study import META, read_meta

    where = f"{Path(run_dir) / META}"
    try:
        meta = read_meta(run_dir)
    except json.JSONDecodeError as exc:
        raise OptionError(f"{where} is not valid JSON ({exc}); `edgepasses search --out {run_dir}` writes it") from None
    missing = [key for key in _RUN_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise OptionError(f"{where} lacks {', '.join(missing)}: it is no complete search run; `edgepasses search "
                          f"--out {run_dir}` writes it")


def _compare(args: argparse.Namespace) -> int:
    _check_bench_args(args)
    from edgepasses.bench.quant_report import compare_sqnr

    for name in args.model:
        print(compare_sqnr(name, args.pipeline, args.batches) + "\n", flush=True)
    return 0


def _add_compare_parser(subparsers: Any) -> None:
    compare = subparsers.add_parser("compare", help="output SQNR vs float of several pipelines on zoo models")
    compare.add_argument("--model", action="append", required=True, help="zoo model name; repeatable")
    compare.add_argument("--pipeline", action="append", required=True, help="pipeline text; repeatable")
    compare.add_argument("--batches", type=_at_least(1), default=8, help="calibration batches (as many held out)")
    compare.set_defaults(handler=_compare, parser=compare)


def _compress(args: argparse.Namespace) -> int:
    import torch

    import edgepasses

    from .backends import saving_target
    from .user_model import example_inputs, load_calibration, load_model

    model, carried = load_model(args.model)
    inputs = example_inputs(args.input_shape, carried, args.model)
    calibration = load_calibration(args.calibration, inputs)
    gm = edgepasses.compress(model, inputs, args.pipeline, calibration=calibration, target=args.target)
    print(gm.edge_report)
    with torch.no_grad():
        program = edgepasses.lower(gm, inputs, target=args.target)
    lowering = program.edge_lowering
    print(f"target {lowering.target} ({lowering.precision}): {lowering.partitions} partition(s), "
          f"{lowering.int8_ops} int8 op(s), {len(lowering.fallbacks)} op(s) left to PyTorch\n"
          f"{lowering.placement_text()}")
    # The target's own program is saved with the graph where its target stores one (OpenVINO, TVM).
    kept = saving_target(program)
    saved = edgepasses.save(gm, args.out, inputs, target_artifact=kept.name if kept else False, program=program)
    print(f"saved {saved}")
    return 0


def _add_compress_parser(subparsers: Any) -> None:
    compress = subparsers.add_parser("compress", help="compress your own model and save it as an artifact "
                                                      "(edgepasses.load runs it)")
    compress.add_argument("model", help="package.module:factory (a callable returning an nn.Module, imported "
                                        "from the current directory or PYTHONPATH) or a .pt2 file from "
                                        "torch.export.save")
    compress.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,...",
                          help="shape of one float32 input; repeat per input (a .pt2's own inputs otherwise)")
    compress.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline text (default: {DEFAULT_PIPELINE})")
    compress.add_argument("--target", type=_target_spec, default="auto", help="target to lower to (default: auto)")
    compress.add_argument("--calibration", metavar="FILE",
                          help="torch.save'd list of input tuples, loaded with weights_only=True")
    compress.add_argument("--out", required=True, metavar="DIR", help="artifact directory (edgepasses.save)")
    compress.set_defaults(handler=_compress, parser=compress)


def _onnx(args: argparse.Namespace) -> int:
    args.model, args.pipeline = [args.model], [args.pipeline]
    _check_bench_args(args)
    from edgepasses.bench.onnx_check import onnx_check

    print(onnx_check(args.model[0], args.pipeline[0], args.batches, args.out))
    return 0


def _add_onnx_parser(subparsers: Any) -> None:
    onnx = subparsers.add_parser("onnx", help="export a zoo model's compressed graph to ONNX (Q/DQ) and "
                                              "check it in onnxruntime")
    onnx.add_argument("--model", required=True, help="zoo model name")
    onnx.add_argument("--pipeline", default="fold_bn,quantize", help="pipeline text")
    onnx.add_argument("--batches", type=_at_least(1), default=8, help="calibration batches")
    onnx.add_argument("--out", metavar="PATH", help="keep the ONNX file here")
    onnx.set_defaults(handler=_onnx, parser=onnx)


def _check_prune_check_args(args: argparse.Namespace) -> tuple[list[float], str]:
    """Defaults filled in; fail before any model is built on a bad model, ratio or pipeline."""
    from edgepasses.bench.prune_check import DEFAULT_MODELS, DEFAULT_RATIOS, prune_step_index

    args.model = args.model or list(DEFAULT_MODELS)
    ratios, template = args.ratio or list(DEFAULT_RATIOS), args.pipeline
    if "{ratio}" not in template:
        args.parser.error(f"--pipeline must contain '{{ratio}}' (where each --ratio goes); got {template!r}")
    args.pipeline = [template.format(ratio=r) for r in ratios]  # parsed as the runs will parse them
    _check_bench_args(args)
    try:
        prune_step_index(args.pipeline[0])
    except ValueError as exc:
        args.parser.error(str(exc))
    return ratios, template


def _prune_check(args: argparse.Namespace) -> int:
    from edgepasses.bench.prune_check import prune_check, to_markdown
    from edgepasses.bench.report import Machine

    ratios, template = _check_prune_check_args(args)
    args.machine = Machine.here()  # before the run adds its own load
    checks, errors = prune_check(args.model, ratios, template, progress=lambda line: print(line, flush=True))
    text = to_markdown(checks) if checks else "no model passed"
    if errors:
        text += "\n\nFailed:\n" + "\n".join(f"- {e}" for e in errors)
    print("\n" + text)
    _write_md(args, "prune-check", text + "\n")
    return 1 if errors else 0


def _add_prune_check_parser(subparsers: Any) -> None:
    check = subparsers.add_parser("prune-check", help="prune zoo models at several ratios; check shapes and "
                                                      "OpenVINO against the reference target")
    check.add_argument("--model", action="append", default=[],
                       help="zoo model name; repeatable (default: resnet18, resnet50, mobilenet_v2, "
                            "densenet121, shufflenet_v2, bert_encoder, regnet_x_400mf)")
    check.add_argument("--ratio", action="append", type=float, default=[],
                       help="prune ratio; repeatable (default: 0.3 and 0.5)")
    # Spelled out (as prune_check.DEFAULT_PIPELINE) so that building the parser stays light.
    check.add_argument("--pipeline", default="fold_bn,prune(ratio={ratio},round_to=8)",
                       help="pipeline text with {ratio} where each ratio goes (default: %(default)s)")
    check.add_argument("--md", metavar="PATH", help="write the Markdown table to PATH (default: replace the "
                       "prune-check section of docs/benchmarks.md, when run in a checkout that has it)")
    check.set_defaults(handler=_prune_check, parser=check)


def _add_report_parser(subparsers: Any) -> None:
    report = subparsers.add_parser("report", help="RUN_DIR: a search's report (Markdown, HTML, Pareto PNG); "
                                                  "--model: int8 sensitivity of a zoo model, ranked")
    report.add_argument("run_dir", nargs="?", help="a search run directory (edgepasses search --out)")
    report.add_argument("--model", help="zoo model name (sensitivity report)")
    report.add_argument("--pipeline", default="fold_bn,quantize", help="a pipeline with a quantize step")
    report.add_argument("--batches", type=_at_least(1), default=8, help="calibration = evaluation batches")
    report.add_argument("--min-sqnr", type=float, default=None,
                        help="also show which layers quantize(min_sqnr=...) keeps in float")
    report.set_defaults(handler=_report, parser=report)


def _target_spec(text: str) -> str:
    from .backends import parse_target_names

    try:
        parse_target_names(text)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _add_bench_parser(subparsers: Any) -> None:
    from .backends import target_names
    from .backends.openvino import PRECISIONS

    bench = subparsers.add_parser("bench", help="models: latency, size and accuracy of zoo models, eager vs "
                                                "OpenVINO direct (and NNCF int8) vs edge pipelines; kernels: "
                                                "each edge:: op vs OpenVINO and torch per shape; coverage: "
                                                "which architectures each pipeline compiles, reaches, and "
                                                "at what error; accuracy: what int8 costs on real weights, "
                                                "edge pipelines vs NNCF, on OpenVINO; hostile: the hostile-"
                                                "input suite, counted by outcome")
    bench.add_argument("suite", nargs="?", choices=("models", "kernels", "coverage", "accuracy", "hostile",
                                                   "transformers"),
                       default="models")
    bench.add_argument("--model", action="append", default=[],
                       help="models: a zoo model name, or your own as edgepasses compress takes it "
                            "(package.module:factory or a .pt2 file); coverage: a catalogue architecture "
                            "(default: all); transformers: minilm_l6, bert_base or bert_tiny (a smoke test; "
                            "default: minilm_l6 bert_base); repeatable")
    bench.add_argument("--input-shape", action="append", default=[], metavar="D0,D1,...",
                       help="models, your own model: shape of one float32 input; repeat per input (a .pt2's "
                            "own inputs otherwise)")
    bench.add_argument("--calibration", metavar="FILE",
                       help="models, your own model: torch.save'd list of input tuples for int8 pipelines and "
                            "the NNCF peer, loaded with weights_only=True (default: the example inputs)")
    bench.add_argument("--column", action="append", default=[],
                       help="coverage: pipeline column; repeatable (default: int8-openvino, int8-reference, "
                            "sparse24, prune, lowrank)")
    bench.add_argument("--section", action="append", default=[], choices=("sentence", "digits", "charlm", "control"),
                       help="accuracy: section to measure; repeatable (default: all)")
    # Spelled out here (bench.hostile.AREAS), so that building the parser stays light.
    bench.add_argument("--area", action="append", default=[],
                       choices=("options", "calibration", "model", "artifact", "cache", "numerics", "kernel", "cli"),
                       help="hostile: area of cases; repeatable (default: all)")
    bench.add_argument("--op", action="append", default=[], help="kernels: op to time; repeatable (default: all)")
    bench.add_argument("--shape", action="append", type=_parse_shape, default=[],
                       help="kernels: M,K,N of the linear ops; repeatable (default: 1,4096,4096 16,4096,4096 "
                            "128,4096,4096); int8_conv2d times its own ResNet layers")
    bench.add_argument("--tokens", action="append", type=_parse_tokens, default=[], metavar="BATCH,TOKENS",
                       help="transformers: batch and sequence length measured; repeatable (default: 8,64 1,128)")
    bench.add_argument("--pipeline", action="append", default=[],
                       help=f"pipeline text or preset; repeatable (default: {DEFAULT_PIPELINE}; accuracy and "
                            "transformers: their own defaults, listed in their sections of docs/benchmarks.md)")
    # Spelled out here, not imported from the runner, so that building the parser stays light.
    bench.add_argument("--peer", action="append", default=[], choices=("nncf",),
                       help="also measure this peer; repeatable (nncf: NNCF int8 post-training quantization "
                            "+ OpenVINO, added anyway when a pipeline quantizes)")
    bench.add_argument("--direct", action="store_true",
                       help="also time each pipeline's compress() + lower() program called without "
                            "torch.compile (no Dynamo per-call work)")
    bench.add_argument("--batch", type=_at_least(1), default=1, help="models: the zoo models' batch size")
    bench.add_argument("--target", type=_target_spec, default="openvino",
                       help=f"{', '.join(target_names())}, or an ordered list such as 'openvino,reference'")
    bench.add_argument("--precision", choices=PRECISIONS, default="f32")
    bench.add_argument("--warmup", type=_at_least(0), default=None, help="untimed calls per row (default: 10; "
                       "transformers: 3)")
    bench.add_argument("--rounds", type=_at_least(1), default=None,
                       help="interleaved timing rounds (default: 50; accuracy: 20; transformers: 10)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--md", metavar="PATH", help="write the Markdown tables to PATH (default: replace this "
                       "suite's section of docs/benchmarks.md, when run in a checkout that has it)")
    bench.set_defaults(handler=_bench, parser=bench)


def _search(args: argparse.Namespace) -> int:
    from .search.cli import run_search_command

    return run_search_command(args)


def _add_search_parser(subparsers: Any) -> None:
    search = subparsers.add_parser("search", help="multi-objective search over pipelines (latency, accuracy, "
                                                  "size) of a zoo model on a target: the Pareto front")
    search.add_argument("--model", required=True, help="zoo model name")
    search.add_argument("--target", default="openvino", help="target (default: openvino)")
    search.add_argument("--budget", action="append", default=[],
                        help="upper bound NAME=VALUE: latency_ms, size_mb, accuracy_drop; repeatable")
    search.add_argument("--objectives", default="latency,accuracy,size", help="comma-separated objectives")
    search.add_argument("--trials", type=_at_least(1), default=60, help="finished trials to reach (resumes)")
    search.add_argument("--out", required=True, help="run directory (study storage; resumable)")
    search.add_argument("--sampler", default="nsga2", choices=("nsga2", "tpe", "random"))
    search.add_argument("--workers", default=None, help="'ray' (local instance) or ray://host:port")
    search.add_argument("--num-workers", type=_at_least(1), default=None, help="Ray tasks (default: the cluster's CPUs)")
    search.add_argument("--batch", type=_at_least(1), default=32, help="batch size of the timed and evaluated program")
    search.add_argument("--calibration-batches", type=_at_least(1), default=4)
    search.add_argument("--distill-steps", type=_at_least(0), default=0,
                        help="flash distillation steps before quantize for pruned/low-rank/2:4 candidates")
    search.add_argument("--distill-lr", type=float, default=1e-4,
                        help="flash distillation's Adam learning rate (default %(default)s, below distill's "
                             "own: a few steps at a larger rate can ruin a BN-folded model instead of recovering it)")
    search.add_argument("--warmup", type=_at_least(0), default=2)
    search.add_argument("--rounds", type=_at_least(1), default=5, help="interleaved timing rounds per trial")
    search.add_argument("--reference", default="nncf", choices=("nncf", "none"),
                        help="int8 reference measured at the start and timed with every trial (openvino)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--knobs", default="quant,prune,lowrank,sparse24",
                        help="per-group choices to search (default: %(default)s)")
    search.add_argument("--prune-ratios", default="0,0.125,0.25,0.375,0.5", help="prune ratio choices")
    search.add_argument("--lowrank-energies", default="0,0.99,0.97,0.95,0.9",
                        help="lowrank energy choices (0: no split)")
    search.add_argument("--prune-criterion", default="activation", choices=("activation", "l1"),
                        help="prune's channel criterion: activation (data-aware, default) or weight l1")
    search.add_argument("--seed-prune", default="",
                        help="extra seed trials: int8 everywhere plus these prune ratios on the later groups, "
                             "e.g. 0.125,0.25 (enqueued first, with int8 and float)")
    search.add_argument("--lut", action="store_true",
                        help="screen candidates with a per-layer latency table (lut.json in --out): candidates "
                             "it predicts over the latency budget or dominated are not built")
    search.set_defaults(handler=_search, parser=search)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgepasses", description="FX-graph compression passes and the "
                                                                    "torch.compile backend 'edge'")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_compress_parser(subparsers)
    _add_bench_parser(subparsers)
    _add_report_parser(subparsers)
    _add_search_parser(subparsers)
    _add_compare_parser(subparsers)
    _add_onnx_parser(subparsers)
    _add_prune_check_parser(subparsers)
    passes = subparsers.add_parser("passes", help="registered passes with their options, and the presets")
    passes.add_argument("--markdown", action="store_true",
                        help="print docs/passes.md instead (edgepasses passes --markdown > docs/passes.md)")
    passes.set_defaults(handler=_passes)
    subparsers.add_parser("demo", help="every zoo model: eager, OpenVINO fp32, NNCF int8, edge int8 and edge auto in one table"
                          ).set_defaults(handler=_demo)
    return parser


# What a user can cause and fix (a missing file, a bad option or value): one line, no traceback.
# Anything else is a bug, and its traceback is worth seeing.
_USER_ERRORS = (EdgeError, OSError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _USER_ERRORS as exc:
        if os.environ.get("EDGEPASSES_TRACEBACK"):
            raise
        print(f"edgepasses {args.command}: error: {first_line(exc)}", file=sys.stderr)  # EDGEPASSES_TRACEBACK=1: the traceback
        return 1
