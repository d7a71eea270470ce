"""Every backend against the oracle (:mod:`fastlstm.reference`) on the same weights and inputs."""

import numpy as np
import pytest

from fastlstm.backends import AdamConfig

from conftest import SMALL_SHAPES, in_float64, make_problem, rel_err, shape_id
from oracle import ORACLE

MNIST_SHAPE = (128, 28, 28, 128, 1, 10)
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}


def run(backend, spec, params, x, y, h0, c0, loss):
    xp = backend.xp
    params, x, y = backend.asarray(params), backend.asarray(x), backend.asarray(y)
    h0 = None if h0 is None else backend.asarray(h0)
    c0 = None if c0 is None else backend.asarray(c0)
    outputs, cache = backend.forward(spec, params, x, h0, c0, train=True)
    value, doutputs = backend.loss(outputs, y, loss)
    grads = backend.backward(spec, params, cache, doutputs, input_grads=True)
    inference, _ = backend.forward(spec, params, x, h0, c0, train=False)
    host = backend.to_host
    assert xp is backend.xp
    return dict(outputs=host(outputs), inference=host(inference), loss=float(value),
                grads=spec.layout.views(host(grads.params)), x=host(grads.x),
                h0=host(grads.h0), c0=host(grads.c0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("shape", SMALL_SHAPES + [MNIST_SHAPE], ids=shape_id)
def test_backend_matches_reference(backend, shape, loss, dtype):
    problem = make_problem(shape, loss, dtype)
    got = run(backend, *problem, loss)
    want = run(ORACLE, *in_float64(*problem), loss)
    tol = TOLERANCE[dtype]
    assert got["outputs"].dtype == dtype
    pairs = {"outputs": (got["outputs"], want["outputs"]),
             "inference outputs": (got["inference"], want["outputs"]),
             "loss": (got["loss"], want["loss"]),
             "dx": (got["x"], want["x"]), "dh0": (got["h0"], want["h0"]),
             "dc0": (got["c0"], want["c0"])}
    pairs.update({name: (got["grads"][name], want["grads"][name]) for name in want["grads"]})
    for name, (actual, expected) in pairs.items():
        err = rel_err(actual, expected)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:g}"


def test_omitted_initial_states_mean_zeros(backend):
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 2, 3), "cross_entropy",
                                              initial_states=False)
    zeros = np.zeros((2, 3, 5))
    a, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x))
    b, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x),
                           backend.asarray(zeros), backend.asarray(zeros))
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))


def test_gradients_without_input_grads(backend):
    spec, params, x, y, h0, c0 = make_problem((3, 4, 2, 5, 2, 3), "cross_entropy")
    p = backend.asarray(params)
    outputs, cache = backend.forward(spec, p, backend.asarray(x), train=True)
    _, doutputs = backend.loss(outputs, backend.asarray(y), "cross_entropy")
    full = backend.backward(spec, p, cache, doutputs, input_grads=True)
    lean = backend.backward(spec, p, cache, doutputs)
    assert lean.x is None and lean.h0 is None and lean.c0 is None
    np.testing.assert_array_equal(backend.to_host(lean.params), backend.to_host(full.params))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_softmax_matches_reference(backend, dtype):
    logits = np.random.default_rng(1).standard_normal((7, 5)).astype(dtype) * 30
    got = backend.to_host(backend.softmax(backend.asarray(logits)))
    want = ORACLE.softmax(logits.astype(np.float64))
    assert rel_err(got, want) < TOLERANCE[dtype]
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_adam_matches_reference(backend, dtype):
    rng = np.random.default_rng(2)
    ref = ORACLE
    params = rng.standard_normal(1000).astype(dtype)
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ref.adam_state(p_ref), backend.adam_state(p_dev)
    for step in range(5):
        grads = rng.standard_normal(1000).astype(dtype)
        config = AdamConfig(1e-2, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.1)
        ref.adam_step(p_ref, grads, s_ref, config, grad_scale=0.5)
        backend.adam_step(p_dev, backend.asarray(grads), s_dev, config, grad_scale=0.5)
    assert s_dev.step == s_ref.step == 5
    assert rel_err(backend.to_host(p_dev), p_ref) < TOLERANCE[dtype]
    assert rel_err(backend.to_host(s_dev.v), s_ref.v) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_huge_inputs_give_finite_results(backend, dtype):
    spec, params, x, y, h0, c0 = make_problem((4, 5, 3, 6, 2, 3), "cross_entropy", dtype)
    p = backend.asarray(params)
    outputs, cache = backend.forward(spec, p, backend.asarray(x * 1e4), train=True)
    _, doutputs = backend.loss(outputs, backend.asarray(y), "cross_entropy")
    grads = backend.backward(spec, p, cache, doutputs, input_grads=True)
    for array in (outputs, grads.params, grads.x):
        assert np.isfinite(backend.to_host(array)).all()


@pytest.mark.parametrize("clip", [None, 0.01])
def test_train_step_matches_reference(backend, clip):
    spec, params, x, y, _, _ = make_problem((6, 5, 3, 4, 2, 3), "cross_entropy")
    ref = ORACLE
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ref.adam_state(p_ref), backend.adam_state(p_dev)
    for _ in range(3):
        config = AdamConfig(1e-2, clip_grad_norm=clip)
        l_ref = ref.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config)
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10


def test_train_step_skips_update_on_non_finite_loss(backend):
    spec, params, x, y, _, _ = make_problem((3, 4, 2, 5, 1, 3), "squared_error")
    p = backend.asarray(params.copy())
    state = backend.adam_state(p)
    y_bad = np.full_like(y, np.inf)
    backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y_bad),
                       "squared_error", AdamConfig(1e-2))
    np.testing.assert_array_equal(backend.to_host(p), params)
    assert state.step == 0


@pytest.mark.parametrize("bad", ["shape", "rows"])
def test_initial_states_of_the_wrong_shape_are_refused(backend, bad):
    spec, params, x, _, h0, c0 = make_problem((5, 4, 3, 4, 2, 3), "cross_entropy", np.float32)
    wrong = h0[:, :, :2] if bad == "shape" else h0[:, :3]
    with pytest.raises(ValueError, match="h0 must have shape"):
        backend.forward(spec, backend.asarray(params), backend.asarray(x), backend.asarray(wrong),
                        backend.asarray(c0))


def test_initial_states_are_taken_in_the_parameters_dtype(backend):
    spec, params, x, _, h0, c0 = make_problem((5, 4, 3, 4, 2, 3), "cross_entropy", np.float32)
    a, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x),
                           backend.asarray(h0), backend.asarray(c0))
    b, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x),
                           backend.asarray(h0.astype(np.float64)),
                           backend.asarray(c0.astype(np.float64)))
    np.testing.assert_array_equal(backend.to_host(a), backend.to_host(b))


def test_an_empty_batch_gives_no_outputs(backend):
    spec, params, x, _, _, _ = make_problem((3, 4, 2, 3, 1, 2), "cross_entropy", np.float32)
    out, _ = backend.forward(spec, backend.asarray(params), backend.asarray(x[:0]))
    assert backend.to_host(out).shape == (0, 2)
