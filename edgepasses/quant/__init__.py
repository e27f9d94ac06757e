"""Quantization: what targets run (`QuantCaps`), the PT2E quantizer, observers, calibration.

Only this module is free of torchao; the quantizer, observers and QAT import it (extra `quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantCaps:
    """What integer forms a target runs: the quantizer stays inside them."""
    bits: tuple[int, ...] = (8,)               # weights and activations
    weight_only_bits: tuple[int, ...] = (8, 4)  # Linear weights as integer codes, float activations
    symmetric_activations_only: bool = False   # e.g. TensorRT: int8 symmetric only
    symmetric_by_default: bool = False         # OpenVINO: u8 asymmetric activations unless asked


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError("the quantize pass builds on torchao's PT2E flow: pip install 'edgepasses[quantize]'") from exc
