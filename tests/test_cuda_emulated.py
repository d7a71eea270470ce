"""The CUDA backend's own code and kernels, run on the CPU, against the oracle.

``cuda_emulator/`` compiles the real ``fastlstm/kernels/*.cu`` with g++ (each CUDA thread an OS
thread) and stands in for CuPy with NumPy, so the real ``fastlstm.backends.cuda`` runs here:
its layouts, GEMM leading dimensions and offsets, launch plans (on a fake 2-SM GPU, so blocks
own several hidden units and slices are partial), both recurrence kernels, the losses and
Adam, both GEMM implementations (cuBLAS's C API by default; our own kernels in the tests
that say so), and the capture of a training step as a
CUDA graph and its replays (the emulator records a capturing stream's work and refuses what
CuPy refuses: tests/test_cuda_emulator.py).  The generic parity tests are reused as they are
(variable lengths and bidirectional layers: tests/test_cuda_ragged_emulated.py; dropout:
tests/test_cuda_dropout_emulated.py).  Not covered here: the GPU's memory model and timing,
the real shared-memory and register counts of the kernels, CuPy itself
(tests/test_cuda_backend.py, on a GPU).
"""

import copy
import importlib
import shutil
import sys
import warnings

import numpy as np
import pytest

import test_backend_parity as parity
from conftest import SMALL_SHAPES, make_problem, rel_err, shape_id
from cuda_emulator import fake_cupy
from fastlstm.backends import AdamConfig, cuda_support
from oracle import ORACLE

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

MODULE = "fastlstm.backends.cuda"
#: the launch plans' settings on a GPU: 8 warps a block, and per-step grids cut for 4 blocks a
#: multiprocessor; the emulated tests run 4 warps a block and 1 block a multiprocessor (fewer OS
#: threads), test_the_real_launch_plans_match_reference these
REAL_THREADS, REAL_STEP_BLOCKS = cuda_support.THREADS, cuda_support.STEP_BLOCKS_PER_SM


@pytest.fixture(scope="module")
def cuda_module(tmp_path_factory):
    """``fastlstm.backends.cuda`` imported against the fake CuPy (and the fake cuBLAS library
    its GEMMs call), then forgotten again."""
    # one build folder for the session: each test module imports the backend anew, the
    # kernels it compiles are the same
    fake_cupy.RawModule.build_dir = tmp_path_factory.getbasetemp() / "emulated-kernels"
    package = sys.modules["fastlstm.backends"]
    saved = sys.modules.pop(MODULE, None), package.__dict__.pop("cuda", None)
    with pytest.MonkeyPatch.context() as patch:
        # 4 warps a block (fewer OS threads); with the fake 2-SM GPU, persistent blocks own up
        # to 4 units (the backward then takes its 4-column path) and per-step blocks 2.
        patch.setattr(cuda_support, "THREADS", 128)
        patch.setattr(cuda_support, "STEP_BLOCKS_PER_SM", 1)
        for name, module in fake_cupy.modules().items():
            patch.setitem(sys.modules, name, module)
        try:
            module = importlib.import_module(MODULE)
            patch.setattr(module.cuda_gemm, "load_cublas", fake_cupy.cublas_library)
            yield module
        finally:
            sys.modules.pop(MODULE, None)
            package.__dict__.pop("cuda", None)
            if saved[0] is not None:
                sys.modules[MODULE] = saved[0]
            if saved[1] is not None:
                package.cuda = saved[1]


def make_backend(cuda_module, recurrence, graphs=False, gemm="cublas"):
    """The emulated backend of ``recurrence`` kernels."""
    backend = cuda_module.CUDABackend(recurrence=recurrence, graphs=graphs, gemm=gemm)
    for direction in ("forward", "backward"):
        assert backend.recurrence_kind(direction, 7, 3, np.float64) == recurrence
    return backend


@pytest.fixture(params=["persistent", "step"])
def backend(request, cuda_module):
    return make_backend(cuda_module, request.param)


#: off-warp batch, 7 units = a full slice of 4 + a partial one (persistent), 2 layers
ODD_SHAPE = (33, 3, 2, 7, 2, 3)
CASES = ([(shape, "cross_entropy", np.float64) for shape in SMALL_SHAPES + [ODD_SHAPE]]
         + [(SMALL_SHAPES[1], "squared_error", np.float64),
            (ODD_SHAPE, "squared_error", np.float32), (ODD_SHAPE, "cross_entropy", np.float32)])


