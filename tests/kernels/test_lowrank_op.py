"""edge::lowrank_linear equals its two matmuls, for generated shapes, and traces."""
import torch
from hypothesis import given, settings, strategies as st

from edgepasses.kernels import ops


@settings(max_examples=30, deadline=None, derandomize=True)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), k=st.integers(1, 40), r=st.integers(1, 12),
       n=st.integers(1, 40), with_bias=st.booleans())
def test_lowrank_linear_is_the_two_matmuls(lead, k, r, n, with_bias):
    torch.manual_seed(len(lead) * 1000 + k * 31 + r * 7 + n)
    x, first, second = torch.randn(*lead, k), torch.randn(r, k), torch.randn(n, r)
    bias = torch.randn(n) if with_bias else None
    expected = (x.double() @ first.double().T) @ second.double().T + (0 if bias is None else bias.double())
    out = ops.lowrank_linear(x, first, second, bias)
    assert out.shape == (*lead, n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_lowrank_linear_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = ops.lowrank_linear(torch.empty(2, 3, 8), torch.empty(4, 8), torch.empty(5, 4), None)
    assert out.shape == (2, 3, 5)
