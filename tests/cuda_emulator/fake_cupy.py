"""Just enough of CuPy, on NumPy, to run ``fastlstm.backends.cuda`` on a machine without a GPU.

Arrays are NumPy arrays with CuPy's ``.data.ptr`` and ``.get()``; ``RawModule`` compiles the
CUDA source with g++ and ``emulate.h`` (each CUDA thread an OS thread) and launches through
ctypes; GEMMs are column-major products on raw pointers done by NumPy in the operands'
precision, as cuBLAS defines them, both through CuPy's own cuBLAS wrappers
(``cupy_backends.cuda.libs.cublas``) and through the C API that :func:`cublas_library` stands
in for (what a ctypes caller of ``libcublas`` gets).  So the real backend code (layouts,
leading dimensions, offsets, launch plans) and the real kernels run, and tests compare them
with the NumPy reference.

Faithful where CuPy's behaviour decides whether the backend's code is right on a GPU (the
review in ``shared/reviews/cuda-backend.md`` found each of these papered over before):

- Streams and CUDA graphs: the work issued on a stream that is capturing (kernel launches,
  the C API's GEMMs, in-place array operations) is recorded, not run, and
  :meth:`Graph.launch` replays it with the arguments it had at capture, as a CUDA graph does.
  What CuPy refuses during a capture is refused here the same way: its cuBLAS wrappers raise
  ``NotImplementedError`` (``cupy_backends/cuda/libs/cublas.pyx``, ``setStream``, which
  ``sgemm``/``dgemm`` call first), a copy to the host raises, and so the capture fails.
  Stricter than CuPy, because each is a wrong result waiting on a GPU: an allocation during a
  capture raises (a pool block the graph may outlive), and so does a C-API GEMM captured
  without a workspace of the caller's (cuBLAS would allocate one per graph, pytorch#83461).
- Launches: grids and blocks must be tuples; kernel arguments convert as in CuPy's
  ``function.pyx`` (a host array is refused unless it has one element, which goes by value);
  dynamic shared memory past 48 KB needs the function's attribute set first; ``grid.sync()``
  in a launch that was not cooperative fails the launch (on a GPU it traps); a cooperative
  grid of more blocks than can be co-resident is cut down with a warning, as CuPy does.
- Occupancy from the fake GPU's budget (threads, registers, shared memory per
  multiprocessor), not a constant, so the backend's co-residency check is exercised.
- GEMMs: cuBLAS's leading-dimension rules are checked, and float32 accumulates in float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import re
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: a small fake GPU, so that blocks own several units and the last slice is partial
ATTRIBUTES = {"MultiProcessorCount": 2, "MaxSharedMemoryPerBlock": 49152,
              "MaxSharedMemoryPerBlockOptin": 65536, "CooperativeLaunch": 1,
              "MaxSharedMemoryPerMultiprocessor": 102400, "MaxThreadsPerMultiProcessor": 2048,
              "MaxRegistersPerMultiprocessor": 65536, "MaxBlocksPerMultiprocessor": 32}
#: registers per thread the occupancy assumes for every kernel: ptxas -v reports at most 95 for
#: fastlstm's kernels at sm_90 (the review), so this is their budget, not a measurement here
REGISTERS_PER_THREAD = 96
#: shared memory the driver reserves per block (sm_80 and later)
RESERVED_SHARED_PER_BLOCK = 1024


class CUDADriverError(RuntimeError):
    """What ``cupy.cuda.driver.CUDADriverError`` is to the code under test."""


class CUBLASError(RuntimeError):
    """What ``cupy_backends.cuda.libs.cublas.CUBLASError`` is to the code under test."""


# ----------------------------------------------------------------------------- streams


class _Streams(threading.local):
    """The current stream of each thread, as CuPy keeps it."""

    def __init__(self):
        self.stack = [Stream.null]


_next_stream = itertools.count(1)
_by_pointer: dict = {}


class Stream:
    """A stream: work on it runs at once, unless it is capturing (then it is recorded)."""

    null = None  # the legacy default stream, set below

    def __init__(self, null=False, non_blocking=False):
        self.ptr = 0 if null else next(_next_stream)
        self.captured = None      # the work recorded while capturing
        self.invalidated = None   # why the capture cannot end in a graph
        _by_pointer[self.ptr] = self

    def __enter__(self):
        _streams.stack.append(self)
        return self

    def __exit__(self, *exc):
        _streams.stack.pop()

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the default stream")
        if self.captured is not None:
            raise CUDADriverError("cudaErrorIllegalState: the stream is already capturing")
        self.captured, self.invalidated = [], None

    def is_capturing(self):
        return self.captured is not None

    def end_capture(self):
        if self.captured is None:
            raise CUDADriverError("cudaErrorIllegalState: the stream is not capturing")
        work, why = self.captured, self.invalidated
        self.captured = self.invalidated = None
        if why is not None:
            raise CUDADriverError(f"cudaErrorStreamCaptureInvalidated: {why}")
        return Graph(work)

    def record(self, event=None):
        return Event()

    def wait_event(self, event):
        pass

    def synchronize(self):
        _refuse_during_capture("stream synchronisation")


class Event:
    def synchronize(self):
        pass


class Graph:
    """The work a capture recorded; :meth:`launch` runs it again, as captured."""

    def __init__(self, work):
        self.work = work

    def launch(self, stream=None):
        for run in self.work:
            run()


Stream.null = Stream(null=True)
_streams = _Streams()


def get_current_stream():
    return _streams.stack[-1]


def _enqueue(run):
    """Run ``run`` now, or record it where the current stream is capturing."""
    stream = get_current_stream()
    if stream.captured is None:
        run()
    else:
        stream.captured.append(run)


def _refuse_during_capture(what):
    """Raise where the current stream is capturing, and spoil that capture."""
    stream = get_current_stream()
    if stream.captured is not None:
        stream.invalidated = f"{what} during stream capture"
        raise CUDADriverError(f"cudaErrorStreamCaptureUnsupported: {what} during capture")


# ----------------------------------------------------------------------------- arrays


class ndarray(np.ndarray):
    """A NumPy array that answers CuPy's ``.data.ptr`` and ``.get()``, and whose in-place
    operations are recorded while the current stream captures (other operations allocate,
    and raise then)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        _refuse_during_capture("a copy to the host")
        return np.array(self)

    def fill(self, value):
        _enqueue(lambda: np.ndarray.fill(self, value))

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
            _refuse_during_capture("a copy from the host")  # pageable: a synchronous copy
        _enqueue(lambda: np.ndarray.__setitem__(self, key, value))

    def copy(self, order="C"):
        _refuse_during_capture("an allocation")
        return np.ndarray.copy(self, order)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        plain = tuple(np.asarray(a) if isinstance(a, ndarray) else a for a in inputs)
        if out is not None and len(out) == 1 and isinstance(out[0], ndarray):
            target = out[0]
            _enqueue(lambda: getattr(ufunc, method)(*plain, out=(np.asarray(target),),
                                                    **kwargs))
            return target
        _refuse_during_capture("an allocation")
        result = getattr(ufunc, method)(*plain, **kwargs)
        return _wrap(result) if isinstance(result, np.ndarray) else result


