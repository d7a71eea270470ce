"""What the GPU machine has: the GPU, driver, CUDA runtime, NVRTC, CuPy, PyTorch and cuDNN,
whether Numba imports, and the build tools the editable install needs.

Each fact is read on its own: one that cannot be read records why (the exception), and the
others are still read.  Prints one line per fact and writes them as JSON:

    python benchmarks/gpu_environment.py environment.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata


def _nvidia_smi():
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"nvidia-smi exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def _cupy_device():
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return dict(name=name.decode() if isinstance(name, bytes) else name,
                compute_capability=f"{props['major']}.{props['minor']}",
                multiprocessors=props["multiProcessorCount"])


def _cuda_version(number):
    """CUDA's integer version (12040) as text (12.4)."""
    return f"{number // 1000}.{number % 1000 // 10}"


def _cupy_attr(path):
    def read():
        import cupy
        value = cupy
        for part in path.split("."):
            value = getattr(value, part)
        return value() if callable(value) else value
    return read


def _numba():
    import numba
    return numba.__version__


def _torch():
    import torch
    return dict(version=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(), cuda_available=torch.cuda.is_available())


def _fastlstm():
    import fastlstm
    import fastlstm.kernels
    return dict(version=fastlstm.__version__, path=fastlstm.__file__)


FACTS = {
    "nvidia_smi": _nvidia_smi,
    "gpu": _cupy_device,
    "cuda_driver": lambda: _cuda_version(_cupy_attr("cuda.runtime.driverGetVersion")()),
    "cuda_runtime": lambda: _cuda_version(_cupy_attr("cuda.runtime.runtimeGetVersion")()),
    "nvrtc": lambda: "%d.%d" % _cupy_attr("cuda.nvrtc.getVersion")(),
    "cupy": _cupy_attr("__version__"),
    "cuda_path": _cupy_attr("cuda.get_cuda_path"),
    "numba": _numba,
    "numpy": lambda: metadata.version("numpy"),
    "torch": _torch,
    "setuptools": lambda: metadata.version("setuptools"),
    "wheel": lambda: metadata.version("wheel"),
    "pip": lambda: metadata.version("pip"),
    "fastlstm": _fastlstm,
}


def read_facts():
    facts = dict(python=platform.python_version(), executable=sys.executable)
    for name, read in FACTS.items():
        try:
            facts[name] = read()
        except Exception as exc:  # record why, and read the next fact
            facts[name] = f"unavailable: {type(exc).__name__}: {exc}"
    return facts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(f"usage: {sys.argv[0]} environment.json")
    facts = read_facts()
    for name, value in facts.items():
        print(f"{name}: {value}")
    with open(argv[0], "w") as f:
        json.dump(facts, f, indent=2)


if __name__ == "__main__":
    main()
