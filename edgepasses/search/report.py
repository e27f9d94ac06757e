"""The search report: Pareto plot (PNG), the front as a table, what each pass did, what fell back;
written as Markdown and HTML into the run directory."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .front import Front, Point, timed_with_reference
from .study import read_meta

REGENERATE = "edgepasses report {out}"


def _ms(p: Point) -> str:
    return f"{p.latency_ms:.3g} ({p.latency_min_ms:.3g}–{p.latency_max_ms:.3g})"


def _speedup(front: Front, p: Point) -> str:
    ref = front.reference
    if not ref:
        return "-"
    # Against the reference timed in the same interleaved rounds when there is one; else the start's.
    return f"{p.speedup or ref['latency_ms'] / p.latency_ms:.2f}×"


def _load_text(front: Front) -> str:
    loads = sorted(p.load_avg for p in front.all_points if p.load_avg is not None)
    if not loads:
        return "load average not recorded"
    return f"1-min load average over the trials {loads[0]:.1f}–{loads[-1]:.1f} (median {loads[len(loads) // 2]:.1f})"


def front_markdown(front: Front) -> str:
    lines = ["| trial | pipeline | latency ms median (min–max) | vs reference | size MB | accuracy | drop |",
             "|---|---|---|---|---|---|---|"]
    ref = front.reference
    if ref:
        acc = ref.get("accuracy")
        lines.append(f"| ref | {ref.get('label', 'reference')} | {ref['latency_ms']:.3g} "
                     f"({ref['latency_min_ms']:.3g}–{ref['latency_max_ms']:.3g}) | 1.00× | {ref['size_mb']:.2f} | "
                     f"{'-' if acc is None else f'{acc:.2f}'} | "
                     f"{'-' if acc is None else f'{front.baseline_accuracy - acc:.2f}'} |")
    for p in front.points:
        lines.append(f"| {p.trial} | `{p.pipeline}` | {_ms(p)} | {_speedup(front, p)} | {p.size_mb:.2f} | "
                     f"{p.accuracy:.2f} | {p.accuracy_drop:.2f} |")
    return "\n".join(lines)


def _stats_text(stats: dict[str, Any]) -> str:
    keep = {k: v for k, v in stats.items() if not isinstance(v, (list, dict)) or len(str(v)) < 80}
    return ", ".join(f"{k}={v}" for k, v in keep.items()) or "-"


def passes_markdown(front: Front) -> str:
    lines = []
    for p in front.points:
        lines += [f"**trial {p.trial}** `{p.pipeline}`", "", "| pass | modified | ms | stats |", "|---|---|---|---|"]
        for r in p.passes:
            lines.append(f"| `{r['step']}` | {'yes' if r['modified'] else 'no'} | {r['seconds'] * 1e3:.0f} | "
                         f"{_stats_text(r['stats'])} |")
        if p.distill:
            lines.append(f"| distill | yes | - | steps={p.distill.get('steps')}, loss "
                         f"{p.distill.get('loss_start', 0):.3g} → {p.distill.get('loss_end', 0):.3g} |")
        lines.append("")
    return "\n".join(lines)


def fallbacks_markdown(front: Front) -> str:
    rows = [(p.trial, f) for p in front.all_points for f in p.fallbacks]
    if not rows:
        return f"Nothing fell back: every op of all {len(front.all_points)} finished trials ran on the target."
    return "\n".join(f"- trial {t}: {f}" for t, f in rows)


def plot(front: Front, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = front.reference
    # Speed relative to the reference timed in the same rounds, as the front is ranked, when every
    # trial has one; else milliseconds.
    relative = timed_with_reference(front.all_points)

    def x(p):
        return p.speedup if relative else p.latency_ms

    others = [p for p in front.all_points if p not in front.points]
    ax.scatter([x(p) for p in others], [p.accuracy for p in others], s=[8 + 4 * p.size_mb for p in others],
               c=["#bbbbbb" if p.feasible else "#f2b8b8" for p in others], label="other trials")
    pts = sorted(front.points, key=x)
    ax.plot([x(p) for p in pts], [p.accuracy for p in pts], "-o", color="#1f77b4", label="Pareto front")
    for p in pts:
        ax.annotate(str(p.trial), (x(p), p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if ref and ref.get("accuracy") is not None:
        ax.scatter([1.0 if relative else ref["latency_ms"]], [ref["accuracy"]], marker="*", s=160, color="#d62728",
                   label=ref.get("label", "reference") + ("" if relative else " (timed at the start)"))
    label = ref.get("label", "the reference") if ref else ""
    ax.set_xlabel(f"speed-up over {label}, timed in the same rounds (×)" if relative else "latency ms (median)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"search: {'speed-up' if relative else 'latency'} vs accuracy (marker area ~ size MB)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_markdown(front: Front, meta: dict[str, Any], out: str, png: str) -> str:
    failed = meta.get("failed_trials", 0)
    lines = [f"# Search report: {out}", "",
             f"Regenerate: `{REGENERATE.format(out=out)}`", "",
             f"target {meta['target']}, objectives {', '.join(meta['objectives'])}, budget "
             f"{meta.get('budget') or 'none'}, sampler {meta.get('sampler')}, {len(front.all_points)} finished trials"
             f" ({failed} failed), search wall time {meta.get('wall_s', 0) / 60:.1f} min, inputs "
             f"{meta.get('example_inputs')}, {meta.get('rounds')} interleaved timing rounds per trial, "
             f"flash distillation steps {meta.get('distill_steps', 0)} (lr {meta.get('distill_lr', '-')}), "
             f"{_load_text(front)}, groups {', '.join(meta.get('groups', []))}. "
             f"Accuracy: {meta.get('accuracy_metric')}; baseline (float model) "
             f"{front.baseline_accuracy:.2f}.", "", f"![Pareto front]({png})", "",
             "## Front", "", "`vs reference`: the reference's median over the same interleaved rounds / the "
             "candidate's median." + (f" Pruned points were flash-distilled ({meta.get('distill_steps')} steps) "
                                     "between the structural steps and quantize: the pipeline text alone does not "
                                     "reproduce their accuracy (`edgepasses.distill` does; "
                                     "`python -m edgepasses.search.confirm` rebuilds them so)."
                                     if meta.get("distill_steps") else ""), "", front_markdown(front), "",
             "## What each pass did", "", passes_markdown(front), "## Fallbacks", "", fallbacks_markdown(front), ""]
    lines += lut_markdown(Path(out), front)
    lines += confirm_markdown(Path(out))
    errors = meta.get("errors") or []
    if errors:
        lines += ["## Failed trials", ""] + [f"- trial {t}: {e}" for t, e in errors] + [""]
    return "\n".join(lines)


def lut_markdown(out: Path, front: Front) -> list[str]:
    """Predicted (per-layer table) vs measured latency of the trials measured whole."""
    import json

    from .lut import LUT, agreement

    path = out / LUT
    if not path.exists():
        return []
    table = json.loads(path.read_text())
    rows = sorted(((int(t), p) for t, p in table.get("predictions", {}).items()
                   if p.get("sum_ms") and p.get("measured_ms")), key=lambda r: r[0])
    fit = agreement([(p["sum_ms"], p["measured_ms"]) for _, p in rows])
    lines = ["## Latency table", "",
             f"{len(table.get('entries', {}))} one-layer programs measured on {table.get('target')} "
             f"({table.get('measure_s', 0):.0f} s in all); a candidate's prediction is the sum of its layers' "
             "entries times the median measured/sum of the trials measured whole.", ""]
    if fit.get("n", 0) >= 2:
        lines += [f"Over {fit['n']} measured trials: scale (measured/sum) {fit['scale']:.2f}, median |error| after "
                  f"scaling {fit['median_abs_error']:.0%} (max {fit['max_abs_error']:.0%}), Spearman rank "
                  f"correlation {fit['spearman']:.2f}.", ""]
    screened = _screened(out)
    if screened:
        lines += [f"Screened out without a whole-model build: {len(screened)} candidates.", ""]
        lines += [f"- trial {t}: {why}" for t, why in screened[:20]] + [""]
    lines += ["| trial | sum of layers ms | predicted ms (scaled) | measured ms | error |", "|---|---|---|---|---|"]
    scale = fit.get("scale", 1.0)
    for t, p in rows:
        pred = p["sum_ms"] * scale
        lines.append(f"| {t} | {p['sum_ms']:.3g} | {pred:.3g} | {p['measured_ms']:.3g} | "
                     f"{(pred - p['measured_ms']) / p['measured_ms']:+.0%} |")
    return lines + [""]


def _screened(out: Path) -> list[tuple[int, str]]:
    import optuna
    from optuna.trial import TrialState

    from .study import STUDY_NAME, storage_for

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(out))
    return [(t.number, t.user_attrs.get("screened", "?")) for t in study.get_trials(deepcopy=False,
                                                                                   states=(TrialState.PRUNED,))]


def confirm_markdown(out: Path) -> list[str]:
    """The final side-by-side re-measurement (`confirm.json`, written by `python -m edgepasses.search.confirm`)."""
    import json

    path = out / "confirm.json"
    if not path.exists():
        return []
    c = json.loads(path.read_text())
    lines = ["## Confirmation: the picked point vs NNCF int8 (one interleaved run) vs eager float (its own rounds)", "",
             f"`{c['command']}`: {c['rounds']} interleaved rounds (warmup {c['warmup']}), then as many of the eager "
             f"float model alone (its OpenMP threads spin after each call and slow what runs next), batch {c['batch']}, "
             f"load average {c['load_before']} before / {c['load_after']} after; picked: trial {c['trial']} "
             f"(`front.pick(max_accuracy_drop={c['max_accuracy_drop']})`), rebuilt as the search built it"
             + (f" (flash distillation {c['distilled'].get('steps')} steps, loss {c['distilled'].get('loss_start', 0):.3g}"
                f" → {c['distilled'].get('loss_end', 0):.3g})" if c.get("distilled") else "") + ".", "",
             "| program | latency ms median (min–max) | vs NNCF int8 | accuracy | drop |", "|---|---|---|---|---|"]
    ref = c["programs"]["nncf int8"]["latency_ms"]
    for name, p in c["programs"].items():
        lines.append(f"| {name} | {p['latency_ms']:.3g} ({p['latency_min_ms']:.3g}–{p['latency_max_ms']:.3g}) | "
                     f"{ref / p['latency_ms']:.2f}× | {p['accuracy']:.2f} | {c['baseline_accuracy'] - p['accuracy']:.2f} |")
    lines += ["", f"Picked pipeline: `{c['pipeline']}`", ""]
    return lines


def write_report(out: "str | Path") -> dict[str, Path]:
    """Write report.md, report.html and pareto.png into the run directory `out`."""
    return _write(out)


def _failed(out) -> list[tuple[int, str]]:
    from optuna.trial import TrialState

    from .study import STUDY_NAME, storage_for
    import optuna

    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(out))
    return [(t.number, t.user_attrs.get("error", "interrupted" if t.user_attrs.get("interrupted") else "?"))
            for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]


def _write(out: "str | Path") -> dict[str, Path]:
    from .run import load_front

    out_path = Path(out)
    meta = read_meta(out_path)
    front = load_front(out_path)
    errors = _failed(out_path)
    meta = {**meta, "failed_trials": len(errors), "errors": errors}
    png = plot(front, out_path / "pareto.png")
    text = report_markdown(front, meta, str(out), png.name)
    md = out_path / "report.md"
    md.write_text(text)
    page = out_path / "report.html"
    page.write_text(_html(text))
    return {"md": md, "html": page, "png": png}


def _html(markdown_text: str) -> str:
    try:
        from markdown_it import MarkdownIt

        body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    except ImportError:
        body = f"<pre>{html.escape(markdown_text)}</pre>"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>search report</title></head><body>{body}</body></html>"