def _wrap(a):
    return np.asarray(a).view(ndarray)


def asarray(a, dtype=None):
    """Like CuPy: a host array is copied to the "device", a device array is kept."""
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    _refuse_during_capture("an allocation")
    return _wrap(np.array(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or
                                                            np.dtype(dtype) == a.dtype):
        return a
    _refuse_during_capture("an allocation")
    return _wrap(np.ascontiguousarray(a, dtype=dtype))


def asnumpy(a):
    _refuse_during_capture("a copy to the host")
    return np.array(a)


def _maker(fn):
    def make(*args, **kwargs):
        _refuse_during_capture("an allocation")
        return _wrap(fn(*args, **kwargs))
    return make


empty, zeros, ones = _maker(np.empty), _maker(np.zeros), _maker(np.ones)
empty_like, zeros_like, stack = _maker(np.empty_like), _maker(np.zeros_like), _maker(np.stack)
float32, float64, int64, uint8, uint32, uint64 = (np.float32, np.float64, np.int64, np.uint8,
                                                np.uint32, np.uint64)


# ----------------------------------------------------------------------------- kernels

_C_TYPES = {np.int8: ctypes.c_int8, np.int16: ctypes.c_int16, np.int32: ctypes.c_int32,
            np.int64: ctypes.c_int64, np.uint8: ctypes.c_uint8, np.uint16: ctypes.c_uint16,
            np.uint32: ctypes.c_uint32, np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float,
            np.float64: ctypes.c_double, np.bool_: ctypes.c_bool}


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
            f'extern "C" int emu_launch_{n}(unsigned gx, unsigned gy, unsigned bx, '
            f"size_t smem, int coop, void** args) {{ return emu::launch(&{n}, "
            f"dim3{{gx, gy, 1}}, dim3{{bx, 1, 1}}, smem, coop != 0, args); }}\n" for n in names)
        source.write_text(code + "\n" + launchers)
        subprocess.run(["g++", *flags, "-O1", "-fPIC", "-shared", "-Wno-unknown-pragmas",
                        "-x", "c++", str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library)), names


