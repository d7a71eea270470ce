"""Just enough of CuPy, on NumPy, to run ``fastlstm.backends.cuda`` on a machine without a GPU.

Arrays are NumPy arrays with CuPy's ``.data.ptr`` and ``.get()``; ``RawModule`` compiles the
CUDA source with g++ and ``emulate.h`` (each CUDA thread an OS thread) and launches through
ctypes; ``sgemm``/``dgemm`` are column-major GEMMs on raw pointers done by NumPy, as cuBLAS
defines them.  CUDA graphs and streams are not emulated (use ``graphs=False``).  So the real
backend code (layouts, leading dimensions, offsets, launch plans) and the real kernels run,
and tests compare them with the NumPy reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: a small fake GPU, so that blocks own several units and the last slice is partial
ATTRIBUTES = {"MultiProcessorCount": 2, "MaxSharedMemoryPerBlock": 49152,
              "MaxSharedMemoryPerBlockOptin": 65536, "CooperativeLaunch": 1}


class ndarray(np.ndarray):
    """A NumPy array that answers CuPy's ``.data.ptr`` and ``.get()``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        return np.array(self)


def _wrap(a):
    return np.asarray(a).view(ndarray)


def asarray(a, dtype=None):
    """Like CuPy: a host array is copied to the "device", a device array is kept."""
    if isinstance(a, ndarray):
        return _wrap(np.asarray(a, dtype=dtype))
    return _wrap(np.array(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    return _wrap(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a):
    return np.array(a)


def _maker(fn):
    return lambda *args, **kwargs: _wrap(fn(*args, **kwargs))


empty, zeros, ones = _maker(np.empty), _maker(np.zeros), _maker(np.ones)
empty_like, zeros_like, stack = _maker(np.empty_like), _maker(np.zeros_like), _maker(np.stack)
float32, float64, int64, uint32, uint64 = np.float32, np.float64, np.int64, np.uint32, np.uint64


# ----------------------------------------------------------------------------- kernels

_C_TYPES = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64,
            np.float64: ctypes.c_double, np.float32: ctypes.c_float}


def _build(code, build_dir):
    """Compile ``code`` with the emulator and a launcher per kernel; return (library, names)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(code.encode() + (HERE / "emulate.h").read_bytes()).hexdigest()[:16]
    library = build_dir / f"emulated_{digest}.so"
    source = build_dir / f"emulated_{digest}.cpp"
    flags = ["-std=c++17", "-pthread", f"-I{HERE}", "-include", str(HERE / "emulate.h")]
    expanded = subprocess.run(["g++", *flags, "-E", "-x", "c++", "-"], input=code, text=True,
                              capture_output=True, check=True).stdout
    names = sorted(set(re.findall(r'extern "C"\s+void (fastlstm_\w+)\(', expanded)))
    if not library.exists():
        launchers = "".join(
            f'extern "C" void emu_launch_{n}(unsigned gx, unsigned gy, unsigned bx, '
            f"size_t smem, int coop, void** args) {{ emu::launch(&{n}, dim3{{gx, gy, 1}}, "
            f"dim3{{bx, 1, 1}}, smem, coop != 0, args); }}\n" for n in names)
        source.write_text(code + "\n" + launchers)
        subprocess.run(["g++", *flags, "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas",
                        "-x", "c++", str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library)), names


class _Kernel:
    def __init__(self, launcher, cooperative):
        self.launcher, self.cooperative = launcher, cooperative
        self.max_dynamic_shared_size_bytes = 0
        self.kernel = types.SimpleNamespace(ptr=0)

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (2 - len(grid))
        keep = []
        for a in args:
            if isinstance(a, np.ndarray):
                keep.append(ctypes.c_void_p(a.__array_interface__["data"][0]))
            else:
                keep.append(_C_TYPES[type(a)](a))
        pointers = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])
        assert shared_mem <= ATTRIBUTES["MaxSharedMemoryPerBlockOptin"], shared_mem
        self.launcher(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]),
                      ctypes.c_size_t(shared_mem), ctypes.c_int(int(self.cooperative)), pointers)


class RawModule:
    build_dir = Path("/tmp/fastlstm-emulated")

    def __init__(self, code, options=(), enable_cooperative_groups=False):
        self.code, self.cooperative = code, enable_cooperative_groups
        self.library = None

    def get_function(self, name):
        if self.library is None:
            self.library, self.names = _build(self.code, self.build_dir)
        if name not in self.names:
            raise KeyError(f"no kernel {name} (have {self.names})")
        return _Kernel(getattr(self.library, f"emu_launch_{name}"), self.cooperative)


# ----------------------------------------------------------------------------- cuBLAS


def _column_major(ptr, rows, cols, ld, dtype):
    itemsize = np.dtype(dtype).itemsize
    count = (cols - 1) * ld + rows
    buffer = (ctypes.c_char * (count * itemsize)).from_address(ptr)
    flat = np.frombuffer(buffer, dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (itemsize, ld * itemsize))


def _gemm(dtype):
    def gemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        alpha = np.frombuffer((ctypes.c_char * 8).from_address(alpha), dtype=dtype, count=1)[0]
        beta = np.frombuffer((ctypes.c_char * 8).from_address(beta), dtype=dtype, count=1)[0]
        op_a = _column_major(a, k, m, lda, dtype).T if transa else \
            _column_major(a, m, k, lda, dtype)
        op_b = _column_major(b, n, k, ldb, dtype).T if transb else \
            _column_major(b, k, n, ldb, dtype)
        out = _column_major(c, m, n, ldc, dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs are tested
            product = alpha * (op_a.astype(np.float64) @ op_b.astype(np.float64))
        out[...] = product if beta == 0 else product + beta * out
    return gemm


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def modules():
    """The fake ``cupy`` and ``cupy_backends`` modules, by their import names."""
    cublas = _module("cupy_backends.cuda.libs.cublas", sgemm=_gemm(np.float32),
                     dgemm=_gemm(np.float64), setStream=lambda handle, stream: None,
                     setPointerMode=lambda handle, mode: None, CUBLAS_POINTER_MODE_HOST=0,
                     CUBLAS_OP_N=0, CUBLAS_OP_T=1)
    device = types.SimpleNamespace(id=0, attributes=ATTRIBUTES)
    cuda = _module(
        "cupy.cuda",
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        Device=lambda device_id=0: device,
        driver=types.SimpleNamespace(
            occupancyMaxActiveBlocksPerMultiprocessor=lambda fn, threads, smem: 8),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    this = sys.modules[__name__]
    cupy = _module("cupy", cuda=cuda, RawModule=RawModule, **{
        name: getattr(this, name) for name in (
            "ndarray", "asarray", "ascontiguousarray", "asnumpy", "empty", "zeros", "ones",
            "empty_like", "zeros_like", "stack", "float32", "float64", "int64", "uint32",
            "uint64")})
    libs = _module("cupy_backends.cuda.libs", cublas=cublas)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy_backends": _module("cupy_backends"),
            "cupy_backends.cuda": _module("cupy_backends.cuda", libs=libs),
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas}
