"""`edgepasses report`: the int8 sensitivity report of a zoo model, layers ranked by SQNR loss;
`edgepasses compare`: the output SQNR of several pipelines on one zoo model, side by side.

Calibration and evaluation batches come from the zoo (digits: the train split; random-weight
models: seeded synthetic inputs), so the report is reproducible.
"""
from __future__ import annotations

import dataclasses
import time

import edgepasses
from edgepasses.pipeline import Pipeline, Step

from edgepasses.zoo import get_model


def with_min_sqnr(pipeline: str, min_sqnr: float) -> str:
    """`pipeline` with its quantize step asked to keep sensitive layers in float down to `min_sqnr` dB."""
    steps = [Step(s.info, dataclasses.replace(s.options, min_sqnr=min_sqnr)) if s.name == "quantize" else s
             for s in Pipeline.parse(pipeline)]
    return str(Pipeline(tuple(steps)))


def quant_report_for(name: str, pipeline: str = "fold_bn,quantize", batches: int = 8,
                     min_sqnr: float | None = None) -> str:
    zoo = get_model(name)
    if zoo.calibration is None:
        raise ValueError(f"zoo model {name!r} has no calibration data")
    data = zoo.calibration(batches)
    start = time.perf_counter()
    gm = edgepasses.compress(zoo.module, zoo.example_inputs, pipeline, calibration=data)
    report = edgepasses.quant_report(zoo.module, gm, data)
    lines = [f"### {name}: int8 sensitivity ({pipeline}, {batches} calibration/evaluation batches)", "",
             str(report)]
    if min_sqnr is not None:
        budget = edgepasses.compress(zoo.module, zoo.example_inputs, with_min_sqnr(pipeline, min_sqnr),
                                     calibration=data)
        stats = budget.edge_report.records[-1].stats
        lines += ["", f"min_sqnr={min_sqnr} dB: {stats['layers_kept_float']} layer(s) kept in float "
                      f"({', '.join(stats['float_layers']) or 'none'}), output SQNR {stats['output_sqnr_db']} dB"]
    lines.append(f"\n({time.perf_counter() - start:.0f} s)")
    return "\n".join(lines)


def compare_sqnr(name: str, pipelines: list[str], batches: int = 8) -> str:
    """A Markdown table: each pipeline's output SQNR against the float model on held-out batches
    (calibration: the first `batches` zoo batches; evaluation: the next `batches`)."""
    from edgepasses.quant.sensitivity import output_sqnr

    zoo = get_model(name)
    if zoo.calibration is None:
        raise ValueError(f"zoo model {name!r} has no calibration data")
    data = zoo.calibration(2 * batches)
    calibration, evaluation = data[:batches], data[batches:]
    lines = [f"### {name}: output SQNR vs float ({batches} calibration, {batches} held-out batches)", "",
             "| pipeline | SQNR dB | compress s |", "|---|---:|---:|"]
    for pipeline in pipelines:
        start = time.perf_counter()
        gm = edgepasses.compress(zoo.module, zoo.example_inputs, pipeline, calibration=calibration)
        seconds = time.perf_counter() - start
        lines.append(f"| `{pipeline}` | {output_sqnr(zoo.module, gm, evaluation):.2f} | {seconds:.1f} |")
    return "\n".join(lines)
