"""One cache root for what edgepasses builds or trains once per machine."""
from pathlib import Path

import pytest

from edgepasses.paths import cache_root


def test_cache_root_prefers_edgepasses_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDGEPASSES_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "edgepasses"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edgepasses"
    monkeypatch.setenv("EDGEPASSES_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_kernels_tvm_and_trained_models_share_it(monkeypatch, tmp_path):
    pytest.importorskip("tvm")
    from edgepasses.backends.tvm.build import cache_root as tvm_root
    from edgepasses.zoo.digits import cache_dir as models_dir
    from edgepasses.kernels.build import cache_dir as kernels_dir

    monkeypatch.setenv("EDGEPASSES_CACHE", str(tmp_path))
    assert (kernels_dir(), tvm_root(), models_dir()) == (tmp_path / "kernels", tmp_path / "tvm", Path(tmp_path))
