"""Builds `csrc/*.cpp` into one shared library on first use and loads it with ctypes.

The library is plain C++ with a C ABI (raw pointers, no torch headers), so the build needs
only a C++ compiler with OpenMP: no pip build isolation, no torch version to match, a few
seconds to compile. The result is cached under `~/.cache/edgepasses/kernels/` (or
`$EDGEPASSES_CACHE/kernels/`), keyed on the sources, the flags and the compiler's version, so
it is built once per machine. Instruction sets are chosen at run time from CPUID inside the
library (`__builtin_cpu_supports`), not at build time, so one build serves every x86-64 CPU.
OpenMP resolves to the libgomp torch already loaded (same soname), so there is one thread pool.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgepasses.errors import EdgeError

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")


class KernelBuildError(EdgeError):
    """The reference kernels could not be compiled or loaded here."""


def cache_dir() -> Path:
    root = os.environ.get("EDGEPASSES_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepasses"
    return Path(root) / "kernels"


def find_compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelBuildError(
            "the reference target's C++ kernels need a C++ compiler with OpenMP and none was found; "
            "install one (Debian/Ubuntu: `apt install g++`) or set CXX to its path")
    return compiler


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join((version, *FLAGS)).encode())
    for path in sorted(SOURCE_DIR.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: parallel test workers may build at the same time.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, *map(str, _sources()), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"building the reference kernels failed:\n$ {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.replace(partial, target)


def library_path() -> Path:
    compiler = find_compiler()
    target = cache_dir() / f"libedgekernels-{_build_key(compiler)}.so"
    if not target.exists():
        _compile(compiler, target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call), with its functions' signatures declared."""
    import torch  # noqa: F401  (loads torch's libgomp first, so the library shares its OpenMP runtime)

    lib = ctypes.CDLL(str(library_path()))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


_p, _i64, _i32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double

# The C ABI of csrc/*.cpp. Every kernel returns 0 on success, else a nonzero code (bad argument).
SIGNATURES = {
    # x f32 [M,K]; w i8 [N,K]; w_scale f32 [N]; w_sum i32 [N] (row sums of w); bias f32 [N] or NULL;
    # x_scale > 0: static per-tensor (u8 codes, x_zero_point), x_scale <= 0: dynamic per-token;
    # weight_bits 7 promises |w| <= 64 (the u8*s8 16-bit pair path is then exact); out f32 [M,N].
    "edge_int8_linear": (_i32, [_p, _i64, _i64, _p, _i64, _p, _p, _p, _f64, _i32, _i32, _p, _i32]),
    # x f32 [B,C,H,W]; w i8 [O,C/groups,KH,KW]; w_scale f32 [O]; w_sum i32 [O]; bias f32 [O] or NULL;
    # stride/padding/dilation (h, w); groups; x_scale, x_zero_point static; weight_bits; out f32 [B,O,OH,OW].
    "edge_int8_conv2d": (_i32, [_p, _i64, _i64, _i64, _i64, _p, _i64, _i64, _i64, _p, _p, _p,
                                _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f64, _i32, _i32, _p, _i32]),
    # x f32 [M,K]; values f32 [N,K/2]; indices u8 [N,ceil(K/8)]: per group of 4 along K, the two kept
    # positions i0 < i1 as the nibble i0 | i1 << 2, group 2j in the low nibble of byte j;
    # bias f32 [N] or NULL; out f32 [M,N].
    "edge_sparse24_linear_f32": (_i32, [_p, _i64, _i64, _p, _p, _i64, _p, _p, _i32]),
}
