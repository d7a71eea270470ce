"""scikit-learn's own estimator checks on both estimators (and a bidirectional one), with no
expected failures.

Small networks and large learning rates keep each of the ~100 checks fast while
the accuracy checks (blobs > 0.83, regression R² > 0.5) still pass honestly.
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from fastlstm import LSTMClassifier, LSTMRegressor

SMALL = dict(hidden_size=8, batch_size=100, learning_rate_init=0.05, max_iter=60, random_state=0)


@parametrize_with_checks([LSTMClassifier(**SMALL), LSTMRegressor(**SMALL),
                          LSTMClassifier(**SMALL, bidirectional=True)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