def _argument(a):
    """A kernel argument as ctypes holds it, converted as CuPy's ``function.pyx`` does."""
    if a is None:
        return ctypes.c_void_p(0)
    if isinstance(a, ndarray):
        return ctypes.c_void_p(a.__array_interface__["data"][0])
    if isinstance(a, np.ndarray):  # a host array: by value if it holds one number
        if a.size != 1:
            raise TypeError(f"a host (NumPy) array of {a.size} elements is no kernel argument")
        a = a.reshape(())[()]
    if isinstance(a, (bool, np.bool_)):
        a = np.bool_(a)
    elif isinstance(a, int):
        a = np.int64(a)
    elif isinstance(a, float):
        a = np.float64(a)
    if type(a) not in _C_TYPES:
        raise TypeError(f"Unsupported type {type(a)}")
    return _C_TYPES[type(a)](a)


_function_ids = itertools.count(1)
_functions: dict = {}


class Function:
    """A kernel as ``cupy.cuda.function.Function``: ``ptr`` and a launch that may be
    cooperative."""

    def __init__(self, launcher, name):
        self.launcher, self.name = launcher, name
        self.ptr = next(_function_ids)
        self.max_dynamic_shared_size_bytes = 0
        _functions[self.ptr] = self

    def __call__(self, grid, block, args, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        if not isinstance(grid, tuple) or not isinstance(block, tuple):
            raise TypeError("grid and block must be tuples")
        grid = (grid + (1, 1))[:3]
        block = (block + (1, 1))[:3]
        if grid[2] != 1 or block[1:] != (1, 1):
            raise NotImplementedError("the emulator launches grids of (x, y) blocks of (x,)")
        limit = max(ATTRIBUTES["MaxSharedMemoryPerBlock"], self.max_dynamic_shared_size_bytes)
        if shared_mem > min(limit, ATTRIBUTES["MaxSharedMemoryPerBlockOptin"]):
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {shared_mem} bytes of dynamic "
                                  f"shared memory, the function allows {limit}")
        if enable_cooperative_groups:
            resident = ATTRIBUTES["MultiProcessorCount"] * _occupancy(self.ptr, block[0],
                                                                      shared_mem)
            if grid[0] * grid[1] > resident:
                if grid[1] != 1:
                    raise CUDADriverError("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE")
                warnings.warn(f"The grid size will be reduced from {grid[0]} to {resident}, "
                              "the most a cooperative launch can have here", UserWarning)
                grid = (resident, 1, 1)
        keep = [_argument(a) for a in args]
        pointers = (ctypes.c_void_p * max(1, len(keep)))(*[ctypes.addressof(k) for k in keep])

        def run(keep=keep):  # holds the arguments as long as the launch (or its graph) lives
            failed = self.launcher(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]),
                                   ctypes.c_uint(block[0]), ctypes.c_size_t(shared_mem),
                                   ctypes.c_int(int(enable_cooperative_groups)), pointers)
            if failed:
                raise CUDADriverError(f"CUDA_ERROR_LAUNCH_FAILED in {self.name}: grid.sync() "
                                      "in a launch that was not cooperative")

        _enqueue(run)


class RawKernel:
    """``cupy.RawKernel`` of a module: launches cooperatively where its module was built so."""

    def __init__(self, function, cooperative):
        self.kernel, self.cooperative = function, cooperative

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.kernel.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.kernel.max_dynamic_shared_size_bytes = int(value)

    def __call__(self, grid, block, args, *, shared_mem=0):
        self.kernel(grid, block, args, shared_mem=shared_mem,
                    enable_cooperative_groups=self.cooperative)