@pytest.mark.parametrize("shape, loss, dtype", CASES,
                         ids=[f"{shape_id(s)}-{kind}-{np.dtype(d).name}" for s, kind, d in CASES])
def test_backend_matches_reference(backend, shape, loss, dtype):
    parity.test_backend_matches_reference(backend, shape, loss, dtype)


# The GEMM kernels on their own: tests/test_cuda_gemm_emulated.py; here, as the backend calls
# them (with the persistent recurrence, the cheaper one to emulate: a GEMM does not depend on
# the recurrence kernels).
@pytest.mark.parametrize("shape, loss, dtype", CASES,
                         ids=[f"{shape_id(s)}-{kind}-{np.dtype(d).name}" for s, kind, d in CASES])
def test_backend_on_our_gemm_kernels_matches_reference(cuda_module, shape, loss, dtype):
    backend = make_backend(cuda_module, "persistent", gemm="kernels")
    parity.test_backend_matches_reference(backend, shape, loss, dtype)


@pytest.mark.parametrize("recurrence", ["persistent", "step"])
def test_the_real_launch_plans_match_reference(cuda_module, monkeypatch, recurrence):
    # The GPU's 8 warps a block: at this shape the backward splits its dot products 4 ways
    # across warps (with 4 warps, 2 ways); per-step grids of at least 4 blocks a multiprocessor:
    # chunks of 32 rows.
    monkeypatch.setattr(cuda_support, "THREADS", REAL_THREADS)
    monkeypatch.setattr(cuda_support, "STEP_BLOCKS_PER_SM", REAL_STEP_BLOCKS)
    backend = make_backend(cuda_module, recurrence)
    plan = cuda_support.plan_recurrence("forward", ODD_SHAPE[3], ODD_SHAPE[0], 8,
                                        cuda_module._limits(), recurrence == "persistent")
    assert plan.threads == REAL_THREADS
    assert recurrence == "persistent" or plan.chunk_rows == 32
    parity.test_backend_matches_reference(backend, ODD_SHAPE, "cross_entropy", np.float64)


def test_big_batch_chunks_agree_with_reference(cuda_module):
    # B=300: many batch chunks per block (persistent) and per grid (per-step).
    problem = make_problem((300, 2, 3, 8, 1, 3), "squared_error", np.float64)
    want = parity.run(ORACLE, *problem, "squared_error")
    for recurrence in ("persistent", "step"):
        backend = make_backend(cuda_module, recurrence)
        assert backend.recurrence_kind("backward", 8, 300, np.float64) == recurrence
        got = parity.run(backend, *problem, "squared_error")
        for name in ("outputs", "x", "h0", "c0"):
            assert rel_err(got[name], want[name]) < 1e-10, (recurrence, name)
        for name in want["grads"]:
            assert rel_err(got["grads"][name], want["grads"][name]) < 1e-10, (recurrence, name)


@pytest.mark.parametrize("loss, dtype", [("cross_entropy", np.float64),
                                         ("squared_error", np.float64),
                                         ("cross_entropy", np.float32),
                                         ("squared_error", np.float32)],
                         ids=["cross_entropy-float64", "squared_error-float64",
                              "cross_entropy-float32", "squared_error-float32"])
def test_weighted_loss_and_gradients_match_reference(backend, loss, dtype):
    parity.test_weighted_loss_and_gradients_match_reference(backend, ODD_SHAPE, loss, dtype)


@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
def test_weighted_train_step_matches_reference(backend, ragged):
    parity.test_weighted_train_step_matches_reference(backend, ragged)


