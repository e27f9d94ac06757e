"""TVM's own int8 convolution (`backends/tvm/int8_conv.py`) against the C++ kernel of the same op."""
import numpy as np
import pytest
import torch

pytest.importorskip("tvm", reason="TVM is not installed: pip install apache-tvm")

import tvm  # noqa: E402

from edgepasses.backends.tvm import int8_conv  # noqa: E402
from edgepasses.backends.tvm.build import host_target  # noqa: E402
from edgepasses.kernels import ops  # noqa: E402
from edgepasses.quant import cpu_flags  # noqa: E402

pytestmark = pytest.mark.skipif("avx2" not in cpu_flags(), reason="the u8·s8 dot product intrinsic needs AVX2")


def _packed(codes: torch.Tensor) -> np.ndarray:
    """[O, C, KH, KW] → [O/16, C/blk, KH, KW, blk/4, 16, 4], written out independently of `packing`."""
    out_ch, in_ch, kh, kw = codes.shape
    block = int8_conv.in_block(in_ch)
    padded = torch.zeros(out_ch, -(-in_ch // block) * block, kh, kw, dtype=torch.int8)
    padded[:, :in_ch] = codes
    blocked = padded.reshape(out_ch // 16, 16, -1, block // 4, 4, kh, kw)
    return blocked.permute(0, 2, 5, 6, 3, 1, 4).contiguous().numpy()


@pytest.mark.parametrize("in_ch, out_ch, size, kernel, stride, padding, zero_point, bias", [
    (3, 16, 20, 7, 2, 3, 117, True),   # a stem: fewer input channels than a block, zero point at the border
    (16, 32, 9, 3, 1, 1, 0, True),     # odd map: one-pixel tiles
    (32, 16, 8, 1, 2, 0, 5, False),    # 1x1, stride 2, no bias
    (32, 32, 6, 3, 1, 1, 3, True),
])
def test_matches_the_cpp_kernel(in_ch, out_ch, size, kernel, stride, padding, zero_point, bias):
    torch.manual_seed(0)
    x = torch.randn(1, in_ch, size, size)
    codes = torch.randint(-64, 65, (out_ch, in_ch, kernel, kernel), dtype=torch.int8)
    scale, weight_sum = torch.rand(out_ch) * 0.01, codes.flatten(1).sum(1, dtype=torch.int32)
    b = torch.randn(out_ch) if bias else None
    want = ops.int8_conv2d(x, ops.pack_int8_conv2d_weight(codes), scale, weight_sum, b, [stride] * 2,
                           [padding] * 2, [1, 1], 1, 0.02, zero_point, 7)
    packed = _packed(codes)
    func = int8_conv.schedule(int8_conv.compute(tuple(x.shape), packed.shape, (stride, stride), (padding, padding),
                                                0.02, zero_point, bias))
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())
    inputs = [x.numpy(), packed, scale.numpy(), weight_sum.numpy()] + ([b.numpy()] if bias else [])
    args = [tvm.runtime.tensor(a) for a in inputs + [np.zeros(want.shape, "float32")]]
    lib["main"](*args)
    # The same integers; the dequantization's float products may round in another order.
    torch.testing.assert_close(torch.from_numpy(args[-1].numpy()), want, rtol=1e-5, atol=1e-5)


def test_supported_layers():
    assert int8_conv.supported(64, 64, 1, (1, 1), 7)
    assert int8_conv.supported(3, 64, 1, (1, 1), 7)        # one block of 4 channels
    assert not int8_conv.supported(64, 64, 1, (1, 1), 8)   # 8-bit weights saturate vpmaddubsw's int16 sums
    assert not int8_conv.supported(64, 64, 64, (1, 1), 7)  # depthwise
    assert not int8_conv.supported(24, 64, 1, (1, 1), 7)   # channels that do not fill blocks
    assert not int8_conv.supported(64, 40, 1, (1, 1), 7)
    assert not int8_conv.supported(64, 64, 1, (2, 2), 7)