class RawModule:
    build_dir = Path("/tmp/fastlstm-emulated")

    def __init__(self, code, options=(), enable_cooperative_groups=False):
        self.code, self.cooperative = code, enable_cooperative_groups
        self.library = None
        self.functions: dict = {}

    def get_function(self, name):
        if self.library is None:
            self.library, self.names = _build(self.code, self.build_dir)
        if name not in self.names:
            raise KeyError(f"no kernel {name} (have {self.names})")
        if name not in self.functions:
            launcher = getattr(self.library, f"emu_launch_{name}")
            launcher.restype = ctypes.c_int
            self.functions[name] = Function(launcher, name)
        return RawKernel(self.functions[name], self.cooperative)


def _occupancy(function_ptr, threads, shared_mem):
    """Blocks of ``threads`` threads and ``shared_mem`` bytes of dynamic shared memory that fit
    on one multiprocessor of the fake GPU (``cudaOccupancyMaxActiveBlocksPerMultiprocessor``)."""
    by_threads = ATTRIBUTES["MaxThreadsPerMultiProcessor"] // threads
    by_registers = ATTRIBUTES["MaxRegistersPerMultiprocessor"] // (REGISTERS_PER_THREAD * threads)
    by_shared = ATTRIBUTES["MaxSharedMemoryPerMultiprocessor"] // (shared_mem
                                                                   + RESERVED_SHARED_PER_BLOCK)
    return max(0, min(ATTRIBUTES["MaxBlocksPerMultiprocessor"], by_threads, by_registers,
                      by_shared))


# ----------------------------------------------------------------------------- cuBLAS


def _column_major(ptr, rows, cols, ld, dtype):
    itemsize = np.dtype(dtype).itemsize
    count = (cols - 1) * ld + rows
    buffer = (ctypes.c_char * (count * itemsize)).from_address(ptr)
    flat = np.frombuffer(buffer, dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (itemsize, ld * itemsize))


def _leading_dimensions_ok(transa, transb, m, n, k, lda, ldb, ldc):
    """cuBLAS's rules for ``gemm``'s leading dimensions (column-major)."""
    return (lda >= max(1, k if transa else m) and ldb >= max(1, n if transb else k)
            and ldc >= max(1, m))