@pytest.mark.parametrize("generic", [
    parity.test_omitted_initial_states_mean_zeros,
    parity.test_gradients_without_input_grads,
    parity.test_train_step_skips_update_on_non_finite_loss,
    parity.test_train_step_of_a_batch_of_no_weight_moves_nothing,
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


#: settings that change, every one of them, from one training step to the next
SCHEDULE = [AdamConfig(1e-2),
            AdamConfig(3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1,
                       clip_grad_norm=0.01),
            AdamConfig(5e-3, weight_decay=0.05)]


def train_on_schedule(backend):
    """The steps of :data:`SCHEDULE` on ``backend`` and on the oracle: both runs' parameters."""
    spec, params, x, y, _, _ = make_problem((6, 5, 3, 4, 2, 3), "cross_entropy")
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    for config in SCHEDULE:
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config)
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert s_dev.step == s_ref.step == len(SCHEDULE)
    return backend.to_host(p_dev), p_ref


def test_train_steps_follow_a_changing_config(backend):
    got, want = train_on_schedule(backend)
    assert rel_err(got, want) < 1e-10


def captures(backend, monkeypatch):
    """The slots ``backend`` captures a CUDA graph of from now on; each capture must succeed
    (the emulator records the work of a capturing stream and replays it, and refuses what
    CuPy refuses during a capture)."""
    captured = []
    capture = backend._capture

    def checked(slot, params, state):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # _capture warns where it falls back to no graph
            graph = capture(slot, params, state)
        assert graph is not None
        captured.append(slot)
        return graph

    monkeypatch.setattr(backend, "_capture", checked)
    return captured


@pytest.mark.parametrize("recurrence, gemm", [("persistent", "cublas"), ("step", "kernels")])
def test_a_training_step_is_captured_and_its_graph_replays_the_same_steps(cuda_module,
                                                                          monkeypatch,
                                                                          recurrence, gemm):
    # The first step of a shape runs and is captured; the next ones replay its graph, on its
    # buffers, with their own settings: the same bits as the same steps run without a graph.
    runs = {}
    for graphs in (True, False):
        backend = make_backend(cuda_module, recurrence, graphs, gemm)
        captured = captures(backend, monkeypatch)
        spec, params, x, y, _, _ = make_problem((6, 5, 3, 4, 2, 3), "cross_entropy")
        p = backend.asarray(params.copy())
        state = backend.adam_state(p)
        losses = [float(backend.train_step(spec, p, state, backend.asarray(x),
                                           backend.asarray(y), "cross_entropy", config))
                  for config in SCHEDULE]
        runs[graphs] = losses, backend.to_host(p), backend.to_host(state.m), state.step
        assert (len(captured), backend.graph_replays) == ((1, 2) if graphs else (0, 0))
    assert runs[True][0] == runs[False][0] and runs[True][3] == runs[False][3] == 3
    for got, want in zip(runs[True][1:3], runs[False][1:3]):
        assert np.array_equal(got, want)


class CupyBlas:
    """GEMMs through CuPy's own cuBLAS wrappers, as the backend called them before: what no
    CUDA graph can capture (the review's finding 1)."""

    def __init__(self, cuda_module, dtype):
        self.cublas = sys.modules["cupy_backends.cuda.libs.cublas"]
        self.fn = self.cublas.sgemm if np.dtype(dtype) == np.float32 else self.cublas.dgemm
        self.one, self.zero = np.ones((), dtype), np.zeros((), dtype)
        self.stream = cuda_module.cupy.cuda.get_current_stream

    def gemm(self, c, a, b, ta=False, tb=False, accumulate=False):
        m, k = a.shape(ta)
        n = b.shape(tb)[1]
        self.cublas.setStream(0, self.stream().ptr)
        op = (self.cublas.CUBLAS_OP_N, self.cublas.CUBLAS_OP_T)
        self.fn(0, op[tb], op[ta], n, m, k, self.one.ctypes.data, b.ptr, b.ld, a.ptr, a.ld,
                (self.one if accumulate else self.zero).ctypes.data, c.ptr, c.ld)


def test_gemms_through_cupys_cublas_wrappers_get_no_graph(cuda_module, monkeypatch):
    # The emulator refuses what CuPy refuses: with the GEMMs of before, the capture fails, and
    # the backend says so and runs the steps without a graph (still right, but slow).
    backend = make_backend(cuda_module, "step", graphs=True)
    blas = CupyBlas(cuda_module, np.float64)
    monkeypatch.setattr(backend, "_new_gemm", lambda dtype: blas)
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 1, 3), "cross_entropy")
    p = backend.asarray(params.copy())
    state = backend.adam_state(p)
    with pytest.warns(RuntimeWarning, match="calling cuBLAS API during stream capture"):
        for _ in range(2):
            backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y),
                               "cross_entropy", AdamConfig(1e-2))
    (slot,) = backend._slots.values()
    assert list(slot.graphs.values()) == [None] and backend.graph_replays == 0
    assert state.step == 2


