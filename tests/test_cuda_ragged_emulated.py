"""Variable lengths and bidirectional layers on the CUDA backend's own code and kernels, run on the
CPU emulator (see tests/test_cuda_emulated.py), against the oracle.

The checks are those of tests/test_ragged_parity.py (and PyTorch's packed LSTM, where PyTorch is
installed), which the emulated backend does not reach through ``available_backends()``.  The
emulator is slow, so the product of shapes x directions x lengths x dtypes x recurrence kernels
is cut to a representative set (:data:`CASES`): every shape of ``SHAPES`` (1 to 3 layers, T=1,
one sample, a batch of 37 over two chunks of rows) uni- and bidirectional with random lengths
on the persistent kernels in float64; every kind of lengths, uni and bi, on a two-layer shape;
float32 on both kernels; and on the per-step kernels a two- and a three-layer network, T=1 and
one sample.  Besides: ``train_step`` with lengths (the padded training slot whose CUDA graph
serves every batch of its shape), that its launches do not depend on the lengths, that the
kernels cover the packed steps only, and that padding is never read.
"""

import shutil

import numpy as np
import pytest

import test_ragged_parity as ragged
from conftest import in_float64, make_lengths, make_problem, rel_err, shape_id
from cuda_emulator import fake_cupy
from fastlstm.backends import AdamConfig
from oracle import ORACLE
from test_cuda_emulated import cuda_module  # noqa: F401  (the emulated CUDA module fixture)
from test_cuda_emulated import captures, make_backend, record_launches

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed here")

F64, F32 = np.float64, np.float32
SHAPES = ragged.SHAPES
TWO_LAYERS = SHAPES[1]

#: (recurrence, shape, bidirectional, lengths kind, dtype)
CASES = (
    [("persistent", shape, bi, "random", F64) for shape in SHAPES for bi in (False, True)]
    + [("persistent", TWO_LAYERS, bi, kind, F64) for kind in ragged.LENGTH_KINDS
       if kind != "random" for bi in (False, True)]
    + [("persistent", SHAPES[5], True, "random", F32),
       ("persistent", SHAPES[2], False, "one-short", F32),
       ("step", SHAPES[5], True, "one-short", F32), ("step", SHAPES[0], False, "random", F32)]
    + [("step", shape, bi, "random", F64) for shape in (TWO_LAYERS, SHAPES[2])
       for bi in (False, True)]
    + [("step", SHAPES[3], True, "random", F64), ("step", SHAPES[4], True, "ones", F64),
       ("step", TWO_LAYERS, True, "full", F64)])


def case_id(case):
    recurrence, shape, bi, kind, dtype = case
    return f"{recurrence}-{shape_id(shape)}-{'bi' if bi else 'uni'}-{kind}-{np.dtype(dtype).name}"


def emulated(cuda_module, recurrence, graphs=False):  # noqa: F811
    backend = make_backend(cuda_module, recurrence, graphs)
    for direction in ("forward", "backward"):
        assert backend.recurrence_kind(direction, 4, 5, np.float64) == recurrence
    return backend


@pytest.fixture(params=["persistent", "step"])
def backend(request, cuda_module):  # noqa: F811
    return emulated(cuda_module, request.param)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backend_matches_oracle(cuda_module, case):  # noqa: F811
    recurrence, shape, bidirectional, kind, dtype = case
    ragged.test_backend_matches_oracle(emulated(cuda_module, recurrence), shape, bidirectional,
                                       kind, dtype)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padding_is_never_read(backend, bidirectional):
    ragged.test_padding_is_never_read(backend, bidirectional)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_train_step_with_lengths_matches_oracle(backend, bidirectional):
    ragged.test_train_step_with_lengths_matches_oracle(backend, bidirectional)


def test_lengths_out_of_range_are_refused(cuda_module):  # noqa: F811
    ragged.test_lengths_out_of_range_are_refused(emulated(cuda_module, "step"))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_backend_equals_torch_on_packed_sequences(cuda_module, num_layers,  # noqa: F811
                                                  bidirectional):
    torch_equivalence = pytest.importorskip("test_torch_equivalence")
    torch_equivalence.test_backend_equals_torch_on_packed_sequences(
        emulated(cuda_module, "persistent"), num_layers, bidirectional)


def test_kernels_cover_the_packed_steps_only(cuda_module, monkeypatch):  # noqa: F811
    # The GEMMs run over sum(lengths) columns, and the per-step kernels launch for the longest
    # row's steps only; within a step, parity (above) shows that only the active rows are
    # written: the packed layout has no room for any other.
    backend = emulated(cuda_module, "step")
    spec, params, x, y, _, _ = make_problem((6, 7, 3, 4, 2, 3), "cross_entropy",
                                            bidirectional=True)
    lengths = np.array([3, 1, 5, 2, 5, 4])
    launches = record_launches(monkeypatch)
    _, cache = backend.forward(spec, backend.asarray(params), backend.asarray(x), train=True,
                               lengths=lengths)
    assert cache.columns == lengths.sum()
    assert all(xg.shape == (16, lengths.sum()) for layer in cache.xg for xg in layer)
    forward_step = cuda_module._kernel("lstm_step", "forward_step", np.float64)
    steps = sum(function is forward_step.kernel for function, _ in launches)
    assert steps == lengths.max() * spec.num_layers * spec.num_directions


