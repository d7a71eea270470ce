"""Every backend against the oracle (:mod:`fastlstm.reference`) on the same weights and inputs."""

import numpy as np
import pytest

from fastlstm.backends import AdamConfig

from conftest import SMALL_SHAPES, in_float64, make_problem, rel_err, shape_id
from oracle import ORACLE

MNIST_SHAPE = (128, 28, 28, 128, 1, 10)
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-4}


def run(backend, spec, params, x, y, h0, c0, loss, sample_weight=None):
    xp = backend.xp
    params, x, y = backend.asarray(params), backend.asarray(x), backend.asarray(y)
    h0 = None if h0 is None else backend.asarray(h0)
    c0 = None if c0 is None else backend.asarray(c0)
    if sample_weight is not None:
        sample_weight = backend.asarray(sample_weight)
    outputs, cache = backend.forward(spec, params, x, h0, c0, train=True)
    value, doutputs = backend.loss(outputs, y, loss, sample_weight)
    grads = backend.backward(spec, params, cache, doutputs, input_grads=True)
    inference, _ = backend.forward(spec, params, x, h0, c0, train=False)
    host = backend.to_host
    assert xp is backend.xp
    return dict(outputs=host(outputs), inference=host(inference), loss=float(value),
                grads=spec.layout.views(host(grads.params)), x=host(grads.x),
                h0=host(grads.h0), c0=host(grads.c0))


def weights_with_zeros(batch, seed=0):
    """Sample weights from 0 to 3 for a batch, at least one of them zero where ``batch > 1``."""
    weights = 3 * np.random.default_rng(seed + 10).random(batch)
    weights[1::3] = 0.0
    return weights


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("shape", SMALL_SHAPES + [MNIST_SHAPE], ids=shape_id)
def test_backend_matches_reference(backend, shape, loss, dtype, sample_weight=None):
    problem = make_problem(shape, loss, dtype)
    got = run(backend, *problem, loss, sample_weight)
    want = run(ORACLE, *in_float64(*problem), loss, sample_weight)
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


WEIGHTED_SHAPES = [SMALL_SHAPES[1], SMALL_SHAPES[2], (33, 3, 2, 7, 2, 3)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("shape", WEIGHTED_SHAPES, ids=shape_id)
def test_weighted_loss_and_gradients_match_reference(backend, shape, loss, dtype):
    test_backend_matches_reference(backend, shape, loss, dtype, weights_with_zeros(shape[0]))


@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
def test_weighted_train_step_matches_reference(backend, ragged):
    spec, params, x, y, _, _ = make_problem((9, 5, 3, 4, 2, 3), "cross_entropy")
    lengths = np.array([5, 2, 4, 1, 5, 3, 5, 2, 4]) if ragged else None
    p_ref, p_dev = params.copy(), backend.asarray(params.copy())
    s_ref, s_dev = ORACLE.adam_state(p_ref), backend.adam_state(p_dev)
    for step in range(3):  # other weights at every step: a captured step reads each batch's
        weights = weights_with_zeros(9, seed=step)
        config = AdamConfig(1e-2, clip_grad_norm=0.5)
        l_ref = ORACLE.train_step(spec, p_ref, s_ref, x, y, "cross_entropy", config, lengths,
                                  weights)
        l_dev = backend.train_step(spec, p_dev, s_dev, backend.asarray(x), backend.asarray(y),
                                   "cross_entropy", config, lengths, backend.asarray(weights))
        assert abs(float(l_dev) - l_ref) < 1e-10
    assert s_dev.step == 3
    assert rel_err(backend.to_host(p_dev), p_ref) < 1e-10


def test_train_step_of_a_batch_of_no_weight_moves_nothing(backend):
    spec, params, x, y, _, _ = make_problem((4, 3, 2, 3, 1, 3), "cross_entropy")
    p = backend.asarray(params.copy())
    state = backend.adam_state(p)
    config = AdamConfig(1e-2)
    backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y), "cross_entropy",
                       config)
    before = [backend.to_host(a).copy() for a in (p, state.m, state.v)]
    loss = backend.train_step(spec, p, state, backend.asarray(x), backend.asarray(y),
                              "cross_entropy", config, sample_weight=backend.asarray(np.zeros(4)))
    assert float(loss) == 0.0 and state.step == 1
    for name, old, new in zip(("params", "m", "v"), before, (p, state.m, state.v)):
        np.testing.assert_array_equal(backend.to_host(new), old, err_msg=name)
    value, doutputs = backend.loss(backend.forward(spec, p, backend.asarray(x))[0],
                                   backend.asarray(y), "cross_entropy",
                                   backend.asarray(np.zeros(4)))
    assert float(value) == 0.0 and not backend.to_host(doutputs).any()


@pytest.mark.parametrize("bad", [np.ones(3), np.ones((4, 1))], ids=["length", "2-D"])
def test_sample_weight_of_the_wrong_shape_is_refused(backend, bad):
    spec, params, x, y, _, _ = make_problem((4, 3, 2, 3, 1, 3), "cross_entropy")
    p = backend.asarray(params)
    outputs, _ = backend.forward(spec, p, backend.asarray(x))
    with pytest.raises(ValueError, match="sample_weight must hold one weight per row"):
        backend.loss(outputs, backend.asarray(y), "cross_entropy", backend.asarray(bad))
    with pytest.raises(ValueError, match="sample_weight must hold one weight per row"):
        backend.train_step(spec, p, backend.adam_state(p), backend.asarray(x),
                           backend.asarray(y), "cross_entropy", AdamConfig(1e-2),
                           sample_weight=backend.asarray(bad))


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
