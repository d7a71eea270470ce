"""The emulator refuses what CuPy and CUDA refuse, so the emulated tests mean what they say.

Each test is one behaviour of CuPy (14.2, the GPU machine's) or of the CUDA driver that the
review of the CUDA backend (``shared/reviews/cuda-backend.md``, finding 8) found the emulator
papering over, and the backend's code that depends on it.
"""

import ctypes
import shutil
import warnings

import numpy as np
import pytest

from conftest import make_problem
from cuda_emulator import fake_cupy
from fastlstm.backends import AdamConfig
from test_cuda_emulated import cuda_module, make_backend  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

SOURCE = r"""
#include <cooperative_groups.h>
extern "C" __global__ void fastlstm_grid_sync(int* out) {
    cooperative_groups::this_grid().sync();
    if (threadIdx.x == 0) out[blockIdx.x] = 1;
}
extern "C" __global__ void fastlstm_fill(int* out, int value) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}
"""


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    fake_cupy.RawModule.build_dir = tmp_path_factory.mktemp("emulated-probe")
    return fake_cupy.RawModule(code=SOURCE)


def test_grids_and_blocks_are_tuples_and_host_arrays_are_no_arguments(module):
    fill, out = module.get_function("fastlstm_fill"), fake_cupy.zeros((4,), np.int32)
    with pytest.raises(TypeError, match="tuples"):
        fill([1], (4,), (out, np.int32(3)))
    with pytest.raises(TypeError, match="host"):
        fill((1,), (4,), (np.zeros(4, np.int32), np.int32(3)))
    fill((1,), (4,), (out, np.array([5], np.int32)))  # one element: by value, as in CuPy
    assert out.tolist() == [5] * 4


def test_grid_sync_outside_a_cooperative_launch_fails_the_launch(module):
    sync, out = module.get_function("fastlstm_grid_sync"), fake_cupy.zeros((2,), np.int32)
    with pytest.raises(fake_cupy.CUDADriverError, match="not cooperative"):
        sync((2,), (32,), (out,))
    sync.kernel((2,), (32,), (out,), enable_cooperative_groups=True)
    assert out.tolist() == [1, 1]


def test_a_cooperative_grid_too_large_to_be_resident_is_cut_down_as_cupy_does(module):
    sync = module.get_function("fastlstm_grid_sync")
    per_sm = fake_cupy._occupancy(sync.kernel.ptr, 1024, 0)
    resident = per_sm * fake_cupy.ATTRIBUTES["MultiProcessorCount"]
    out = fake_cupy.zeros((resident + 1,), np.int32)
    with pytest.warns(UserWarning, match="grid size will be reduced"):
        sync.kernel((resident + 1,), (1024,), (out,), enable_cooperative_groups=True)
    assert out.tolist() == [1] * resident + [0]  # the last block never ran


def test_occupancy_follows_the_budget_of_a_multiprocessor():
    a = fake_cupy.ATTRIBUTES
    assert fake_cupy._occupancy(0, 256, 0) == a["MaxRegistersPerMultiprocessor"] // (
        fake_cupy.REGISTERS_PER_THREAD * 256)
    assert fake_cupy._occupancy(0, 32, 60_000) == a["MaxSharedMemoryPerMultiprocessor"] // (
        60_000 + fake_cupy.RESERVED_SHARED_PER_BLOCK)
    assert fake_cupy._occupancy(0, 32, a["MaxSharedMemoryPerMultiprocessor"]) == 0


def test_dynamic_shared_memory_past_48_kb_needs_the_attribute(module):
    fill, out = module.get_function("fastlstm_fill"), fake_cupy.zeros((1,), np.int32)
    with pytest.raises(fake_cupy.CUDADriverError, match="shared memory"):
        fill((1,), (1,), (out, np.int32(1)), shared_mem=50_000)
    fill.max_dynamic_shared_size_bytes = 50_000
    fill((1,), (1,), (out, np.int32(1)), shared_mem=50_000)
    assert out.tolist() == [1]


def test_a_capture_records_work_and_its_graph_replays_it(module):
    fill, out = module.get_function("fastlstm_fill"), fake_cupy.zeros((4,), np.int32)
    total = fake_cupy.zeros((4,), np.int32)
    stream = fake_cupy.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        fill((1,), (4,), (out, np.int32(2)))
        total += out  # an in-place operation is captured too
        graph = stream.end_capture()
    assert out.tolist() == total.tolist() == [0] * 4  # recorded, not run
    graph.launch()
    graph.launch()
    assert out.tolist() == [2] * 4 and total.tolist() == [4] * 4


@pytest.mark.parametrize("refused", [lambda a: a.get(), lambda a: fake_cupy.empty((2,)),
                                     lambda a: a + 1, lambda a: a.copy()],
                         ids=["copy to host", "allocation", "new array", "copy"])
def test_a_capture_refuses_host_copies_and_allocations(refused):
    a = fake_cupy.zeros((2,))
    stream = fake_cupy.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(fake_cupy.CUDADriverError, match="during capture"):
            refused(a)
        with pytest.raises(fake_cupy.CUDADriverError, match="Invalidated"):
            stream.end_capture()


def test_the_legacy_stream_cannot_capture():
    with pytest.raises(RuntimeError):
        fake_cupy.Stream.null.begin_capture()


def test_cupys_cublas_wrappers_refuse_a_capturing_stream():
    cublas = fake_cupy.modules()["cupy_backends.cuda.libs.cublas"]
    a = fake_cupy.ones((2, 2))
    one = np.ones((), np.float64)
    stream = fake_cupy.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(NotImplementedError, match="during stream capture"):
            cublas.dgemm(0, 0, 0, 2, 2, 2, one.ctypes.data, a.data.ptr, 2, a.data.ptr, 2,
                         one.ctypes.data, a.data.ptr, 2)
        stream.end_capture()


