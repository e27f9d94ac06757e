"""compress(): canonical form, the report, verify, and export failures."""
import pytest
import torch
from torch import nn

import edgepasses
from edgepasses import PassResult, register_pass
from edgepasses.errors import ExportFailedError
from edgepasses.graph_utils import constant_value
from edgepasses.pass_base import _REGISTRY


def test_compress_returns_canonical_graph_with_report():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()
    gm = edgepasses.compress(model, (torch.randn(1, 3, 6, 6),), "fold_bn,dce")
    nodes = list(gm.graph.nodes)
    mutating = [n for n in nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    assert mutating == [], "canonical form is functional: ReLU(inplace=True) must not stay relu_"
    assert all("val" in n.meta for n in nodes if n.op in ("placeholder", "call_function", "get_attr"))
    weights = [n for n in nodes if n.op == "get_attr"]
    assert weights and all(constant_value(gm, n) is not None for n in weights)
    records = gm.edge_report.records
    assert [r.step for r in records] == ["fold_bn", "dce"]
    assert records[0].stats["folded"] == 1 and records[0].seconds >= 0
    assert "| fold_bn | yes |" in str(gm.edge_report)


@pytest.fixture
def stale_meta_pass():
    @register_pass("widen_without_meta")
    def widen(gm, opts, ctx):
        """Doubles every linear's output features but forgets to update meta['val']."""
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.endswith("weight"):
                w = constant_value(gm, node)
                setattr(gm, node.target.replace(".", "_") + "_wide", torch.cat([w, w]))
                node.target = node.target.replace(".", "_") + "_wide"
            if node.op == "get_attr" and node.target.endswith("bias"):
                b = constant_value(gm, node)
                setattr(gm, node.target.replace(".", "_") + "_wide", torch.cat([b, b]))
                node.target = node.target.replace(".", "_") + "_wide"
        return PassResult(gm, True)
    yield
    del _REGISTRY["widen_without_meta"]


def test_verify_names_the_failing_pass_and_the_passes_before(stale_meta_pass):
    model, x = nn.Linear(3, 2).eval(), torch.randn(1, 3)
    with pytest.raises(RuntimeError, match=r"verify failed after pass 'widen_without_meta' \(passes before it: dce\).*stale"):
        edgepasses.compress(model, (x,), "dce,widen_without_meta", verify=True)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x + 1
        return x - 1


def test_export_failure_names_the_problem_and_what_to_do():
    with pytest.raises(ExportFailedError, match=r"(?s)could not capture DataDependent.*GuardOnDataDependent"
                       r".*at File .*test_api.py.*if x.sum\(\) > 0.*torch.cond.*backend='edge'"):
        edgepasses.compress(DataDependent().eval(), (torch.randn(3),))


def test_bad_pipeline_fails_before_export():
    with pytest.raises(ValueError, match="unknown pass"):
        edgepasses.compress(DataDependent().eval(), (torch.randn(3),), "nosuchpass")
