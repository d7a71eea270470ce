"""The CUDA backend's own code and kernels, run on the CPU, against the NumPy reference.

``cuda_emulator/`` compiles the real ``fastlstm/kernels/*.cu`` with g++ (each CUDA thread an OS
thread) and stands in for CuPy with NumPy, so the real ``fastlstm.backends.cuda`` runs here:
its layouts, GEMM leading dimensions and offsets, launch plans (on a fake 2-SM GPU, so blocks
own several hidden units and slices are partial), both recurrence kernels, the losses and
Adam.  The generic parity tests are reused as they are.  Not covered here: CUDA graphs,
streams, real shared-memory limits, CuPy's own API (tests/test_cuda_backend.py, on a GPU).
"""

import importlib
import shutil
import sys

import numpy as np
import pytest

import test_backend_parity as parity
from conftest import SMALL_SHAPES, make_problem, rel_err, shape_id
from cuda_emulator import fake_cupy
from fastlstm.backends import cuda_support

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

MODULE = "fastlstm.backends.cuda"


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory):
    """``fastlstm.backends.cuda`` imported against the fake CuPy, then forgotten again."""
    fake_cupy.RawModule.build_dir = tmp_path_factory.mktemp("emulated-kernels")
    package = sys.modules["fastlstm.backends"]
    saved = sys.modules.pop(MODULE, None), package.__dict__.pop("cuda", None)
    with pytest.MonkeyPatch.context() as patch:
        # 4 warps a block (fewer OS threads); with the fake 2-SM GPU, persistent blocks own up
        # to 4 units (the backward then takes its 4-column path) and per-step blocks 2.
        patch.setattr(cuda_support, "THREADS", 128)
        for name, module in fake_cupy.modules().items():
            patch.setitem(sys.modules, name, module)
        try:
            yield importlib.import_module(MODULE)
        finally:
            sys.modules.pop(MODULE, None)
            package.__dict__.pop("cuda", None)
            if saved[0] is not None:
                sys.modules[MODULE] = saved[0]
            if saved[1] is not None:
                package.cuda = saved[1]


@pytest.fixture(params=["persistent", "step"])
def backend(request, cuda_module):
    emulated = cuda_module.CUDABackend(recurrence=request.param, graphs=False)
    for direction in ("forward", "backward"):
        assert emulated.recurrence_kind(direction, 7, 3, np.float64) == request.param
    return emulated


#: off-warp batch, 7 units = a full slice of 4 + a partial one (persistent), 2 layers
ODD_SHAPE = (33, 3, 2, 7, 2, 3)
CASES = ([(shape, "cross_entropy", np.float64) for shape in SMALL_SHAPES + [ODD_SHAPE]]
         + [(SMALL_SHAPES[1], "squared_error", np.float64),
            (ODD_SHAPE, "squared_error", np.float32), (ODD_SHAPE, "cross_entropy", np.float32)])


@pytest.mark.parametrize("shape, loss, dtype", CASES,
                         ids=[f"{shape_id(s)}-{kind}-{np.dtype(d).name}" for s, kind, d in CASES])
def test_backend_matches_reference(backend, shape, loss, dtype):
    parity.test_backend_matches_reference(backend, shape, loss, dtype)


def test_big_batch_chunks_agree_with_reference(cuda_module):
    # B=300: many batch chunks per block (persistent) and per grid (per-step).
    problem = make_problem((300, 2, 3, 8, 1, 3), "squared_error", np.float64)
    want = parity.run(parity.get_backend("reference"), *problem, "squared_error")
    for recurrence in ("persistent", "step"):
        backend = cuda_module.CUDABackend(recurrence, graphs=False)
        assert backend.recurrence_kind("backward", 8, 300, np.float64) == recurrence
        got = parity.run(backend, *problem, "squared_error")
        for name in ("outputs", "x", "h0", "c0"):
            assert rel_err(got[name], want[name]) < 1e-10, (recurrence, name)
        for name in want["grads"]:
            assert rel_err(got["grads"][name], want["grads"][name]) < 1e-10, (recurrence, name)


@pytest.mark.parametrize("generic", [
    parity.test_omitted_initial_states_mean_zeros,
    parity.test_gradients_without_input_grads,
    parity.test_train_step_skips_update_on_non_finite_loss,
], ids=lambda f: f.__name__)
def test_generic_behaviour(backend, generic):
    generic(backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_softmax_and_adam(backend, dtype):
    parity.test_softmax_matches_reference(backend, dtype)
    parity.test_adam_matches_reference(backend, dtype)


@pytest.mark.parametrize("clip", [None, 0.01])
def test_train_step_matches_reference(backend, clip):
    parity.test_train_step_matches_reference(backend, clip)


def test_huge_inputs_give_finite_results(backend):
    parity.test_huge_inputs_give_finite_results(backend, np.float32)
