"""Quantization: what targets run (`QuantCaps`), the PT2E quantizer, observers, calibration.

Only this module is free of torchao; the quantizer, observers and QAT import it (extra `quantize`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantCaps:
    """What integer forms a target runs: the quantizer stays inside them."""
    bits: tuple[int, ...] = (8,)               # weights and activations
    weight_only_bits: tuple[int, ...] = (8, 4)  # Linear weights as integer codes, float activations
    symmetric_activations_only: bool = False   # e.g. TensorRT: int8 symmetric only
    symmetric_by_default: bool = False         # OpenVINO: u8 asymmetric activations unless asked
    # Its int8 kernels add u8×s8 products in pairs into 16 bits, saturating (x86 without VNNI:
    # vpmaddubsw). quantize(overflow_fix=auto) then keeps weights to 7 bits, as NNCF's overflow_fix.
    saturating_int8: bool = False
    # Where saturation is the runtime's (OpenVINO), 8-bit weights are a trade it may make: auto keeps
    # 7 bits only on layers whose sums saturate more than 7-bit rounding costs. Our own kernels
    # (reference, TVM) are written for 7-bit weights: every layer then.
    saturation_per_layer: bool = False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (avx2, avx512_vnni, ...); empty where it cannot tell.
    Read once: the int8 converters ask for every conv."""
    try:
        with open("/proc/cpuinfo") as info:
            return frozenset(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def cpu_int8_saturates() -> bool:
    """Whether this CPU's int8 dot products go through 16-bit pair sums: x86 without VNNI or AMX."""
    import platform

    flags = cpu_flags()
    if platform.machine().lower() not in ("x86_64", "amd64") or not flags:
        return False  # cannot tell: assume the VNNI path rather than cost every user a bit of precision
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ImportError("the quantize pass builds on torchao's PT2E flow: pip install 'edgepasses[quantize]'") from exc
