"""The compression search: space -> pipeline text, budgets, the front, resume after a kill, Ray, report."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

import edgepasses  # noqa: E402
from edgepasses.search import Front, Point, load_front, search  # noqa: E402
from edgepasses.search.objectives import parse_budget  # noqa: E402
from edgepasses.search.space import SearchSpace, layer_groups  # noqa: E402

MODEL_CODE = """
import torch
from torch import nn
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16)).eval()
def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 6, 6, generator=g),) for _ in range(2)]
"""
namespace: dict = {}
exec(MODEL_CODE, namespace)
tiny, tiny_data = namespace["tiny"], namespace["data"]
FAST = dict(target="reference", warmup=0, rounds=1, progress=False)


def test_space_writes_parseable_per_group_pipelines():
    gm = edgepasses.compress(tiny(), tiny_data()[0], "fold_bn")
    space = SearchSpace(layer_groups(gm))
    assert [g.name for g in space.groups] == ["0", "2", "5"]
    assert [g.linear_only for g in space.groups] == [False, False, True]
    assert [g.has_linear for g in space.groups] == [False, False, True]  # where 2:4 is searched
    config = {**space.uniform("int8"), "prune:0": 0.25, "lowrank:5": 0.9, "quant:2": "float", "quant:5": "w4",
              "sparse24:2": True}
    text = space.pipeline(config)
    assert str(edgepasses.Pipeline.parse(text)) == text
    assert "prune(ratio=0.25,criterion=activation,ignore=['2([.].*)?','5([.].*)?'])" in text
    assert "quantize(ignore=['2([.].*)?','5([.].*)?'])" in text and "quantize(bits=4,weight_only=true)" in text
    edgepasses.compress(tiny(), tiny_data()[0], text, calibration=tiny_data())  # every pattern matches a layer
    assert space.pipeline(space.uniform("float")) == "fold_bn,dce"


def test_budget_and_pick():
    assert parse_budget(["latency_ms=3", "accuracy_drop=1,size_mb=2"]) == {"latency_ms": 3, "accuracy_drop": 1,
                                                                           "size_mb": 2}
    with pytest.raises(ValueError, match="valid"):
        parse_budget(["speed=3"])
    mk = lambda n, ms, acc, ok=True: Point(n, f"p{n}", "openvino", ms, ms, ms, 1.0, acc, 90 - acc, ok)  # noqa: E731
    front = Front.from_points([mk(0, 10, 90), mk(1, 5, 89.5), mk(2, 4, 80), mk(3, 6, 89), mk(4, 1, 95, False)],
                              ("latency", "accuracy"), 90.0)
    assert [p.trial for p in front] == [2, 1, 0]            # 3 dominated by 1; 4 infeasible
    best = front.pick(max_accuracy_drop=1.0)
    assert best.trial == 1 and best.options == {"pipeline": "p1", "target": "openvino"}
    with pytest.raises(ValueError, match="no front point"):
        front.pick(max_accuracy_drop=-1)
    # Timed beside a reference: trial 1 ran under more load (slower in ms) but is faster relative to it,
    # so it is the front (trial 0 dominated) and the pick.
    timed = [mk(0, 8, 89.5), mk(1, 10, 89.5)]
    timed[0].reference_ms, timed[1].reference_ms = 9.0, 13.0
    both = Front.from_points(timed, ("latency", "accuracy", "size"), 90.0)
    assert [p.trial for p in both] == [1] and both.points[0].speedup == pytest.approx(1.3)
    assert both.pick(max_accuracy_drop=1.0).trial == 1


def test_search_front_constraints_and_report(tmp_path):
    model = tiny()
    eval_fn = lambda fn: float(-(fn(*tiny_data()[0]) - model(*tiny_data()[0])).abs().mean().detach())  # noqa: E731
    front = search(model, tiny_data(), eval_fn, trials=3, out=tmp_path, budget={"accuracy_drop": 0.5},
                   sampler="tpe", **FAST)
    assert front.points and all(p.feasible for p in front)
    assert {p.pipeline for p in front.all_points} >= {"fold_bn,quantize,dce"}   # the int8 seed trial
    for p in front.all_points:
        assert p.latency_min_ms <= p.latency_ms <= p.latency_max_ms and p.size_mb > 0 and p.passes
    compiled = torch.compile(model, backend="edge", options={**front.pick().options, "calibration": tiny_data()})
    assert compiled(*tiny_data()[0]).shape == (2, 16)
    from edgepasses.cli import main

    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert f"edgepasses report {tmp_path}" in text and "## What each pass did" in text and "## Fallbacks" in text
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "report.html").exists()


RUNNER = MODEL_CODE + """
import sys
from edgepasses.search import search
search(tiny(), data(), trials=int(sys.argv[2]), out=sys.argv[1], target="reference", warmup=0, rounds=1,
       progress=False, sampler="random")
