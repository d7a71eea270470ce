"""What is specific to the CUDA backend: persistent vs per-step kernels, the issue's shapes,
CUDA-graph replay, device-side skipping of non-finite updates, host arrays out.

The generic parity tests (tests/test_backend_parity.py) cover the default CUDA backend
through the ``backend`` fixture; these run only where CuPy and a usable GPU are present.
"""

import numpy as np
import pytest

from fastlstm.backends import AdamConfig, BackendUnavailable, get_backend

from conftest import in_float64, make_problem, rel_err, shape_id
from oracle import ORACLE

try:
    get_backend("cuda")
    UNAVAILABLE = None
except BackendUnavailable as exc:
    UNAVAILABLE = str(exc)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no CUDA backend: {UNAVAILABLE}")]

TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}
#: (batch, steps, inputs, hidden, layers, outputs): the issue's shapes
SHAPES = [
    (1, 1, 1, 1, 1, 2),          # T=1, B=1, H=1
    (3, 1, 2, 5, 1, 3),          # T=1
    (1, 7, 3, 4, 1, 2),          # B=1
    (5, 4, 2, 1, 2, 3),          # H=1, two layers
    (4, 5, 3, 6, 3, 3),          # num_layers=3
    (128, 28, 28, 128, 1, 10),   # MNIST rows
    (40, 6, 5, 512, 1, 4),       # H=512
    (33, 3, 4, 130, 2, 2),       # batch and hidden off the warp size
]


def cuda_backend(recurrence, graphs=True, gemm="cublas"):
    from fastlstm.backends.cuda import CUDABackend
    return CUDABackend(recurrence=recurrence, graphs=graphs, gemm=gemm)


def gradients(backend, problem, loss):
    spec, params, x, y, h0, c0 = problem
    a = backend.asarray
    p = a(params)
    outputs, cache = backend.forward(spec, p, a(x), a(h0), a(c0), train=True)
    value, doutputs = backend.loss(outputs, a(y), loss)
    grads = backend.backward(spec, p, cache, doutputs, input_grads=True)
    inference, _ = backend.forward(spec, p, a(x), a(h0), a(c0))
    host = backend.to_host
    named = spec.layout.views(host(grads.params))
    named.update(outputs=host(outputs), inference=host(inference), loss=float(value),
                 dx=host(grads.x), dh0=host(grads.h0), dc0=host(grads.c0))
    return named


@pytest.mark.parametrize("gemm", ["cublas", "kernels"])
@pytest.mark.parametrize("recurrence", ["persistent", "step"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_the_oracle(shape, dtype, recurrence, gemm):
    problem = make_problem(shape, "cross_entropy", dtype)
    got = gradients(cuda_backend(recurrence, gemm=gemm), problem, "cross_entropy")
    want = gradients(ORACLE, in_float64(*problem), "cross_entropy")
    for name, expected in want.items():
        err = rel_err(got[name], expected)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("shape", [(128, 28, 28, 128, 1, 10), (40, 6, 5, 512, 1, 4),
                                   (1024, 4, 28, 128, 2, 10)], ids=shape_id)
def test_persistent_and_per_step_agree(shape):
    B, _, _, H, _, _ = shape
    persistent, step = cuda_backend("persistent"), cuda_backend("step")
    for direction in ("forward", "backward"):
        assert persistent.recurrence_kind(direction, H, B, np.float32) == "persistent"
        assert step.recurrence_kind(direction, H, B, np.float32) == "step"
    problem = make_problem(shape, "squared_error", np.float32)
    a = gradients(persistent, problem, "squared_error")
    b = gradients(step, problem, "squared_error")
    for name in a:
        # The two may split the dot products differently (order of float32 sums only).
        err = rel_err(a[name], b[name])
        assert err < 1e-5, f"{name}: persistent vs per-step relative difference {err:.2e}"


@pytest.mark.parametrize("gemm", ["cublas", "kernels"])
@pytest.mark.parametrize("recurrence", ["persistent", "step"])
def test_graph_replay_equals_uncaptured_steps(recurrence, gemm):
    spec, params, x, y, _, _ = make_problem((64, 6, 5, 16, 2, 4), "cross_entropy", np.float32)
    runs = {}
    for graphs in (True, False):
        backend = cuda_backend(recurrence, graphs, gemm)
        p = backend.asarray(params)
        state = backend.adam_state(p)
        losses = []
        for step in range(5):
            # a last, partial batch takes its own slot (and graph); the settings change at
            # every step, which the replayed graph reads from the device
            n = 64 if step < 4 else 40
            config = AdamConfig(1e-2 / (1 + step), beta1=0.9 - 0.05 * step,
                                weight_decay=0.01 * step, clip_grad_norm=0.5 + step)
            losses.append(float(backend.train_step(
                spec, p, state, backend.asarray(x[:n]), backend.asarray(y[:n]), "cross_entropy",
                config)))
        runs[graphs] = (losses, backend.to_host(p), backend.to_host(state.m), state.step)
        if graphs:
            slots = list(backend._slots.values())
            assert all(g is not None for s in slots for g in s.graphs.values()), \
                "graph capture failed (see the warning)"
            assert [len(s.graphs) for s in slots] == [1, 1], "new settings, new capture"
            assert backend.graph_replays == 3
    assert runs[True][0] == runs[False][0]
    np.testing.assert_array_equal(runs[True][1], runs[False][1])
    np.testing.assert_array_equal(runs[True][2], runs[False][2])
    assert runs[True][3] == runs[False][3] == 5


def test_replayed_step_skips_non_finite_update():
    spec, params, x, _, _, _ = make_problem((8, 3, 2, 4, 1, 2), "squared_error", np.float32)
    backend = cuda_backend("persistent")
    p = backend.asarray(params)
    state = backend.adam_state(p)
    good = np.zeros((8, 2), np.float32)
    config = AdamConfig(1e-2)
    for _ in range(2):  # the second step replays the captured graph
        backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(good),
                           "squared_error", config)
    before = backend.to_host(p)
    bad = np.full((8, 2), np.nan, np.float32)
    loss = backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(bad),
                              "squared_error", config)
    assert np.isnan(float(loss))
    np.testing.assert_array_equal(backend.to_host(p), before)
    assert state.step == 2