def _record_step_body(backend, monkeypatch, cuda_module, run):  # noqa: F811
    """Every kernel launch and GEMM of the training steps' bodies while ``run()`` runs:
    arrays by device pointer, numbers by value (what a CUDA graph bakes in)."""
    calls = []
    blas = type(backend.blas(np.float64))
    launch, gemm = fake_cupy.Function.__call__, blas.gemm

    def arg(a):
        return ("ptr", a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else a

    def record_launch(function, grid, block, args, shared_mem=0, stream=None,
                      enable_cooperative_groups=False):
        calls.append(("kernel", function.ptr, grid, block, shared_mem,
                      tuple(arg(a) for a in args), enable_cooperative_groups))
        return launch(function, grid, block, args, shared_mem, stream, enable_cooperative_groups)

    def record_gemm(blas, c, a, b, ta=False, tb=False, accumulate=False):
        calls.append(("gemm", *((m.ptr, m.rows, m.cols, m.ld) for m in (c, a, b)), ta, tb,
                      accumulate))
        return gemm(blas, c, a, b, ta, tb, accumulate)

    body = backend._step_body

    def recorded_body(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(fake_cupy.Function, "__call__", record_launch)
            patch.setattr(blas, "gemm", record_gemm)
            body(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(backend, "_step_body", recorded_body)
        run()
    return calls


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_ragged_step_launches_the_same_whatever_the_lengths(cuda_module, monkeypatch,
                                                             bidirectional):  # noqa: F811
    # A CUDA graph replays its launches and GEMMs as captured: a training slot of
    # variable-length batches must launch the same kernels with the same arguments, and the
    # same GEMMs, for every batch of its shape; the lengths reach the kernels through the
    # schedule buffer only.
    backend = emulated(cuda_module, "step")
    spec, params, x, y, _, _ = make_problem((5, 4, 2, 3, 2, 3), "cross_entropy",
                                            bidirectional=bidirectional)
    p = backend.asarray(params)
    state = backend.adam_state(p)
    records = []
    for lengths in ([4, 1, 3, 2, 4], [1, 1, 1, 1, 2], [3, 3, 4, 3, 3]):
        records.append(_record_step_body(backend, monkeypatch, cuda_module, lambda: (
            backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y),
                               "cross_entropy", AdamConfig(1e-2), lengths=np.array(lengths)))))
    assert records[0] and records[0] == records[1] == records[2]
    assert len(backend._slots) == 1


def test_one_capture_serves_batches_of_any_lengths(cuda_module, monkeypatch):  # noqa: F811
    # The step captured once, its graph replayed for batches of other lengths (one with a non-finite input first: its states
    # stay in the columns past the packed steps of the next, shorter batches, which the step
    # zeroes, so they cannot poison the gradients).
    backend = emulated(cuda_module, "persistent", graphs=True)
    captured = captures(backend, monkeypatch)
    spec, params, x, y, _, _ = make_problem((7, 5, 3, 4, 2, 3), "cross_entropy",
                                            bidirectional=True)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    batches = [(x, make_lengths(7, 5, "random")), (bad, np.full(7, 4)),
               (x, make_lengths(7, 5, "ones")), (x, make_lengths(7, 5, "one-short", seed=3)),
               (x, make_lengths(7, 5, "random", seed=5))]
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    config = AdamConfig(1e-2)
    for inputs, lengths in batches:
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, inputs, y, "cross_entropy", config, lengths)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(inputs),
                                   backend.asarray(y), "cross_entropy", config, lengths=lengths)
        if np.isfinite(l_ref):
            assert abs(float(l_dev) - l_ref) < 1e-10
        else:
            assert not np.isfinite(float(l_dev))
    assert len(captured) == 1, "new lengths must not need a new capture"
    assert s_dev.step == s_ref.step == len(batches) - 1
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_full_lengths_are_the_fixed_length_path(cuda_module, bidirectional):  # noqa: F811
    backend = emulated(cuda_module, "persistent")
    spec, params, x, y, h0, c0 = make_problem((5, 4, 2, 3, 2, 3), "cross_entropy", F32,
                                              bidirectional=bidirectional)
    a = backend.asarray
    full = np.full(5, 4)
    fixed, _ = backend.forward(spec, a(params), a(x), a(h0), a(c0))
    same, _ = backend.forward(spec, a(params), a(x), a(h0), a(c0), lengths=full)
    np.testing.assert_array_equal(fixed, same)
    runs = []
    for lengths in (None, full):
        p = a(params.copy())
        state = backend.adam_state(p)
        for _ in range(2):
            backend.train_step(spec, p, state, a(x), a(y), "cross_entropy", AdamConfig(1e-2),
                               lengths=lengths)
        runs.append(backend.to_host(p))
    np.testing.assert_array_equal(*runs)
    assert len(backend._slots) == 1


def test_inference_matches_training_forward_for_every_kind(cuda_module):  # noqa: F811
    # Inference keeps two slots of states for the top layer (rows frozen past their length in
    # whichever slot they last wrote); training keeps every step.
    backend = emulated(cuda_module, "step")
    for bidirectional in (False, True):
        for kind in ragged.LENGTH_KINDS:
            spec, params, x, _, h0, c0 = make_problem((6, 5, 2, 3, 1, 2), "squared_error",
                                                      bidirectional=bidirectional)
            lengths = make_lengths(6, 5, kind)
            a = backend.asarray
            train, _ = backend.forward(spec, a(params), a(x), a(h0), a(c0), train=True,
                                       lengths=lengths)
            infer, _ = backend.forward(spec, a(params), a(x), a(h0), a(c0), lengths=lengths)
            np.testing.assert_array_equal(train, infer)
            want, _ = ORACLE.forward(spec, *in_float64(params, x, h0, c0), lengths=lengths)
            assert rel_err(infer, want) < 1e-10
