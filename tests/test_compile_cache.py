"""The edge backend's compile cache (edgepasses/compile_cache.py): hits, keys, corrupt entries, opt-in."""
import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from edgepasses import backends, compile_cache
from edgepasses.artifacts import load, save
from edgepasses.backend import EdgeOptions
from edgepasses.canonical import export_canonical_graph
from edgepasses.pipeline import Pipeline

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
CALIBRATION = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture
def pipeline_runs(monkeypatch):
    """How many times a pipeline ran."""
    runs = []
    original = Pipeline.run

    def counted(self, *args, **kwargs):
        runs.append(str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", counted)
    return runs


def _compile(model, options, x=X):
    """(output, EdgeCompilation) of a fresh torch.compile."""
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(model, backend="edge", options={**options, "on_compile": seen.append})
    with torch.no_grad():
        out = compiled(x)
    assert len(seen) == 1
    return out, seen[0]


def test_second_openvino_compile_is_a_hit_that_skips_the_pipeline_and_conversion(tmp_path, pipeline_runs,
                                                                                  monkeypatch, caplog):
    pytest.importorskip("openvino")
    import edgepasses.backends.openvino as ov_backend

    options = {"cache_dir": str(tmp_path), "target": "openvino", "pipeline": "fold_bn,quantize",
               "calibration": CALIBRATION}
    model = _model()
    first, miss = _compile(model, options)
    assert miss.cache == "miss" and pipeline_runs == ["fold_bn,quantize"]
    entry = tmp_path / "compiled" / miss.cache_entry.rsplit("/", 1)[-1]
    assert miss.cache_entry == str(entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["target"] == "openvino" and "openvino/model.bin" in manifest["files"]
    assert manifest["extra"]["cache_key"] == entry.name

    conversions = []
    monkeypatch.setattr(ov_backend, "convert_exported", lambda *a: conversions.append(a) or 1 / 0)
    with caplog.at_level(logging.INFO, logger="edgepasses"):
        second, hit = _compile(model, options)
    assert hit.cache == "hit" and hit.cache_entry == miss.cache_entry
    assert pipeline_runs == ["fold_bn,quantize"] and conversions == [], "a hit runs neither"
    assert torch.equal(first, second)
    assert f"compile cache hit, {entry}" in caplog.text
    assert hit.report.pipeline == "fold_bn,quantize" and [r.step for r in hit.report.records] == ["fold_bn", "quantize"]
    assert hit.lowering.target == "openvino" and hit.lowering.int8_ops == miss.lowering.int8_ops > 0
    assert hit.lowering.placements == miss.lowering.placements
    assert [p.name for p in tmp_path.joinpath("compiled").iterdir()] == [entry.name], "no temporary left"


def _key(canonical, **options) -> str:
    opts = EdgeOptions(**{"target": "reference", "pipeline": "fold_bn,quantize", "calibration": CALIBRATION,
                          **options})
    target = backends.get_target(opts.target, opts.target_options)
    return compile_cache.cache_key(compile_cache.key_parts(canonical, opts, target))


def test_everything_that_changes_the_output_changes_the_key():
    canonical = export_canonical_graph(_model(), (X,))
    base = _key(canonical)
    assert _key(export_canonical_graph(_model(), (X,))) == base, "the same model, exported again: the same key"
    changed = copy.deepcopy(canonical)
    weight = next(t for name, t in changed.state_dict().items() if t.dim() == 4)
    weight[0, 0, 0, 0] += 1e-3
    other_calibration = [(x + 1e-3,) for (x,) in CALIBRATION]
    keys = {
        "weight": _key(changed),
        "pipeline": _key(canonical, pipeline="fold_bn"),
        "pass option": _key(canonical, pipeline="fold_bn,quantize(calib=minmax)"),
        "calibration": _key(canonical, calibration=other_calibration),
        "no calibration": _key(canonical, calibration=None),
        "target": _key(canonical, target="openvino"),
        "strict": _key(canonical, strict=True),
        "precision": _key(canonical, target="openvino", precision="bf16"),
        "target options": _key(canonical, target="tvm", target_options={"tvm": {"trials": 8}}),
        "input shape": _key(export_canonical_graph(_model(), (X[:1],))),
    }
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys), keys
    assert _key(canonical, target="tvm") != keys["target options"]


def test_a_corrupt_entry_is_one_warning_removed_and_compiled_again(tmp_path, pipeline_runs, caplog):
    options = {"cache_dir": str(tmp_path), "target": "reference", "pipeline": "fold_bn"}
    model = _model()
    first, miss = _compile(model, options)
    graph = tmp_path / "compiled" / miss.cache_entry.rsplit("/", 1)[-1] / "graph.pt2"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        second, again = _compile(model, options)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("edgepasses")]
    assert len(warnings) == 1 and "unusable" in warnings[0].message and "corrupt" in warnings[0].message
    assert again.cache == "miss" and pipeline_runs == ["fold_bn", "fold_bn"]
    assert torch.equal(first, second)
    assert load(again.cache_entry, program=False).manifest["extra"]["cache_key"] in again.cache_entry  # whole again