def test_results_come_back_as_host_arrays():
    spec, params, x, y, _, _ = make_problem((4, 3, 2, 3, 1, 2), "cross_entropy", np.float32)
    backend = cuda_backend("persistent")
    p = backend.asarray(params)
    loss = backend.train_step(spec, p, backend.adam_state(p), backend.asarray(x),
                              backend.asarray(y), "cross_entropy", AdamConfig(1e-2))
    assert loss.shape == () and isinstance(float(loss), float)
    host = backend.to_host(p)
    assert type(host) is np.ndarray and host.dtype == np.float32 and host.shape == params.shape
    probs = backend.to_host(backend.softmax(backend.forward(spec, p, backend.asarray(x))[0]))
    assert type(probs) is np.ndarray
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("recurrence", ["persistent", "step"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", [(128, 28, 28, 128, 1, 10), (33, 3, 4, 130, 2, 2),
                                   (40, 6, 5, 512, 1, 4)], ids=shape_id)
def test_matches_the_oracle_with_lengths(shape, bidirectional, recurrence):
    # the shapes with variable lengths (tests/test_ragged_parity.py has the small ones)
    from conftest import make_lengths
    problem = make_problem(shape, "cross_entropy", np.float32, bidirectional=bidirectional)
    lengths = make_lengths(shape[0], shape[1], "random")
    backend = cuda_backend(recurrence)
    got = ragged_run(backend, problem, lengths)
    want = ragged_run(ORACLE, in_float64(*problem), lengths)
    for name, expected in want.items():
        err = rel_err(got[name], expected)
        assert err < TOLERANCE[np.float32], f"{name}: relative error {err:.2e}"


def ragged_run(backend, problem, lengths):
    import test_ragged_parity
    run = test_ragged_parity.run(backend, *problem, "cross_entropy", lengths)
    named = dict(run.pop("grads"))
    named.update(run)
    return named


def assert_replays_equal_uncaptured_steps(recurrence, bidirectional, steps):
    """Train steps with the keyword arguments ``steps`` (one dict a step) replay one graph of
    one slot, and equal the same steps run without graphs."""
    spec, params, x, y, _, _ = make_problem((64, 6, 5, 16, 2, 4), "cross_entropy", np.float32,
                                            bidirectional=bidirectional)
    runs = {}
    for graphs in (True, False):
        backend = cuda_backend(recurrence, graphs)
        p = backend.asarray(params)
        state = backend.adam_state(p)
        losses = [float(backend.train_step(spec, p, state, backend.asarray(x),
                                           backend.asarray(y), "cross_entropy",
                                           AdamConfig(1e-2), **kwargs))
                  for kwargs in steps]
        runs[graphs] = (losses, backend.to_host(p))
        if graphs:
            assert [len(s.graphs) for s in backend._slots.values()] == [1]
    assert runs[True][0] == runs[False][0]
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


@pytest.mark.parametrize("recurrence", ["persistent", "step"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_graph_replay_with_lengths_equals_uncaptured_steps(recurrence, bidirectional):
    # one slot and one graph for every batch of the shape, whatever its lengths
    rng = np.random.default_rng(0)
    assert_replays_equal_uncaptured_steps(recurrence, bidirectional,
                                          [dict(lengths=rng.integers(1, 7, 64)) for _ in range(4)])


@pytest.mark.parametrize("recurrence", ["persistent", "step"])
@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
def test_graph_replay_with_new_dropout_seeds_equals_uncaptured_steps(recurrence, ragged):
    # one graph for every step of the slot, whatever its dropout's seed and rates (the parity
    # of dropout with the oracle: tests/test_dropout.py, whose backends include this one)
    from fastlstm.dropout import Dropout
    lengths = np.random.default_rng(0).integers(1, 7, 64) if ragged else None
    dropouts = [Dropout(0.3, 0.2, seed) for seed in range(3)] + [Dropout(0.5, 0.4, 2**64 - 1)]
    assert_replays_equal_uncaptured_steps(recurrence, True, [dict(lengths=lengths, dropout=d)
                                                             for d in dropouts])
