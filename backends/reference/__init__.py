"""The `reference` target: runs the canonical graph in PyTorch (our kernels come in later)."""
from __future__ import annotations

from typing import Callable

import torch.fx

from edgepasses.errors import OptionError
from edgepasses.quant import QuantCaps

from .. import Lowering, tensors_mb


class ReferenceTarget:
    name = "reference"
    quant_caps = QuantCaps(bits=(8,))  # runs the quantize/dequantize graph as it is

    def unavailable_reason(self) -> str | None:
        return None

    def lower(self, gm: torch.fx.GraphModule, example_inputs: tuple, *, strict: bool = False,
              precision: str = "f32", cache_dir: str | None = None) -> Callable:
        if precision != "f32":
            raise OptionError(f"the reference target runs precision 'f32' only; got {precision!r}")
        gm.edge_lowering = Lowering(self.name, precision, partitions=1, weights_mb=tensors_mb(gm))
        return gm
