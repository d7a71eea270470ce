"""The package builds into a wheel that carries the hand-written kernels."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build", reason="the 'build' package (pip install 'fastlstm[test]') builds the wheel")


def test_wheel_ships_the_kernels_and_the_mnist_sample(tmp_path):
    # Build from a copy so the test leaves no build/ or egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "*.nbi", "*.nbc"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                    "--outdir", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fastlstm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_sources = sorted(p.name for p in (ROOT / "fastlstm" / "kernels").iterdir()
                            if p.suffix in {".py", ".cu", ".cuh"})
    assert kernel_sources, "no kernel sources found"
    for name in kernel_sources:
        assert f"fastlstm/kernels/{name}" in names, f"{name} missing from {wheel.name}"
    assert "fastlstm/backends/cpu.py" in names
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "ATTRIBUTION.md"):
        assert f"fastlstm/data/{name}" in names, f"{name} missing from {wheel.name}"


def test_installed_kernels_import_as_fastlstm_kernels():
    import fastlstm.kernels
    from fastlstm.kernels import lstm_cpu

    assert lstm_cpu.__name__ == "fastlstm.kernels.lstm_cpu"
    assert fastlstm.kernels.CUDA_SOURCE_DIR.is_dir()
