"""``bidirectional=True``: the estimators fit, predict, export, load and save the network
``torch.nn.LSTM(bidirectional=True)`` + ``torch.nn.Linear`` describe.

(Its predictions on sequences of different lengths are checked against
:mod:`fastlstm.reference` in ``test_ragged_input.py``, its model files in
``test_persistence.py``.)
"""

import numpy as np
import pytest
from sklearn.base import clone

from fastlstm import LSTMClassifier, LSTMRegressor

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=2, random_state=0,
            device="cpu")
RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 5, 2)).astype(np.float32)
Y = np.arange(40) % 3


def test_state_dict_has_pytorch_names_and_shapes_of_both_directions():
    clf = LSTMClassifier(**TINY, num_layers=2, bidirectional=True).fit(X, Y)
    shapes = {name: value.shape for name, value in clf.state_dict().items()}
    expected = {"head.weight": (3, 8), "head.bias": (3,)}  # the head reads both directions
    for k, inputs in enumerate((2, 8)):  # layer 1 reads both directions of layer 0
        for suffix in ("", "_reverse"):
            expected.update({f"lstm.weight_ih_l{k}{suffix}": (16, inputs),
                             f"lstm.weight_hh_l{k}{suffix}": (16, 4),
                             f"lstm.bias_ih_l{k}{suffix}": (16,),
                             f"lstm.bias_hh_l{k}{suffix}": (16,)})
    assert shapes == expected
    assert clf._spec.bidirectional and clf.get_params()["bidirectional"] is True


@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_fit_predict_score_and_partial_fit(Estimator):
    y = Y if Estimator is LSTMClassifier else Y - 1.0
    est = Estimator(**TINY, bidirectional=True).fit(X, y)
    assert est.predict(X).shape == (40,) and np.isfinite(est.score(X, y))
    extra = {"classes": [0, 1, 2]} if Estimator is LSTMClassifier else {}
    stepped = Estimator(**TINY, bidirectional=True).partial_fit(X, y, **extra)
    stepped.partial_fit(X, y)
    for name, value in est.state_dict().items():
        np.testing.assert_array_equal(stepped.state_dict()[name], value, err_msg=name)


def test_the_reverse_direction_reads_the_first_step_last():
    # the label is the sign of step 0, followed by 11 steps of noise: the reverse
    # direction ends on it, the forward one must carry it through all the noise
    rng = np.random.default_rng(1)
    X_long = rng.standard_normal((300, 12, 1)).astype(np.float32)
    y = (X_long[:, 0, 0] > 0).astype(int)
    params = {**TINY, "hidden_size": 4, "batch_size": 50, "max_iter": 10}
    both = LSTMClassifier(**params, bidirectional=True).fit(X_long[:200], y[:200])
    forward_only = LSTMClassifier(**params).fit(X_long[:200], y[:200])
    assert both.score(X_long[200:], y[200:]) > 0.9 > forward_only.score(X_long[200:], y[200:])


def test_load_state_dict_round_trips_and_refuses_the_other_direction_count():
    bi = LSTMClassifier(**TINY, bidirectional=True).fit(X, Y)
    loaded = LSTMClassifier(hidden_size=4, bidirectional=True).load_state_dict(bi.state_dict())
    np.testing.assert_array_equal(loaded.predict_proba(X), bi.predict_proba(X))
    with pytest.raises(ValueError, match="state_dict has hidden size 4 and 1 bidirectional "
                                         "layer\\(s\\), but this estimator has hidden_size=4, "
                                         "num_layers=1, bidirectional=False; set them with "
                                         "set_params first"):
        LSTMClassifier(hidden_size=4).load_state_dict(bi.state_dict())
    uni = LSTMClassifier(**TINY).fit(X, Y)
    with pytest.raises(ValueError, match="1 unidirectional layer\\(s\\).*bidirectional=True"):
        LSTMClassifier(hidden_size=4, bidirectional=True).load_state_dict(uni.state_dict())


def test_warm_start_refuses_a_change_of_direction():
    clf = LSTMClassifier(**TINY, warm_start=True).fit(X, Y)
    clf.set_params(bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional changed; set warm_start=False"):
        clf.fit(X, Y)
    assert clf.set_params(warm_start=False).fit(X, Y)._spec.bidirectional


def test_the_parameter_is_validated_and_cloned():
    with pytest.raises(ValueError, match="'bidirectional' parameter of LSTMRegressor must be"):
        LSTMRegressor(bidirectional="yes").fit(X, Y)
    assert clone(LSTMClassifier(bidirectional=True)).bidirectional is True
