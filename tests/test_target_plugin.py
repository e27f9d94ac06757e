"""A target added without editing edgepasses: registered from this file (or an installed package's
`edgepasses.targets` entry point), it compiles with backend="edge", is cached, saved and loaded."""
import json
import textwrap

import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import backends
from edgepasses.backends import Lowering, TargetBase, register_target
from edgepasses.errors import ArtifactError, OptionError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
CALIBRATION = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)]


class ToyProgram(nn.Module):
    """Runs the exported graph in PyTorch, and knows the ops it holds (its stored form)."""

    def __init__(self, exported: torch.export.ExportedProgram, ops: list[str]):
        super().__init__()
        self.exported, self.ops, self.graph = exported, ops, exported.module()

    def forward(self, *args):
        return self.graph(*args)


class ToyTarget(TargetBase):
    name = "toy"
    artifact_files = ("ops.json",)
    events: list[str] = []  # what the core asked of it, in order

    def lower(self, gm, example_inputs, *, strict=False, precision="f32", cache_dir=None):
        exported = torch.export.export(gm, tuple(example_inputs))
        program = ToyProgram(exported, sorted({str(n.target) for n in exported.graph.nodes
                                               if n.op == "call_function"}))
        program.edge_lowering = Lowering(self.name, precision, partitions=1)
        self.events.append("lower")
        return program

    def cache_key(self) -> str:
        return "toy runtime 1"

    def can_save(self, program) -> bool:
        return isinstance(program, ToyProgram)

    def save_program(self, folder, exported, program, *, required):
        (folder / "ops.json").write_text(json.dumps(program.ops))
        self.events.append("save")
        return {"ops": len(program.ops)}

    def load_program(self, folder, info, exported, *, precision, cache_dir, notes):
        ops = json.loads((folder / "ops.json").read_text())
        assert len(ops) == info["ops"]
        self.events.append("load")
        return ToyProgram(exported, ops)


@pytest.fixture
def toy(monkeypatch):
    """The registry as it was, plus `toy`, for this test only."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(ToyTarget, "events", [])
    register_target("toy", ToyTarget)
    return ToyTarget


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


def _compile(options):
    torch._dynamo.reset()
    seen = []
    compiled = torch.compile(_model(), backend="edge", options={**options, "on_compile": seen.append})
    with torch.no_grad():
        return compiled(X), seen[0]


def test_a_registered_target_compiles_is_cached_and_reloaded(toy, tmp_path):
    options = {"target": "toy", "pipeline": "fold_bn,quantize", "calibration": CALIBRATION,
               "cache_dir": str(tmp_path)}
    first, miss = _compile(options)
    second, hit = _compile(options)
    assert (miss.cache, hit.cache) == ("miss", "hit")
    assert toy.events == ["lower", "save", "load"]  # the hit ran the stored program: no lowering again
    assert torch.equal(first, second)
    with torch.no_grad():
        expected = _model()(X)
    torch.testing.assert_close(first, expected, atol=0.1 * expected.abs().max().item(), rtol=0)
    assert miss.lowering.target == "toy" and miss.report.records[1].step.startswith("quantize")


def test_a_registered_target_saves_and_loads_its_program(toy, tmp_path):
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    program = edgepasses.lower(gm, (X,), target="toy")
    path = edgepasses.save(gm, tmp_path / "artifact", (X,), program=program)
    artifact = edgepasses.load(path)
    assert artifact.manifest["target"] == "toy" and artifact.manifest["target_info"] == {"ops": len(program.ops)}
    assert sorted(artifact.manifest["files"]) == ["graph.pt2", "toy/ops.json"]
    assert isinstance(artifact.program, ToyProgram) and artifact.program.ops == program.ops
    with torch.no_grad():
        torch.testing.assert_close(artifact(X), program(X))


def test_without_its_plugin_an_artifact_of_that_target_is_a_clear_error(toy, tmp_path, monkeypatch):
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    path = edgepasses.save(gm, tmp_path / "artifact", (X,), program=edgepasses.lower(gm, (X,), target="toy"))
    monkeypatch.delitem(backends._REGISTRY, "toy")
    with pytest.raises(ArtifactError, match="names target 'toy', which is not a target registered here"):
        edgepasses.load(path)
    with pytest.raises(OptionError, match="unknown target 'toy'"):
        edgepasses.lower(gm, (X,), target="toy")


def test_a_name_taken_is_refused(toy):
    class Other(TargetBase):
        name = "toy"

    with pytest.raises(OptionError, match="target 'toy' is already registered by"):
        register_target("toy", Other)
    with pytest.raises(OptionError, match="target name 'Auto'"):
        register_target("Auto", Other)


def test_an_installed_package_registers_a_target_through_its_entry_point(tmp_path, monkeypatch):
    """What `pip install` of a package declaring `[project.entry-points."edgepasses.targets"]` leaves."""
    (tmp_path / "toy_runtime.py").write_text(textwrap.dedent("""
        from edgepasses.backends import TargetBase

        class PluginTarget(TargetBase):
            name = "plugin-toy"

            def lower(self, gm, example_inputs, **options):
                from edgepasses.backends import Lowering
                gm.edge_lowering = Lowering(self.name, "f32", partitions=1)
                return gm
    """))
    info = tmp_path / "toy_runtime-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-runtime\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[edgepasses.targets]\nplugin-toy = toy_runtime:PluginTarget\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_entry_points_loaded", False)

    assert "plugin-toy" in backends.target_names()
    gm = edgepasses.compress(_model(), (X,), "fold_bn")
    lowered = edgepasses.lower(gm, (X,), target="plugin-toy")
    assert lowered.edge_lowering.target == "plugin-toy"
