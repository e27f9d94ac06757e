"""Artifacts and the compile cache keep symbolic (dynamic) shapes: saved with their ranges, loaded as
programs for every shape in range, and the expressions and guards torch would evaluate as Python are
checked against a grammar of size arithmetic first (edgepasses/pt2_check.py)."""
import contextlib
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from edgepasses import backends, compile_cache
from edgepasses.artifacts import load, save
from edgepasses.backend import EdgeOptions
from edgepasses.canonical import export_canonical_graph
from edgepasses.dynamic_shapes import dynamic_dims
from edgepasses.errors import ArtifactError
from edgepasses.pt2_check import check_guard, check_sym_expr

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
BATCHES = (1, 3, 7)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def _dynamic_graph(max_batch: int = 64) -> torch.fx.GraphModule:
    return export_canonical_graph(_model(), (X,), ({0: Dim.DYNAMIC(min=1, max=max_batch)},))


def _batch(size: int) -> torch.Tensor:
    return torch.randn(size, 3, 8, 8, generator=torch.Generator().manual_seed(size))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A graph-only artifact of a graph whose batch dim is dynamic in 1..64."""
    return save(_dynamic_graph(), tmp_path_factory.mktemp("dynamic") / "graph", (X,), target_artifact=False)


def test_a_dynamic_graph_saved_and_loaded_runs_at_every_shape_and_keeps_its_range(saved):
    artifact = load(saved)
    [record] = artifact.manifest["inputs"]
    assert record["dynamic"] == {"0": [1, 64]} and record["shape"][1:] == [3, 8, 8]
    assert [(d.dim, d.min, d.max) for d in dynamic_dims(artifact.graph)] == [(0, 1, 64)]
    assert [(r.lower, r.upper) for r in artifact.exported.range_constraints.values()] == [(1, 64)]
    model = _model()
    with torch.no_grad():
        for size in BATCHES:
            torch.testing.assert_close(artifact(_batch(size)), model(_batch(size)), rtol=1e-4, atol=1e-5)
        with pytest.raises(Exception, match="Guard failed"):  # the loaded graph checks its range
            artifact(_batch(65))


def test_a_dynamic_openvino_artifact_runs_at_every_shape(tmp_path):
    pytest.importorskip("openvino")
    import edgepasses

    gm = _dynamic_graph()
    program = edgepasses.lower(gm, (X,), target="openvino")
    artifact = load(save(program, tmp_path / "ov", program=program))
    assert artifact.manifest["target"] == "openvino" and artifact.manifest["inputs"][0]["dynamic"] == {"0": [1, 64]}
    model = _model()
    with torch.no_grad():
        for size in BATCHES:
            torch.testing.assert_close(artifact.program(_batch(size)), model(_batch(size)), rtol=1e-4, atol=1e-4)


class ComputedSizes(nn.Module):
    """Sizes computed from the input's (operator.mul, operator.floordiv nodes in the graph)."""

    def forward(self, x):
        return x.reshape(x.shape[0] * x.shape[1], -1).sum(0) + torch.ones(x.shape[0] * x.shape[1] // 2).sum()


def test_a_graph_computing_sizes_saves_and_loads(tmp_path):
    x = torch.randn(4, 6, 5)
    gm = export_canonical_graph(ComputedSizes(), (x,), ({0: Dim.DYNAMIC(min=2, max=32), 1: Dim.DYNAMIC(min=2, max=32)},))
    assert {"mul", "floordiv"} <= {getattr(n.target, "__name__", "") for n in gm.graph.nodes}
    artifact = load(save(gm, tmp_path / "sizes", (x,), target_artifact=False))
    for shape in [(3, 4, 5), (8, 2, 5)]:
        y = torch.randn(shape)
        torch.testing.assert_close(artifact(y), ComputedSizes()(y))


# --- crafted files: code where torch expects shapes ---------------------------------------------

def _rewrite_model_json(folder: Path, change) -> bytes:
    """Change graph.pt2's models/model.json (and the manifest's SHA-256 to match), as an attacker can."""
    with zipfile.ZipFile(folder / "graph.pt2") as archive:
        root = archive.namelist()[0].split("/")[0] + "/"
        entries = {name.removeprefix(root): archive.read(name) for name in archive.namelist()}
    model = json.loads(entries["models/model.json"])
    change(model)
    entries["models/model.json"] = json.dumps(model).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(root + name, data)
    data = buffer.getvalue()
    (folder / "graph.pt2").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["graph.pt2"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return data


def _expr_strs(model: dict) -> list[dict]:
    found, stack = [], [model]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found += [item] if "expr_str" in item else []
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _in_expression(marker: Path):
    """Every symbolic size of the graph becomes a call of os.system: sympify evaluates it."""
    def change(model):
        for item in _expr_strs(model):
            item["expr_str"] = f"__import__('os').system('touch {marker}')"
    return change


def _attribute_in_expression(marker: Path):
    """Code reached through attributes of an allowed name, without __import__."""
    def change(model):
        for item in _expr_strs(model):
            item["expr_str"] = (f"FloorDiv.eval.__globals__['__builtins__']['__import__']('os')"
                                f".system('touch {marker}')")
    return change


def _in_guard(marker: Path):
    """A shape guard is Python that ExportedProgram.module() executes when the graph runs."""
    def change(model):
        model["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]
    return change


def _in_range_name(marker: Path):
    def change(model):
        model["range_constraints"] = {f"__import__('os').system('touch {marker}')": {"min_val": 1, "max_val": 64}}
    return change


# (craft, what the error names)
CODE_IN_SHAPES = {
    "call in a symbolic size": (_in_expression, "symbolic shape expression"),
    "attribute access in a symbolic size": (_attribute_in_expression, "symbolic shape expression"),
    "call in a shape guard": (_in_guard, "shape guard"),
    "call as a symbol's name": (_in_range_name, "range constraint"),
}


def _run_plainly(data: bytes) -> None:
    """What torch alone does with the file: load, build the module, run it."""
    with contextlib.suppress(Exception):  # some fail after running the payload; the marker is the point
        torch.export.load(io.BytesIO(data)).module()(X)


@pytest.mark.parametrize("attack", list(CODE_IN_SHAPES))
def test_code_in_a_dynamic_graphs_shapes_is_refused_without_running_it(saved, tmp_path, attack):
    craft, what = CODE_IN_SHAPES[attack]
    marker = tmp_path / "marker"
    folder = Path(shutil.copytree(saved, tmp_path / "copy"))
    data = _rewrite_model_json(folder, craft(marker))
    if attack != "call as a symbol's name":  # the others run under plain torch: the payload is real
        _run_plainly(data)
        assert marker.exists(), "the crafted payload should run under plain torch.export.load"
        marker.unlink()
    with pytest.raises(ArtifactError, match=f"holds the {what} .*not size arithmetic.*not loaded") as error:
        load(folder)
    assert not marker.exists(), "edgepasses.load ran the payload"
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", [
    "Symbol('s31', positive=True, integer=True)",
    "Mul(Integer(4), Symbol('s16', positive=True, integer=True), Symbol('s82', positive=True, integer=True))",
    "Add(FloorDiv(Symbol('s27', positive=True, integer=True), Integer(2)), Integer(-1))",
    "Max(Integer(1), Symbol('u0', integer=True))",
    "Pow(Symbol('s1', integer=True), Integer(2))",
    "StrictLessThan(Symbol('s1', integer=True), Integer(64))",
    "2*s31 + s4 // 2 - 1",
])
def test_size_expressions_torch_writes_are_accepted(text):
    assert check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "Symbol('s1').__class__",
    "Symbol('s1', positive=__import__('os'))",
    "Symbol('os.system')",
    "Integer('1')",
    "Pow(Symbol('s1', integer=True), Integer(10000000))",
    "exec('1')",
    "s1 ** 2",
    "s1 / 2",
    "lambda: 1",
    "[s1]",
    "hn1",  # a sympy function's name, not a size symbol
    "Add()",
    "Add(" * 5000 + ")" * 5000,
    "+".join(["s1"] * 1500),  # parses, but nests deeper than any shape torch writes
    "s\u0661",  # a non-ASCII digit
    42,
])
def test_anything_else_is_not_a_size_expression(text):
    assert not check_sym_expr(text)


