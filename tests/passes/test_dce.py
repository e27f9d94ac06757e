"""dce: removes unused nodes and the constants only they read; numerics unchanged."""
import torch
from torch import nn

from edgepasses.testing import run_pass_case


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x).sin()  # computed, never returned
        return self.used(x)


def test_dce_removes_dead_nodes_and_their_weights():
    case = run_pass_case("dce", DeadBranch().eval(), (torch.randn(2, 4),), op_counts={"aten.linear": 1},
                         check_not=["sin"])
    stats = case.report.records[0].stats
    assert stats["nodes_removed"] >= 2 and stats["constants_removed"] == 2
    assert {name for name, _ in case.gm.named_parameters()} == {"used.weight", "used.bias"}


def test_dce_on_clean_graph_reports_unmodified():
    case = run_pass_case("dce", nn.Linear(3, 3).eval(), (torch.randn(1, 3),))
    assert case.report.records[0].modified is False
