import pytest


@pytest.fixture(params=["avx2", "portable"])
def path(request, monkeypatch):
    """Each CPU path of the C++ kernels: the one CPUID picks here (AVX2), and the portable one."""
    if request.param == "portable":
        monkeypatch.setenv("EDGE_KERNELS_PORTABLE", "1")
    else:
        monkeypatch.delenv("EDGE_KERNELS_PORTABLE", raising=False)
    return request.param
