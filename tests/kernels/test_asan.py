"""The C++ kernels under AddressSanitizer: an out-of-bounds read or write fails this test.

The kernels are built with `-fsanitize=address` (build.compile_library, into a temporary
directory: the normal build is untouched) and driven through their raw C ABI, bypassing every
Python check, by `asan_calls.py` in a subprocess with libasan preloaded (the interpreter itself
is not instrumented). Four runs:
  - short buffers and bad arguments: refused by the C++ with a message naming the buffer, and
    ASan reports nothing (the C++ checks sizes before reading);
  - valid calls over shapes, both CPU paths and thread counts: succeed, and ASan reports nothing;
  - a call that lies about its indices' size: ASan must report the read past the block, which
    shows the harness would catch a kernel reading out of bounds;
  - the `edge::` ops themselves on torch tensors, with the ASan build swapped in: valid calls run
    clean and broken arguments (short indices, ...) are refused before any C++ runs.
Skipped, with the reason, where no C++ compiler or no libasan is available."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from edgepasses.kernels import build

SCRIPT = Path(__file__).with_name("asan_calls.py")
ASAN_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-std=c++17", "-fPIC", "-shared",
              "-fopenmp", "-fno-math-errno")


def runtime_library(compiler: str, name: str) -> str | None:
    """The compiler's runtime library `name`, or None (`-print-file-name` echoes the bare name when absent)."""
    result = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=False)
    path = result.stdout.strip()
    return path if result.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory) -> tuple[Path, str, str | None]:
    """(the ASan build of the kernel library, the libasan to preload, the libstdc++ beside it or None)."""
    try:
        compiler = build.find_compiler()
    except build.KernelBuildError as error:
        pytest.skip(f"no C++ compiler: {error}")
    runtime = runtime_library(compiler, "libasan.so")
    if runtime is None:
        pytest.skip(f"{compiler} has no libasan.so (install libasan / gcc's sanitizer runtime)")
    target = tmp_path_factory.mktemp("asan") / "libedgekernels-asan.so"
    build.compile_library(compiler, target, ASAN_FLAGS)
    return target, runtime, runtime_library(compiler, "libstdc++.so")


def run_calls(asan_build, mode: str, preload_libstdcxx: bool = False) -> subprocess.CompletedProcess:
    library, runtime, libstdcxx = asan_build
    # With torch in the process, libstdc++ must be loaded before ASan initialises, or ASan cannot
    # intercept the C++ exceptions torch throws (it aborts in its __cxa_throw interceptor).
    preload = f"{runtime} {libstdcxx}" if preload_libstdcxx else runtime
    env = {**os.environ, "LD_PRELOAD": preload, "OMP_NUM_THREADS": "2",
           # Python itself leaks by design at exit; stop at the first error with a clear exit code.
           "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:exitcode=86"}
    env.pop("EDGE_KERNELS_PORTABLE", None)
    return subprocess.run([sys.executable, str(SCRIPT), str(library), mode], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    report = result.stdout[-3000:] + result.stderr[-6000:]
    assert "AddressSanitizer" not in result.stderr, report
    assert result.returncode == 0 and result.stdout.rstrip().endswith("ALL OK"), report


def test_the_cpp_refuses_short_buffers_and_reads_nothing_out_of_bounds(asan_build):
    result = run_calls(asan_build, "refuse")
    assert_clean(result)
    assert ("sparse24_linear_f32 short indices: code 5: edge_sparse24_linear_f32: indices holds 15 bytes, "
            "expected 16") in result.stdout, result.stdout


def test_valid_calls_run_clean_under_asan(asan_build):
    assert_clean(run_calls(asan_build, "valid"))


def test_asan_catches_a_read_past_the_indices(asan_build):
    """The harness works: indices one byte shorter than claimed make the kernel read past the block."""
    result = run_calls(asan_build, "lie")
    assert result.returncode == 86, result.stdout + result.stderr[-3000:]
    assert "heap-buffer-overflow" in result.stderr and "edge_sparse24_linear_f32" in result.stderr, result.stderr[-3000:]


def test_the_ops_under_asan(asan_build):
    """The ops on torch tensors (the Python wrappers pass the right buffers and sizes): valid calls
    run clean, short indices and other broken arguments are refused."""
    if asan_build[2] is None:
        pytest.skip("no libstdc++.so from the compiler to preload beside libasan (torch needs it under ASan)")
    result = run_calls(asan_build, "ops", preload_libstdcxx=True)
    assert_clean(result)
    assert "sparse24 2x32x8 short indices: KernelError: edge::sparse24_linear: indices must have shape (8, 4)" in \
        result.stdout, result.stdout
