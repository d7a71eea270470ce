"""Hand-written kernels of fastlstm.

``*_cpu.py`` are Numba kernels for the CPU backend; ``*.cu`` are CUDA sources
compiled at run time by the CUDA backend.
"""

from pathlib import Path

from . import _numba_cache

#: folder holding the CUDA sources (``*.cu``) at run time
CUDA_SOURCE_DIR = Path(__file__).resolve().parent

# before any kernel module defines a cached function: the locator is chosen then
_numba_cache.install()