def test_an_entry_failing_in_any_way_is_one_warning_removed_and_compiled_again(tmp_path, pipeline_runs, caplog,
                                                                              monkeypatch):
    options = {"cache_dir": str(tmp_path), "target": "reference", "pipeline": "fold_bn"}
    model = _model()
    first, _ = _compile(model, options)
    load = compile_cache.artifacts.load

    def failing_once(*args, **kwargs):
        monkeypatch.setattr(compile_cache.artifacts, "load", load)
        raise RuntimeError("runtime error\nwith a second line")

    monkeypatch.setattr(compile_cache.artifacts, "load", failing_once)
    with caplog.at_level(logging.WARNING, logger="edgepasses"):
        second, again = _compile(model, options)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("edgepasses")]
    assert len(warnings) == 1 and warnings[0].getMessage().endswith("compiled again: runtime error")
    assert again.cache == "miss" and pipeline_runs == ["fold_bn", "fold_bn"] and torch.equal(first, second)
    _, hit = _compile(model, options)
    assert hit.cache == "hit", "the rebuilt entry is used: not failing forever"


def test_without_cache_dir_nothing_is_written(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def never(*args, **kwargs):
        raise AssertionError("the compile cache was used without cache_dir")

    monkeypatch.setattr(compile_cache, "lookup", never)
    monkeypatch.setattr(compile_cache, "store", never)
    _, compilation = _compile(_model(), {"target": "reference", "pipeline": "fold_bn"})
    assert compilation.cache is None and compilation.cache_entry is None
    assert list(cwd.iterdir()) == []


def test_reference_target_hit_lowers_the_cached_graph_again(tmp_path, pipeline_runs, caplog):
    options = {"cache_dir": str(tmp_path), "target": "reference", "pipeline": "fold_bn,quantize",
               "calibration": CALIBRATION}
    model = _model()
    first, miss = _compile(model, options)
    entry = miss.cache_entry
    assert sorted(json.loads(Path(entry, "manifest.json").read_text())["files"]) == ["graph.pt2"]
    with caplog.at_level(logging.INFO, logger="edgepasses"):
        second, hit = _compile(model, options)
    assert hit.cache == "hit" and pipeline_runs == ["fold_bn,quantize"]
    assert "holds the compressed graph; lowering it to reference again" in caplog.text
    assert hit.lowering.int8_ops == miss.lowering.int8_ops > 0, "the int8 kernels run after the hit too"
    assert torch.equal(first, second)


def test_tvm_program_saves_loads_and_hits(tmp_path, pipeline_runs, monkeypatch):
    pytest.importorskip("tvm")
    from edgepasses.backends.tvm import TVMProgram, TVMTarget
    from edgepasses.backends.tvm import build as tvm_build

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    from edgepasses import compress

    gm = compress(model, (x,), "dce")
    program = TVMTarget(trials=0, records=False).lower(gm, (x,))
    path = save(gm, tmp_path / "artifact", (x,), program=program)
    untrusted = load(path)  # a library is native code: loaded only when asked to
    assert untrusted.program is None and "trust_native_code=True" in untrusted.notes[0]
    artifact = load(path, trust_native_code=True)
    assert artifact.manifest["target"] == "tvm" and "tvm/model.so" in artifact.manifest["files"]
    assert artifact.manifest["target_info"]["mcpu"] == tvm_build.host_cpu()
    assert isinstance(artifact.program, TVMProgram)
    with torch.no_grad():
        assert torch.equal(artifact.program(x), program(x))
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "target_info": {**manifest["target_info"], "mcpu": "another-cpu"}}))
    elsewhere = load(path, trust_native_code=True)
    assert elsewhere.program is None and "built for CPU 'another-cpu'" in elsewhere.notes[0]

    options = {"cache_dir": str(tmp_path / "cache"), "target": "tvm", "pipeline": "dce",
               "target_options": {"tvm": {"trials": 0}}}
    first, miss = _compile(model, options, x)
    monkeypatch.setattr(tvm_build, "build", lambda *a, **k: 1 / 0)
    second, hit = _compile(model, options, x)
    assert (miss.cache, hit.cache) == ("miss", "hit") and pipeline_runs == ["dce", "dce"]
    assert hit.lowering.target == "tvm" and torch.equal(first, second)