"""


def _finished(out: Path) -> list[tuple[int, str]]:
    from edgepasses.search.study import STUDY_NAME, storage_for

    if not (out / "search.json").exists():
        return []
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_for(out))
    except KeyError:
        return []
    return [(t.number, t.user_attrs["pipeline"]) for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]


def test_resume_after_kill_loses_no_finished_trial(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUNNER)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "40"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    try:
        while len(_finished(out)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
    finally:
        proc.kill()  # midway: 40 trials take far longer than this
        proc.wait()
    before = _finished(out)
    assert len(before) >= 2, "the first run finished no trials in time"
    front = search(tiny(), tiny_data(), trials=len(before) + 2, out=out, sampler="random", **FAST)
    after = {(p.trial, p.pipeline) for p in front.all_points}
    assert set(before) <= after                          # nothing finished was lost
    from edgepasses.search.study import done_count, open_study, storage_for

    study = open_study(storage_for(out), ["minimize", "maximize", "minimize"])
    assert done_count(study) == len(before) + 2          # the total reaches the requested count
    meta = json.loads((out / "search.json").read_text())
    assert meta["trials"] == len(before) + 2


def test_search_on_local_ray(tmp_path, local_ray):
    front = search(tiny(), tiny_data(), trials=3, out=tmp_path, workers="ray", num_workers=2, sampler="random", **FAST)
    assert len(front.all_points) == 3 and (tmp_path / "journal.log").exists()
    assert len(load_front(tmp_path).all_points) == 3


def test_latency_table_keys_follow_pruned_widths():
    from edgepasses.search.lut import agreement, layer_keys

    gm = edgepasses.compress(tiny(), tiny_data()[0], "fold_bn")
    space = SearchSpace(layer_groups(gm), data_aware=False)
    config = {**space.uniform("int8"), "prune:0": 0.5, "quant:5": "w4"}
    pruned = edgepasses.compress(tiny(), tiny_data()[0], space.split(config)[0])
    keys = {name: desc for name, _, desc in layer_keys(pruned, config)}
    assert keys["0"]["w"] == [4, 4, 3, 3] and keys["2"]["w"] == [8, 4, 3, 3]      # 0's outputs = 2's inputs
    assert keys["0"]["quant"] == "int8" and keys["5"]["quant"] == "w4" and keys["5"]["x"] == [2, 288]
    good = agreement([(1.0, 2.0), (2.0, 4.1), (3.0, 5.9)])
    assert good["spearman"] == 1.0 and abs(good["scale"] - 2.0) < 0.06 and good["median_abs_error"] < 0.05


def test_search_with_latency_table_screens_and_records(tmp_path):
    from edgepasses.search.lut import LUT

    gm = edgepasses.compress(tiny(), tiny_data()[0], "fold_bn")
    space = SearchSpace(layer_groups(gm), prune=False, lowrank=False, sparsify_24=False)  # few table entries
    front = search(tiny(), tiny_data(), trials=2, out=tmp_path, sampler="random", lut=True, space=space,
                   budget={"latency_ms": 1e-6}, **FAST)   # no candidate fits: everything after the first is screened
    table = json.loads((tmp_path / LUT).read_text())
    assert table["entries"] and all(v > 0 for v in table["entries"].values())
    measured = [p for p in table["predictions"].values() if p["measured_ms"]]
    assert measured and all(p["sum_ms"] > 0 for p in measured)
    study = optuna.load_study(study_name="edgepasses-search", storage=f"sqlite:///{tmp_path / 'study.db'}")
    screened = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert screened and all("latency budget" in t.user_attrs["screened"] for t in screened)
    assert len(front.all_points) == len(measured)          # screened candidates were never built
    from edgepasses.cli import main

    assert main(["report", str(tmp_path)]) == 0
    assert "## Latency table" in (tmp_path / "report.md").read_text()


def test_mixed_weight_only_and_int8_groups_build_one_valid_pipeline():
    """A later quantize step's ignore list leaves out the groups an earlier step quantized: they are no
    longer quantizable, and a pattern matching nothing is an error."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = (torch.randn(2, 8),)
    space = SearchSpace(layer_groups(edgepasses.compress(model, x, "fold_bn")), prune=False, lowrank=False,
                        sparsify_24=False)
    for combo in [("int8", "w8", "w4"), ("w8", "w4", "float")]:
        pipeline = space.pipeline({f"quant:{g.name}": q for g, q in zip(space.groups, combo)})
        gm = edgepasses.compress(model, x, pipeline, calibration=[x, x], target="reference")
        assert all(torch.isfinite(t).all() for t in torch.utils._pytree.tree_leaves(gm(*x)))