def test_a_changing_config_replays_the_first_capture(cuda_module, monkeypatch):
    backend = cuda_module.CUDABackend(recurrence="step", graphs=True)
    captured = captures(backend, monkeypatch)
    got, want = train_on_schedule(backend)
    assert len(captured) == 1, "a new config must not need a new capture"
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
def test_weighted_steps_replay_one_capture_reading_each_batchs_weights(cuda_module, monkeypatch,
                                                                      ragged):
    # The weights, unlike the settings, are data of the batch: a slot keeps them in its own
    # buffer, written before each replay, so steps of other weights (a batch of no weight among
    # them, which the Adam kernel skips) replay the first capture.
    backend = cuda_module.CUDABackend(recurrence="step", graphs=True)
    captured = captures(backend, monkeypatch)
    spec, params, x, y, _, _ = make_problem((9, 5, 3, 4, 2, 3), "cross_entropy")
    lengths = np.array([5, 2, 4, 1, 5, 3, 5, 2, 4]) if ragged else None
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    config = AdamConfig(1e-2)
    for weights in (parity.weights_with_zeros(9), np.zeros(9), np.ones(9),
                    parity.weights_with_zeros(9, seed=1)):
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config, lengths,
                                  weights)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config, lengths, backend.asarray(weights))
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert len(captured) == 1 and s_dev.step == s_ref.step == 3
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10
    # unweighted batches of the same shape run in a slot of their own, without weights
    backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                       "cross_entropy", config, lengths)
    assert [slot.weights is None for slot in captured] == [False, True]


def record_launches(monkeypatch):
    """Every kernel launch of the emulated backend from now on, as ``(function, args)``: when
    it is issued (a capturing stream records it to run later)."""
    launches = []
    launch = fake_cupy.Function.__call__

    def record(function, grid, block, args, shared_mem=0, stream=None,
               enable_cooperative_groups=False):
        launches.append((function, args))
        return launch(function, grid, block, args, shared_mem, stream, enable_cooperative_groups)

    monkeypatch.setattr(fake_cupy.Function, "__call__", record)
    return launches


def test_the_launches_of_a_step_carry_no_setting(cuda_module, monkeypatch):
    # A CUDA graph replays its launches with the arguments they had at capture: a step's may be
    # buffers and sizes, never a setting, which the Adam kernel reads from the state's buffer.
    backend = cuda_module.CUDABackend(recurrence="step", graphs=False)
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 2, 3), "cross_entropy")
    p = backend.asarray(params)
    state = backend.adam_state(p)
    backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y), "cross_entropy",
                       AdamConfig(1e-2, clip_grad_norm=1.0))
    (slot,) = backend._slots.values()
    launches = record_launches(monkeypatch)
    backend._step_body(slot, p, state, backend.recurrence)
    arguments = [a for _, args in launches for a in args]
    assert not [a for a in arguments if isinstance(a, (float, np.floating))]
    assert any(a is state.settings for a in arguments)


def test_graph_key_holds_every_buffer_of_the_adam_state_and_no_setting(cuda_module):
    cupy = cuda_module.cupy
    backend = cuda_module.CUDABackend(graphs=False)
    params = cupy.zeros((10,), cupy.float32)
    state = backend.adam_state(params)
    key = cuda_module._graph_key(params, state)
    state.write_settings(AdamConfig(0.5, beta1=0.1, beta2=0.2, eps=0.3, weight_decay=0.4,
                                    clip_grad_norm=5.0), grad_scale=0.25)
    assert cuda_module._graph_key(params, state) == key
    # The captured Adam launch reads or writes each of these: another one needs another graph.
    for name in ("m", "v", "counter", "arrivals", "settings"):
        other = copy.copy(state)
        setattr(other, name, getattr(state, name).copy())
        assert cuda_module._graph_key(params, other) != key, name
    assert cuda_module._graph_key(params.copy(), state) != key


def test_lengths_that_are_no_lengths_are_refused_before_any_work(cuda_module):
    # Variable lengths and bidirectional layers run (tests/test_cuda_ragged_emulated.py); lengths
    # outside 1..T are refused before anything is written.
    backend = cuda_module.CUDABackend(graphs=False)
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 1, 3), "cross_entropy",
                                            bidirectional=True)
    p = backend.asarray(params.copy())
    state = backend.adam_state(p)
    for bad in ([4, 0, 4], [4, 5, 1], [4, 2]):
        with pytest.raises(ValueError, match="lengths"):
            backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y),
                               "cross_entropy", AdamConfig(1e-2), lengths=np.array(bad))
        with pytest.raises(ValueError, match="lengths"):
            backend.forward(spec, p, backend.asarray(x), lengths=np.array(bad))
    np.testing.assert_array_equal(backend.to_host(p), params)
    assert state.step == 0 and not backend._slots
    # every row over all its steps is the fixed-length path
    full, _ = backend.forward(spec, p, backend.asarray(x), lengths=np.full(3, 4))
    np.testing.assert_array_equal(full, backend.forward(spec, p, backend.asarray(x))[0])