def _gemm_now(dtype, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """``C = alpha op(A) op(B) + beta C`` on device pointers, column-major, in ``dtype``."""
    op_a = _column_major(a, k, m, lda, dtype).T if transa else _column_major(a, m, k, lda, dtype)
    op_b = _column_major(b, n, k, ldb, dtype).T if transb else _column_major(b, k, n, ldb, dtype)
    out = _column_major(c, m, n, ldc, dtype)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs are tested
        product = dtype(alpha) * (op_a @ op_b)  # NumPy's float32 product accumulates in float32
        out[...] = product if beta == 0 else product + dtype(beta) * out


def _cupy_gemm(dtype):
    """CuPy's ``cublas.sgemm`` / ``dgemm``: they set the handle's stream first, which raises
    while that stream is capturing."""
    def gemm(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        _cupy_set_stream(handle, get_current_stream().ptr)
        if not _leading_dimensions_ok(transa, transb, m, n, k, lda, ldb, ldc):
            raise CUBLASError("CUBLAS_STATUS_INVALID_VALUE")
        alpha = np.frombuffer((ctypes.c_char * 8).from_address(alpha), dtype=dtype, count=1)[0]
        beta = np.frombuffer((ctypes.c_char * 8).from_address(beta), dtype=dtype, count=1)[0]
        _gemm_now(dtype, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    return gemm


def _cupy_set_stream(handle, stream):
    if _by_pointer[stream].is_capturing():
        raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                  "unsupported")


class _CublasHandle:
    def __init__(self):
        self.stream, self.workspace = 0, None


def cublas_library():
    """A stand-in for ``libcublas`` loaded with ctypes: the functions of cuBLAS's C API that
    fastlstm calls, with their C signatures (so the caller's arguments convert as they would),
    returning cuBLAS status codes.  GEMMs run on the handle's stream: recorded where it
    captures, and refused there unless a workspace of the caller's was set after the stream
    (``cublasSetStream`` resets the workspace to cuBLAS's own pool)."""
    handles: dict = {}
    refusals: list = []
    status = ctypes.c_int
    handle_t, ptr, i32 = ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int

    def create(out):
        key = len(handles) + 1
        handles[key] = _CublasHandle()
        ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))[0] = key
        return 0

    def destroy(handle):
        return 0 if handles.pop(handle, None) is not None else 1  # NOT_INITIALIZED

    def set_stream(handle, stream):
        h = handles[handle]
        h.stream, h.workspace = stream or 0, None
        return 0

    def set_workspace(handle, workspace, size):
        handles[handle].workspace = (workspace, size)
        return 0

    def gemm(dtype):
        def call(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            h = handles.get(handle)
            if h is None:
                return 1  # CUBLAS_STATUS_NOT_INITIALIZED
            if min(m, n, k) < 0 or not _leading_dimensions_ok(transa, transb, m, n, k, lda, ldb,
                                                              ldc):
                return 7  # CUBLAS_STATUS_INVALID_VALUE
            stream = _by_pointer[h.stream]
            if stream.is_capturing() and h.workspace is None:
                # (a ctypes callback cannot raise: the refusal is a status and a record)
                refusals.append("a cuBLAS GEMM captured without the caller's workspace: "
                                "cuBLAS would allocate one for every graph")
                return 15  # CUBLAS_STATUS_NOT_SUPPORTED
            ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
            alpha_v, beta_v = ctype.from_address(alpha).value, ctype.from_address(beta).value

            def run():
                _gemm_now(dtype, transa, transb, m, n, k, alpha_v, a, lda, b, ldb, beta_v, c,
                          ldc)

            with stream:
                _enqueue(run)
            return 0
        prototype = ctypes.CFUNCTYPE(status, handle_t, i32, i32, i32, i32, i32, ptr, ptr, i32,
                                     ptr, i32, ptr, ptr, i32)
        return prototype(call)

    functions = dict(
        cublasCreate_v2=ctypes.CFUNCTYPE(status, ptr)(create),
        cublasDestroy_v2=ctypes.CFUNCTYPE(status, handle_t)(destroy),
        cublasSetStream_v2=ctypes.CFUNCTYPE(status, handle_t, ptr)(set_stream),
        cublasSetWorkspace_v2=ctypes.CFUNCTYPE(status, handle_t, ptr, ctypes.c_size_t)(
            set_workspace),
        cublasSgemm_v2=gemm(np.float32), cublasDgemm_v2=gemm(np.float64))
    return types.SimpleNamespace(**functions, handles=handles, refusals=refusals)


def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def modules():
    """The fake ``cupy`` and ``cupy_backends`` modules, by their import names."""
    cublas = _module("cupy_backends.cuda.libs.cublas", sgemm=_cupy_gemm(np.float32),
                     dgemm=_cupy_gemm(np.float64), setStream=_cupy_set_stream,
                     setPointerMode=lambda handle, mode: None, CUBLAS_POINTER_MODE_HOST=0,
                     CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLASError=CUBLASError)
    device = types.SimpleNamespace(id=0, attributes=ATTRIBUTES)
    cuda = _module(
        "cupy.cuda",
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                      runtimeGetVersion=lambda: 13000),
        Device=lambda device_id=0: device,
        driver=types.SimpleNamespace(
            occupancyMaxActiveBlocksPerMultiprocessor=lambda fn, threads, smem: _occupancy(
                fn, threads, smem), CUDADriverError=CUDADriverError),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        get_current_stream=get_current_stream, Stream=Stream, Event=Event, Graph=Graph)
    this = sys.modules[__name__]
    cupy = _module("cupy", cuda=cuda, RawModule=RawModule, RawKernel=RawKernel, **{
        name: getattr(this, name) for name in (
            "ndarray", "asarray", "ascontiguousarray", "asnumpy", "empty", "zeros", "ones",
            "empty_like", "zeros_like", "stack", "float32", "float64", "int64", "uint8", "uint32",
            "uint64")})
    libs = _module("cupy_backends.cuda.libs", cublas=cublas)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy_backends": _module("cupy_backends"),
            "cupy_backends.cuda": _module("cupy_backends.cuda", libs=libs),
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas}
