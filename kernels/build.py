"""Builds `csrc/**/*.cpp` into one shared library on first use and loads it with ctypes.

The library is plain C++ with a C ABI (raw pointers, each with its size in bytes, which the
C++ checks: abi.py; no torch headers), so the build needs only a C++ compiler with OpenMP: no
pip build isolation, no torch version to match, a few seconds to compile. The result is cached
under `edgepasses.paths.cache_root()/kernels/`, keyed on the sources, the flags and the
compiler's version, so it is built once per machine. Instruction sets are chosen at run time from CPUID inside the
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
from edgepasses.paths import cache_root

from . import abi

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")


class KernelBuildError(EdgeError):
    """The reference kernels could not be compiled or loaded here."""


def cache_dir() -> Path:
    return cache_root() / "kernels"


def find_compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelBuildError(
            "the reference target's C++ kernels need a C++ compiler with OpenMP and none was found; "
            "install one (Debian/Ubuntu: `apt install g++`) or set CXX to its path")
    return compiler


def _sources() -> list[Path]:
    return sorted(SOURCE_DIR.rglob("*.cpp"))


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\0".join((version, *FLAGS)).encode())
    for path in sorted(SOURCE_DIR.rglob("*.[ch]*")):
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def compile_library(compiler: str, target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """Compiles every source into the shared library `target` (with other `flags`: e.g. the
    AddressSanitizer build of the tests)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: parallel test workers may build at the same time.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [compiler, *flags, *map(str, _sources()), "-o", str(partial)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(f"building the reference kernels failed:\n$ {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.replace(partial, target)


def library_path() -> Path:
    compiler = find_compiler()
    target = cache_dir() / f"libedgekernels-{_build_key(compiler)}.so"
    if not target.exists():
        compile_library(compiler, target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call), with its functions' signatures declared."""
    import torch  # noqa: F401  (loads torch's libgomp first, so the library shares its OpenMP runtime)

    return abi.declare(ctypes.CDLL(str(library_path())))


def last_error() -> str:
    """The message of the last call the library refused on this thread."""
    return abi.last_error(library())
