"""The oracle itself: reference gradients against central finite differences in float64."""

import numpy as np
import pytest

from fastlstm import reference
from fastlstm.dropout import Dropout

from conftest import LENGTH_KINDS, SMALL_SHAPES, make_lengths, make_problem, rel_err, shape_id

# Step near the cube root of float64 epsilon: balances truncation and round-off error.
EPS = 1e-5


def numeric_grad(fn, array):
    """Central differences of the scalar ``fn()`` w.r.t. every entry of ``array`` (in place)."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for n in range(flat.size):
        saved = flat[n]
        flat[n] = saved + EPS
        up = fn()
        flat[n] = saved - EPS
        down = fn()
        flat[n] = saved
        gflat[n] = (up - down) / (2 * EPS)
    return grad


@pytest.mark.parametrize("loss", reference.LOSSES)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_gradients_match_finite_differences(shape, loss):
    spec, flat, x, y, h0, c0 = make_problem(shape, loss)
    params = spec.layout.views(flat)

    def value():
        return reference.loss(reference.forward(params, x, h0, c0)[0], y, loss)[0]

    _, grads, dx, dh0, dc0, _ = reference.loss_and_grad(params, x, y, loss, h0, c0)
    checks = {name: (grads[name], params[name]) for name in params}
    checks.update(x=(dx, x), h0=(dh0, h0), c0=(dc0, c0))
    for name, (analytic, array) in checks.items():
        err = rel_err(analytic, numeric_grad(value, array))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("lengths_kind", LENGTH_KINDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 3, 1, 2), (4, 5, 2, 2, 2, 3), (1, 1, 1, 1, 1, 2)],
                         ids=shape_id)
def test_lengths_and_directions_match_finite_differences(shape, bidirectional, lengths_kind):
    spec, flat, x, y, h0, c0 = make_problem(shape, "cross_entropy", bidirectional=bidirectional)
    params = spec.layout.views(flat)
    lengths = make_lengths(shape[0], shape[1], lengths_kind)

    def value():
        return reference.loss(reference.forward(params, x, h0, c0, lengths)[0], y,
                              "cross_entropy")[0]

    _, grads, dx, dh0, dc0, _ = reference.loss_and_grad(params, x, y, "cross_entropy", h0, c0,
                                                        lengths)
    checks = {name: (grads[name], params[name]) for name in params}
    checks.update(x=(dx, x), h0=(dh0, h0), c0=(dc0, c0))
    for name, (analytic, array) in checks.items():
        err = rel_err(analytic, numeric_grad(value, array))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    # the steps past a sample's length are not read: their gradient is exactly zero
    past = np.arange(shape[1])[None, :] >= lengths[:, None]
    assert not dx[past].any()


@pytest.mark.parametrize("masks", ["between", "recurrent", "both"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_dropout_masks_match_finite_differences(masks, bidirectional):
    """With fixed masks the network is a function like any other: its gradients hold."""
    shape = (4, 5, 2, 3, 2, 3)
    spec, flat, x, y, h0, c0 = make_problem(shape, "cross_entropy", bidirectional=bidirectional)
    params = spec.layout.views(flat)
    lengths = make_lengths(shape[0], shape[1], "random")
    dropout = Dropout(p=0.4 if masks != "recurrent" else 0.0,
                      recurrent_p=0.4 if masks != "between" else 0.0, seed=7)
    rows = np.arange(shape[0])
    kwargs = dict(between_masks=dropout.between_masks(spec, rows, shape[1], x.dtype),
                  recurrent_masks=dropout.recurrent_masks(spec, rows, x.dtype))
    # the masks drop some units and keep others (else this checks less than it says)
    for mask in kwargs["between_masks"] + [kwargs["recurrent_masks"]]:
        if mask is not None:
            assert 0 < (mask == 0).mean() < 1

    def value():
        return reference.loss(reference.forward(params, x, h0, c0, lengths, **kwargs)[0], y,
                              "cross_entropy")[0]

    _, grads, dx, dh0, dc0, _ = reference.loss_and_grad(params, x, y, "cross_entropy", h0, c0,
                                                        lengths, **kwargs)
    checks = {name: (grads[name], params[name]) for name in params}
    checks.update(x=(dx, x), h0=(dh0, h0), c0=(dc0, c0))
    for name, (analytic, array) in checks.items():
        err = rel_err(analytic, numeric_grad(value, array))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    # the masks change the function: the same network without them differs
    assert not np.allclose(reference.forward(params, x, h0, c0, lengths)[0],
                           reference.forward(params, x, h0, c0, lengths, **kwargs)[0])


def test_a_sample_past_its_length_is_not_read():
    spec, flat, x, _, _, _ = make_problem((3, 5, 2, 3, 2, 2), "cross_entropy",
                                          initial_states=False, bidirectional=True)
    params = spec.layout.views(flat)
    lengths = np.array([5, 2, 3])
    changed = x.copy()
    changed[1, 2:] = 1e3
    changed[2, 3:] = np.nan
    np.testing.assert_array_equal(reference.forward(params, x, lengths=lengths)[0],
                                  reference.forward(params, changed, lengths=lengths)[0])


def test_zero_initial_states_equal_omitted():
    spec, flat, x, y, _, _ = make_problem((2, 3, 2, 3, 2, 2), "cross_entropy", initial_states=False)
    params = spec.layout.views(flat)
    zeros = np.zeros((2, 2, 3))
    np.testing.assert_array_equal(reference.forward(params, x)[0],
                                  reference.forward(params, x, zeros, zeros)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_forward_stay_finite_for_huge_inputs(dtype):
    z = np.array([-1e4, -100.0, -1.0, 0.0, 1.0, 100.0, 1e4], dtype=dtype)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = reference.sigmoid(z)
    assert s.dtype == dtype
    np.testing.assert_allclose(s[[0, 3, 6]], [0.0, 0.5, 1.0])
    spec, flat, x, y, h0, c0 = make_problem((2, 3, 2, 3, 1, 2), "cross_entropy", dtype)
    with np.errstate(over="raise", invalid="raise"):
        out, _ = reference.forward(spec.layout.views(flat), x * 1e4, h0, c0)
    assert np.isfinite(out).all()


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        reference.loss(np.zeros((2, 2)), np.zeros(2, int), "hinge")