def test_the_c_api_checks_leading_dimensions_and_a_captured_gemm_needs_a_workspace(
        cuda_module):  # noqa: F811
    gemm = cuda_module.cuda_gemm
    library = fake_cupy.cublas_library()
    blas = gemm.CublasGemm(np.float32, library)
    a = fake_cupy.ones((3, 4), np.float32)
    c = fake_cupy.zeros((3, 3), np.float32)
    with pytest.raises(RuntimeError, match="INVALID_VALUE"):  # ld below the row length
        blas.gemm(gemm.Mat.of(c), gemm.Mat(a.data.ptr, 3, 4, 2), gemm.Mat.of(a), tb=True)
    blas.gemm(gemm.Mat.of(c), gemm.Mat.of(a), gemm.Mat.of(a), tb=True)
    assert c.tolist() == [[4.0] * 3] * 3
    handle = ctypes.c_void_p()
    library.cublasCreate_v2(ctypes.byref(handle))
    stream = fake_cupy.Stream(non_blocking=True)
    library.cublasSetStream_v2(handle, stream.ptr)  # and no workspace after it
    alpha = ctypes.c_float(1)
    with stream:
        stream.begin_capture()
        status = library.cublasSgemm_v2(handle, 0, 0, 1, 1, 1, ctypes.byref(alpha), c.data.ptr,
                                        1, c.data.ptr, 1, ctypes.byref(alpha), c.data.ptr, 1)
        stream.end_capture()
    assert status == 15 and "workspace" in library.refusals[0]


def test_the_backend_runs_per_step_kernels_where_persistent_blocks_cannot_be_resident(
        cuda_module, monkeypatch):  # noqa: F811
    # With less shared memory per multiprocessor than a persistent block needs, the occupancy
    # is 0, and the backend must not make a cooperative launch that CuPy would cut down.
    monkeypatch.setitem(fake_cupy.ATTRIBUTES, "MaxSharedMemoryPerMultiprocessor", 2048)
    backend = cuda_module.CUDABackend(recurrence="persistent", graphs=False)
    assert backend.recurrence_kind("forward", 7, 3, np.float64) == "step"
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 7, 1, 3), "cross_entropy")
    p = backend.asarray(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.train_step(spec, p, backend.adam_state(p), backend.asarray(x),
                           backend.asarray(y), "cross_entropy", AdamConfig(1e-2))


@pytest.fixture
def fresh_backends(monkeypatch):
    """``get_backend`` with no shared instance, self-check or warning of this process yet."""
    import fastlstm.backends as backends
    for name in ("_instances", "_failed_checks"):
        monkeypatch.setattr(backends, name, {})
    monkeypatch.setattr(backends, "_warned_auto", [])
    return backends


def test_the_cuda_backend_is_handed_out_once_it_passes_its_self_check(
        cuda_module, fresh_backends):  # noqa: F811
    from fastlstm.backends.self_check import self_check
    assert self_check(cuda_module.CUDABackend()) is None
    cuda = fresh_backends.get_backend("cuda")
    assert isinstance(cuda, cuda_module.CUDABackend)
    assert fresh_backends.get_backend("auto") is cuda is fresh_backends.get_backend("cuda")


@pytest.mark.parametrize("fault", ["wrong gradients", "a failing kernel"])
def test_a_cuda_backend_that_fails_its_self_check_is_refused_and_auto_runs_on_the_cpu(
        cuda_module, fresh_backends, monkeypatch, fault):  # noqa: F811
    backward = cuda_module.CUDABackend.backward

    def wrong(self, *args, **kwargs):
        grads = backward(self, *args, **kwargs)
        grads.params[-1] += 1.0  # the head's last bias
        return grads

    def failing(self, *args, **kwargs):
        raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED\nsecond line")

    monkeypatch.setattr(cuda_module.CUDABackend, "backward",
                        wrong if fault == "wrong gradients" else failing)
    why = "gradients off by" if fault == "wrong gradients" else "LAUNCH_FAILED"
    with pytest.raises(fresh_backends.BackendUnavailable, match=why) as refused:
        fresh_backends.get_backend("cuda")
    assert "device='cpu'" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.warns(RuntimeWarning, match=f"device='auto' runs on the CPU.*{why}"):
        assert fresh_backends.get_backend("auto").name == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert fresh_backends.get_backend("auto").name == "cpu"
    with pytest.raises(fresh_backends.BackendUnavailable, match=why):  # and not run again
        fresh_backends.get_backend("cuda")


def test_each_thread_and_each_training_slot_has_gemms_of_its_own(cuda_module):  # noqa: F811
    # A GEMM object's handle and workspace serve one stream at a time: a thread's current
    # stream is its own, and a captured step bakes in its slot's.
    import threading
    backend = cuda_module.CUDABackend(recurrence="step", graphs=False)
    mine, theirs = backend.blas(np.float64), []
    thread = threading.Thread(target=lambda: theirs.append(backend.blas(np.float64)))
    thread.start()
    thread.join()
    assert backend.blas(np.float64) is mine
    assert theirs[0] is not mine and theirs[0].handle != mine.handle
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 1, 3), "cross_entropy")
    p = backend.asarray(params)
    backend.train_step(spec, p, backend.adam_state(p), backend.asarray(x), backend.asarray(y),
                       "cross_entropy", AdamConfig(1e-2))
    (slot,) = backend._slots.values()
    assert slot.blas is not mine and slot.blas.handle not in (mine.handle, theirs[0].handle)
