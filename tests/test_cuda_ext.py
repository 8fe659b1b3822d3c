"""Every hand-written CUDA source (arbd/ternary/csrc/*.cu) compiles for Hopper, and builds are
cached by source. Needs nvcc only, no GPU: a broken source fails here, before the GPU machine."""
import pytest

from arbd.ternary import cuda_ext

SOURCES = sorted(cuda_ext.CSRC.glob("*.cu"))


def test_the_sources_are_found():
    assert {p.name for p in SOURCES} >= {"small_m.cu", "rows.cu", "large_m.cu"}


@pytest.mark.skipif(cuda_ext.nvcc() is None, reason="needs nvcc")
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_source_compiles_for_hopper(source, monkeypatch, tmp_path):
    monkeypatch.setenv("ARBD_EXT_DIR", str(tmp_path))
    arch = cuda_ext.arch_for(source, "90")
    lib = cuda_ext.build(source, arch)
    assert lib.exists() and lib.stat().st_size > 0 and lib.name.startswith(source.stem)
    assert cuda_ext.build(source, arch) == lib  # cached by source hash
    assert len(list(tmp_path.iterdir())) == 1   # no temporary left behind
