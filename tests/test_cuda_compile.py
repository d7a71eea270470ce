"""Every CUDA source compiles for sm_80 and sm_90 without a single warning.

Two compilers: ``nvcc`` (each ``fastlstm/kernels/*.cu`` as it is on disk, headers by ``-I``) wherever
nvcc is installed, and NVRTC through CuPy's own bindings and options (the exact text and path
the CUDA backend compiles at run time, headers inlined) wherever CuPy and libnvrtc load; NVRTC
needs no GPU.  Any warning fails the test and is shown: these sources are ours and stay clean.
"""

import shutil
import subprocess

import pytest

from fastlstm.backends.cuda_support import CUDA_MODULES, cuda_source
from fastlstm.kernels import CUDA_SOURCE_DIR

ARCHS = ("80", "90")
SOURCES = sorted(p.name for p in CUDA_SOURCE_DIR.glob("*.cu"))


def test_every_source_is_a_module():
    assert sorted(f"{name}.cu" for name in CUDA_MODULES) == SOURCES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles_without_warnings(source, arch, tmp_path):
    command = ["nvcc", "-c", "-std=c++17", f"-I{CUDA_SOURCE_DIR}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-warn-spills",
               "-o", str(tmp_path / "out.o"), str(CUDA_SOURCE_DIR / source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output}"
    assert output == "", f"warnings from {' '.join(command)}:\n{output}"


def _nvrtc():
    """CuPy's NVRTC bindings and compile options, or a skip saying why they are unusable."""
    try:
        from cupy._core import core
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        options = list(core.assemble_cupy_compiler_options(("-std=c++17",)))
    except Exception as exc:  # CuPy or libnvrtc missing
        pytest.skip(f"CuPy's NVRTC is not usable here ({type(exc).__name__}: {exc})")
    return nvrtc, options


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", CUDA_MODULES)
def test_nvrtc_compiles_the_runtime_source(module, arch):
    nvrtc, options = _nvrtc()
    program = nvrtc.createProgram(cuda_source(module), f"{module}.cu", [], [])
    try:
        error = None
        try:
            nvrtc.compileProgram(program, options + [f"--gpu-architecture=compute_{arch}",
                                                     "--device-as-default-execution-space"])
        except nvrtc.NVRTCError as exc:
            error = exc
        log = nvrtc.getProgramLog(program).strip("\x00").strip()
    finally:
        nvrtc.destroyProgram(program)
    assert error is None, f"NVRTC failed on {module}.cu:\n{log}"
    assert log == "", f"NVRTC warnings on {module}.cu:\n{log}"


def test_inlined_source_keeps_no_local_include():
    for module in CUDA_MODULES:
        text = cuda_source(module)
        assert '#include "' not in text
        assert "namespace fastlstm" in text
