"""Sample weights and class weights: the weighted loss of every backend, and the estimators'
``sample_weight`` and ``class_weight`` (scikit-learn's conventions, metadata routing included).

The backends' weighted losses and gradients are compared with the oracle in
tests/test_backend_parity.py (and, for the CUDA kernels, tests/test_cuda_emulated.py); here:
the oracle's own definition and gradient, and what weights of ones and of zero do.
"""

import numpy as np
import pytest

from fastlstm import reference
from fastlstm.backends import AdamConfig, get_backend

from conftest import make_problem, rel_err
from test_backend_parity import weights_with_zeros
from test_reference_gradcheck import numeric_grad


# ------------------------------------------------------------------------------ the oracle

@pytest.mark.parametrize("loss", reference.LOSSES)
def test_the_weighted_loss_is_the_weighted_mean_of_each_samples_loss(loss):
    _, _, _, y, _, _ = make_problem((6, 1, 1, 1, 1, 3), loss)
    outputs = np.random.default_rng(3).standard_normal((6, 3))
    weights = weights_with_zeros(6)
    value, grad = reference.loss(outputs, y, loss, weights)
    each = [reference.loss(outputs[i:i + 1], y[i:i + 1], loss) for i in range(6)]
    total = weights.sum()
    assert value == pytest.approx(sum(w * v for w, (v, _) in zip(weights, each)) / total,
                                  rel=1e-14)
    want = np.concatenate([w * g for w, (_, g) in zip(weights, each)]) / total
    np.testing.assert_allclose(grad, want, rtol=1e-14, atol=1e-17)
    # weights scale-free: what matters is each sample's share
    np.testing.assert_allclose(reference.loss(outputs, y, loss, 7 * weights)[1], grad,
                               rtol=1e-14)


@pytest.mark.parametrize("loss", reference.LOSSES)
def test_weighted_gradients_match_finite_differences(loss):
    spec, flat, x, y, h0, c0 = make_problem((5, 3, 2, 3, 2, 3), loss)
    params = spec.layout.views(flat)
    weights = weights_with_zeros(5)

    def value():
        return reference.loss(reference.forward(params, x, h0, c0)[0], y, loss, weights)[0]

    _, grads, dx, dh0, dc0, _ = reference.loss_and_grad(params, x, y, loss, h0, c0,
                                                        sample_weight=weights)
    checks = {name: (grads[name], params[name]) for name in params}
    checks.update(x=(dx, x), h0=(dh0, h0), c0=(dc0, c0))
    for name, (analytic, array) in checks.items():
        err = rel_err(analytic, numeric_grad(value, array))
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    # a sample of weight zero has no gradient at all
    assert not dx[weights == 0].any()


def test_weights_that_sum_to_zero_give_no_loss_and_no_gradient():
    value, grad = reference.loss(np.ones((3, 2)), np.array([0, 1, 0]), "cross_entropy",
                                 np.zeros(3))
    assert value == 0 and not grad.any()


# ------------------------------------------------------------------- the CPU backend's steps

@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
@pytest.mark.parametrize("loss", reference.LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_cpu_steps_with_weights_of_one_are_bit_identical_to_unweighted(dtype, loss, ragged):
    backend = get_backend("cpu")
    spec, params, x, y, _, _ = make_problem((37, 5, 3, 6, 2, 3), loss, dtype)
    lengths = np.random.default_rng(1).integers(1, 6, 37) if ragged else None
    runs = []
    for weights in (None, np.ones(37)):
        p = params.copy()
        state = backend.adam_state(p)
        losses = [backend.train_step(spec, p, state, x, y, loss, AdamConfig(1e-2),
                                     lengths, weights) for _ in range(3)]
        runs.append((p, state, losses))
    (p, s, losses), (p1, s1, losses1) = runs
    assert losses == losses1
    for a, b in ((p, p1), (s.m, s1.m), (s.v, s1.v)):
        assert np.array_equal(a, b)