@pytest.mark.parametrize("text, accepted", [
    ("L['input'].size()[0] <= 64", True),
    ("L['args'][0].size()[0] != 1", True),
    ("1 + (L['x'].size()[1] // 2) <= L['x'].size()[1] + L['y'].size()[1]", True),
    ("L['x'].stride()[0] == max(1, L['x'].size()[1]) and not L['x'].size()[0] == 3", True),
    ("L['x'].size()[0]", False),  # not a comparison
    ("L['x'].numpy() == 1", False),
    ("L['x'].size.__self__ == 1", False),
    ("L['a\"b'].size()[0] == 1", False),  # a quote would end torch's message string
    ("M['x'].size()[0] == 1", False),
    ("__import__('os').system('true') == 0", False),
])
def test_shape_guards(text, accepted):
    assert check_guard(text) is accepted


# --- the compile cache ----------------------------------------------------------------------

def _key(canonical) -> str:
    opts = EdgeOptions(target="reference", pipeline="fold_bn")
    target = backends.get_target(opts.target, opts.target_options)
    return compile_cache.cache_key(compile_cache.key_parts(canonical, opts, target))


def test_the_cache_key_covers_dynamic_dims_and_their_ranges():
    static = export_canonical_graph(_model(), (X,))
    keys = {_key(static), _key(_dynamic_graph(64)), _key(_dynamic_graph(32))}
    assert len(keys) == 3
    assert _key(_dynamic_graph(64)) == _key(_dynamic_graph(64))
    assert compile_cache.key_parts(_dynamic_graph(64), EdgeOptions(target="reference", pipeline="fold_bn"),
                                   backends.get_target("reference", None))["dynamic"].endswith("[0] in 1..64")


@pytest.mark.parametrize("target", ["reference", "openvino"])
def test_a_dynamic_compile_cache_hit_serves_every_shape_in_range(tmp_path, target):
    if target == "openvino":
        pytest.importorskip("openvino")
    model = _model()
    options = {"cache_dir": str(tmp_path), "target": target, "pipeline": "fold_bn"}
    for expected in ("miss", "hit"):
        torch._dynamo.reset()
        seen = []
        compiled = torch.compile(model, backend="edge", dynamic=True, options={**options, "on_compile": seen.append})
        with torch.no_grad():
            for size in (2, 3, 5):
                torch.testing.assert_close(compiled(_batch(size)), model(_batch(size)), rtol=1e-4, atol=1e-4)
        assert [c.cache for c in seen] == [expected], "one compile serves every shape"
        assert seen[0].dynamic and seen[0].dynamic[0].dim == 0
    manifest = json.loads(Path(seen[0].cache_entry, "manifest.json").read_text())
    assert manifest["inputs"][0]["dynamic"]["0"][0] == 2, "the entry keeps the batch dim's range"
