"""scikit-learn's own estimator checks on both estimators (and a bidirectional one).

Small networks and large learning rates keep each of the ~100 checks fast while
the accuracy checks (blobs > 0.83, regression R² > 0.5) still pass honestly.

One check is expected to fail on the classifiers: that integer sample weights give the
very predictions (``rtol=1e-7``) of repeating each sample that many times.  The two
fits see the same full-batch loss and gradient up to float32 rounding in the order of
the sums (tests/test_sample_weight.py checks the equality in float64, to 1e-12), and
the rounding grows with training at this large learning rate: the predicted
probabilities differ by 3e-8 after one epoch, 6e-7 after 20 and 0.09 after 60.
sklearn runs this check on ``MLPClassifier`` with L-BFGS, not its default Adam.  Even after
one full-batch step it fails by one float32 ulp (relative 1.3e-7 in one probability of 45):
the check's ``rtol=1e-7`` is below float32's resolution.  The regressor's predictions
usually met it, by the luck of the rounding, but not always: run under pytest-xdist on an
Intel Xeon, one of 15 came out one ulp apart (relative 1.6e-7).  So the check is expected to
fail on every estimator, and where it passes pytest says XPASS.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from fastlstm import LSTMClassifier, LSTMRegressor

SMALL = dict(hidden_size=8, batch_size=100, learning_rate_init=0.05, max_iter=60, random_state=0)

ROUNDING_GROWS = {
    "check_sample_weight_equivalence_on_dense_data":
        "weights equal repetitions in the loss and gradient, but not in float32 rounding, "
        "which 60 epochs of Adam grow (see the module docstring)"}


def expected_failed_checks(estimator):
    return ROUNDING_GROWS


@parametrize_with_checks([LSTMClassifier(**SMALL), LSTMRegressor(**SMALL),
                          LSTMClassifier(**SMALL, bidirectional=True)],
                         expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
