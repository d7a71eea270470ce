"""Training that goes wrong loses nothing: divergence and KeyboardInterrupt at the estimator level.

A diverging fit (real divergence: a huge learning rate, huge regression
targets) stops with an error naming what to change, and the estimator keeps
the weights it had before the diverging epoch, which predict finite values.
A KeyboardInterrupt at minibatch k leaves exactly the weights that a
reference run had after k - 1 steps, and a model that predicts and trains on.
"""

import warnings

import numpy as np
import pytest

from fastlstm import LSTMClassifier, LSTMRegressor
from fastlstm.backends import get_backend

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=3, random_state=0,
            device="cpu")
STEPS_PER_EPOCH = 3  # 48 samples in batches of 16
RNG = np.random.default_rng(0)
X = RNG.standard_normal((48, 5, 2)).astype(np.float32)
Y = np.arange(48) % 3


@pytest.fixture
def steps(monkeypatch):
    """Record every train_step of the CPU backend: the weights it started from and its loss.

    ``steps.fail_at = (k, exception or value)`` makes the k-th call (from 1)
    raise the exception instead, or return the value after running.
    """
    backend = get_backend("cpu")
    original = backend.train_step

    class Steps:
        weights_before, losses, fail_at = [], [], None

    def recording(spec, params, *args, **kwargs):
        Steps.weights_before.append(np.array(params, copy=True))
        k = len(Steps.weights_before)
        if Steps.fail_at is not None and Steps.fail_at[0] == k \
                and isinstance(Steps.fail_at[1], BaseException):
            raise Steps.fail_at[1]
        Steps.losses.append(original(spec, params, *args, **kwargs))
        if Steps.fail_at is not None and Steps.fail_at[0] == k:
            return Steps.fail_at[1]
        return Steps.losses[-1]

    monkeypatch.setattr(backend, "train_step", recording)
    return Steps


@pytest.mark.parametrize("make, y, advice", [
    (lambda: LSTMClassifier(**{**TINY, "learning_rate_init": 3e38}), Y,
     r"Lower learning_rate_init, set clip_grad_norm \(e.g. 1.0\), or scale X"),
    (lambda: LSTMRegressor(**TINY), np.full(48, 1e20),
     r"or scale X \(e.g. StandardScaler in a Pipeline\) and y \(e.g. TransformedTargetRegressor"),
], ids=["classifier-huge-learning-rate", "regressor-huge-targets"])
def test_divergence_stops_with_advice_and_keeps_weights_that_predict_finite_values(
        steps, make, y, advice):
    est = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflow itself, in NumPy's GEMM
        with pytest.raises(FloatingPointError, match="loss of epoch 1 is (nan|inf); training "
                                                     "stopped.*after 0 epochs.*" + advice):
            est.fit(X, y)
    assert not np.isfinite(steps.losses).all()  # it really diverged
    assert est.n_iter_ == 0 and est.loss_curve_ == [] and est._adam.step == 0
    np.testing.assert_array_equal(est._params, steps.weights_before[0])
    outputs = est.predict_proba(X) if hasattr(est, "predict_proba") else est.predict(X)
    assert np.isfinite(outputs).all()


def test_divergence_in_a_later_epoch_keeps_the_weights_of_the_epoch_before(steps):
    steps.fail_at = (2 * STEPS_PER_EPOCH + 2, float("nan"))  # second step of epoch 3
    clf = LSTMClassifier(**{**TINY, "max_iter": 5})
    with pytest.raises(FloatingPointError, match="loss of epoch 3 is nan.*after 2 epochs"):
        clf.fit(X, Y)
    assert clf.n_iter_ == 2 and len(clf.loss_curve_) == 2
    np.testing.assert_array_equal(clf._params, steps.weights_before[2 * STEPS_PER_EPOCH])
    assert clf._adam.step == 2 * STEPS_PER_EPOCH
    assert np.isfinite(clf.predict_proba(X)).all()


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_keyboard_interrupt_at_batch_k_keeps_the_weights_after_k_minus_1_steps(steps, k):
    LSTMClassifier(**TINY).fit(X, Y)  # the reference run: 3 epochs of 3 steps
    reference = list(steps.weights_before)
    steps.weights_before.clear()
    steps.fail_at = (k, KeyboardInterrupt())
    with pytest.warns(UserWarning, match=f"interrupted by the user during epoch "
                                         f"{(k - 1) // STEPS_PER_EPOCH + 1}"):
        clf = LSTMClassifier(**TINY).fit(X, Y)
    np.testing.assert_array_equal(clf._params, reference[k - 1])
    assert clf._adam.step == k - 1 and clf.n_iter_ == (k - 1) // STEPS_PER_EPOCH
    assert np.isfinite(clf.predict_proba(X)).all()
    steps.fail_at = None
    clf.set_params(warm_start=True, max_iter=1).fit(X, Y)  # and it trains on
    assert clf.n_iter_ == (k - 1) // STEPS_PER_EPOCH + 1
