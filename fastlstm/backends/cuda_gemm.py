"""GEMMs of the CUDA backend: row-major operands in device memory, one interface.

Every implementation has ``gemm(c, a, b, ta=False, tb=False, accumulate=False)``:
``c = op(a) @ op(b)`` (``c += ...`` where ``accumulate``), ``op`` transposing where ``ta`` /
``tb``, on :class:`Mat` views, on CuPy's current stream, in the operands' precision (float32
accumulates in float32, no TF32).  Each must be capturable in a CUDA graph, which rules out
CuPy's own cuBLAS wrappers: every CuPy release through 14.2 raises ``NotImplementedError`` for a
cuBLAS call on a capturing stream (``cupy_backends/cuda/libs/cublas.pyx``, ``setStream``).

- :class:`CublasGemm` calls cuBLAS's C API itself (ctypes, on the ``libcublas`` CuPy loaded),
  on a handle of its own with a workspace of its own.
- :class:`KernelGemm` runs fastlstm's own kernels (``fastlstm/kernels/gemm.cu``).

Which is faster at the backend's shapes is for a GPU to tell (``benchmarks/gpu_epoch.py``
times the backend with each); both pass the same parity tests.  CuPy is imported where an
object is made, not here, so that the plans and this module import without a GPU.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["Mat", "CublasGemm", "KernelGemm", "GemmPlan", "gemm_plan", "load_cublas"]


class Mat:
    """A row-major matrix in device memory: pointer, shape and leading dimension (in elements)."""

    __slots__ = ("ptr", "rows", "cols", "ld")

    def __init__(self, ptr, rows, cols, ld):
        self.ptr, self.rows, self.cols, self.ld = int(ptr), int(rows), int(cols), int(ld)

    @classmethod
    def of(cls, a, rows=None, cols=None, ld=None, offset=0):
        """``a`` (C-contiguous, any shape) seen as ``rows x cols`` with ``ld``, from ``offset``."""
        if rows is None:
            rows, cols = a.shape
        return cls(a.data.ptr + offset * a.itemsize, rows, cols, cols if ld is None else ld)

    def shape(self, trans):
        return (self.cols, self.rows) if trans else (self.rows, self.cols)


def _product_shape(c, a, b, ta, tb):
    """``(m, n, k)`` of ``c = op(a) @ op(b)``, checked."""
    m, k = a.shape(ta)
    k2, n = b.shape(tb)
    if k != k2 or (c.rows, c.cols) != (m, n):
        raise ValueError(f"GEMM shapes do not match: ({m}, {k}) @ ({k2}, {n}) into "
                         f"({c.rows}, {c.cols})")
    return m, n, k


# ----------------------------------------------------------------------------- cuBLAS

_OP_N, _OP_T = 0, 1  # cublasOperation_t
_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
           11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR",
           15: "NOT_SUPPORTED"}


def load_cublas():
    """``libcublas`` through ctypes: the copy that CuPy loaded, found by cuda-pathfinder (a
    dependency of CuPy 14) or else by its soname, which the dynamic loader matches against
    the libraries already loaded."""
    path = None
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
        path = load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:  # an older CuPy without cuda-pathfinder, or a library it cannot place
        pass
    if path is None:
        import cupy
        path = f"libcublas.so.{cupy.cuda.runtime.runtimeGetVersion() // 1000}"
    return ctypes.CDLL(path)


def _check(status, call):
    if status != 0:
        raise RuntimeError(f"cuBLAS {call} failed: CUBLAS_STATUS_"
                           f"{_STATUS.get(status, status)}")


class CublasGemm:
    """cuBLAS's ``sgemm`` / ``dgemm`` called through its C API, so that a CUDA graph captures them.

    The handle is this object's own (CuPy's handle keeps its state), in cuBLAS's default math
    mode (no TF32) with host scalars.  Before the first GEMM on a stream it sets the stream and
    then the workspace, in that order because ``cublasSetStream`` resets the workspace to
    cuBLAS's pool, from which a captured GEMM would allocate anew for every graph
    (pytorch#83461); :data:`WORKSPACE_BYTES` is what cuBLAS's documentation recommends for
    Hopper.

    Parameters
    ----------
    dtype : float32 or float64
    library : ctypes library, optional
        ``libcublas`` (:func:`load_cublas` by default).
    """

    WORKSPACE_BYTES = 32 << 20

    def __init__(self, dtype, library=None):
        import cupy
        dtype = np.dtype(dtype)
        self.lib = load_cublas() if library is None else library
        scalar = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self.fn = self.lib.cublasSgemm_v2 if dtype == np.float32 else self.lib.cublasDgemm_v2
        i32, ptr = ctypes.c_int, ctypes.c_void_p
        self.fn.argtypes = [ptr, i32, i32, i32, i32, i32, ptr, ptr, i32, ptr, i32, ptr, ptr, i32]
        self.fn.restype = i32
        for name, argtypes in (("cublasCreate_v2", [ptr]), ("cublasDestroy_v2", [ptr]),
                               ("cublasSetStream_v2", [ptr, ptr]),
                               ("cublasSetWorkspace_v2", [ptr, ptr, ctypes.c_size_t])):
            getattr(self.lib, name).argtypes = argtypes
            getattr(self.lib, name).restype = i32
        handle = ctypes.c_void_p()
        _check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate_v2")
        self.handle = handle.value
        weakref.finalize(self, self.lib.cublasDestroy_v2, self.handle)
        self.workspace = cupy.empty((self.WORKSPACE_BYTES,), cupy.uint8)
        self.one, self.zero = scalar(1), scalar(0)
        self._current_stream = cupy.cuda.get_current_stream
        self._stream = None  # the stream the handle is on, with the workspace set after it

    def _on(self, stream):
        if stream != self._stream:
            _check(self.lib.cublasSetStream_v2(self.handle, stream), "cublasSetStream_v2")
            _check(self.lib.cublasSetWorkspace_v2(self.handle, self.workspace.data.ptr,
                                                  self.WORKSPACE_BYTES), "cublasSetWorkspace_v2")
            self._stream = stream

    def gemm(self, c, a, b, ta=False, tb=False, accumulate=False):
        m, n, k = _product_shape(c, a, b, ta, tb)
        self._on(self._current_stream().ptr)
        beta = self.one if accumulate else self.zero
        # Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
        _check(self.fn(self.handle, (_OP_N, _OP_T)[tb], (_OP_N, _OP_T)[ta], n, m, k,
                       ctypes.byref(self.one), b.ptr, b.ld, a.ptr, a.ld, ctypes.byref(beta),
                       c.ptr, c.ld), "gemm")


# ----------------------------------------------------------------------------- our own kernels

#: the tiling of ``fastlstm/kernels/gemm.cu`` (its ``TILE``, ``TILE_K``, ``THREADS``)
TILE, TILE_K, THREADS = 64, 16, 256
#: split K only while the output tiles leave fewer blocks than this (about 2 per SM of an H200)
TARGET_BLOCKS = 256
#: K tiles each split multiplies at least, so a split outweighs its partial's store and sum
MIN_SPLIT_TILES = 16
#: blocks of the split sum, looping over the elements beyond
MAX_SUM_BLOCKS = 1024
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class GemmPlan:
    """How :class:`KernelGemm` launches one shape.

    ``grid``: (column tiles, row tiles x ``splits``) of the tile kernel; ``k_chunk``: K per
    split (a multiple of ``TILE_K``; every split has some K).  ``splits == 1`` writes C
    directly, more write partials that a second kernel sums in split order.
    """

    grid: tuple
    splits: int
    k_chunk: int


def gemm_plan(m, n, k):
    """The :class:`GemmPlan` of ``(m x k) @ (k x n)``: a function of the shape alone.

    K is split when the tiles of C alone leave a GPU short of blocks (the weight gradients:
    few tiles, K = T*B columns), into as many splits as bring the blocks to
    :data:`TARGET_BLOCKS`, each at least :data:`MIN_SPLIT_TILES` K tiles deep.  The plan does
    not depend on the device, so every GPU (and the emulator) adds in the same order.
    """
    row_tiles, col_tiles = math.ceil(m / TILE), math.ceil(n / TILE)
    k_tiles = math.ceil(k / TILE_K)
    splits = max(1, min(math.ceil(TARGET_BLOCKS / max(1, row_tiles * col_tiles)),
                        k_tiles // MIN_SPLIT_TILES))
    k_chunk = math.ceil(k_tiles / splits) * TILE_K
    splits = math.ceil(k / k_chunk) if k else 1  # no empty split
    if row_tiles * splits > MAX_GRID_Y:
        raise ValueError(f"a GEMM of {m} rows is too large for the kernel's grid")
    return GemmPlan((col_tiles, row_tiles * splits), splits, k_chunk)


class KernelGemm:
    """Row-major GEMM on fastlstm's own kernels (``fastlstm/kernels/gemm.cu``), on CuPy's
    current stream: plain kernel launches, which a CUDA graph captures.

    Tiling: 64 x 64 tiles of C per block of 256 threads, each thread a 4 x 4 micro-tile,
    operands staged 16 deep in shared memory, K-major whatever the transpositions, so the
    inner loop reads shared memory without bank conflicts (the reasons are in gemm.cu).  These
    are the textbook sizes for a CUDA-core GEMM in both precisions (float32 must not use TF32,
    float64 has no tensor-core path here), chosen, not tuned: they have not been measured on a
    GPU (``benchmarks/gpu_epoch.py`` times the backend on them, no benchmark these GEMMs alone).

    K is split (:func:`gemm_plan`) where the tiles of C are few; the partials go to one
    workspace that this object owns, grown to the largest split GEMM it has run (at most
    ``2 * TARGET_BLOCKS * TILE**2`` elements, by the plan's rule) and never shrunk, so an
    object that runs the same shapes again (a training slot's: the backend runs a step once
    before it captures it) never allocates again.  A second kernel adds the partials in split
    order: every run gives the same bits.  The workspace makes this object's GEMMs
    stream-ordered: one object serves one stream at a time (the CUDA backend keeps one per
    thread, and one per training slot).

    Parameters
    ----------
    dtype : float32 or float64
    kernel : callable
        ``kernel(name, dtype)`` gives the kernel ``fastlstm_<name>_<f32|f64>`` of
        ``fastlstm/kernels/gemm.cu`` (the CUDA backend's ``_kernel``, bound to that module).
    """

    def __init__(self, dtype, kernel):
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"KernelGemm supports float32 and float64, not {self.dtype}")
        self._kernel = kernel
        self._partials = None

    def gemm(self, c, a, b, ta=False, tb=False, accumulate=False):
        """``c = op(a) @ op(b)`` (``c += ...`` where ``accumulate``) with ``op`` transposing where
        ``ta`` / ``tb``; ``c`` must not overlap ``a`` or ``b``.

        Without ``accumulate`` the old ``c`` is not read (NaN there does not propagate).
        """
        m, n, k = _product_shape(c, a, b, ta, tb)
        if m == 0 or n == 0:
            return
        plan = gemm_plan(m, n, k)
        tile = self._kernel(f"gemm_{'nt'[ta]}{'nt'[tb]}", self.dtype)
        operands = (np.uint64(a.ptr), np.int64(a.ld), np.uint64(b.ptr), np.int64(b.ld))
        shape = (np.int32(m), np.int32(n), np.int32(k), np.int32(plan.k_chunk))
        if plan.splits == 1:
            tile(plan.grid, (THREADS,), operands + (np.uint64(c.ptr), np.int64(c.ld),
                                                    np.int64(0)) + shape
                 + (np.int32(accumulate),))
            return
        partials = self._workspace(plan.splits * m * n)
        tile(plan.grid, (THREADS,), operands + (partials, np.int64(n), np.int64(m * n)) + shape
             + (np.int32(0),))
        blocks = min(math.ceil(m * n / THREADS), MAX_SUM_BLOCKS)
        self._kernel("gemm_sum_splits", self.dtype)(
            (blocks,), (THREADS,), (partials, np.int32(plan.splits), np.int64(m * n),
                                    np.uint64(c.ptr), np.int64(c.ld), np.int32(m), np.int32(n),
                                    np.int32(accumulate)))

    def _workspace(self, size):
        """The partials' buffer, of ``size`` elements at least."""
        if self._partials is None or self._partials.size < size:
            import cupy
            self._partials = cupy.empty(size, self.dtype)
        return self._partials
