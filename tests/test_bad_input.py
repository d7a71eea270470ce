"""Bad input gets a ValueError/TypeError naming the problem and the fix, never a kernel crash.

One table of cases for ``fit`` (and ``partial_fit``), one for ``predict`` on a
fitted model; each expects an exception type and a fragment of its message
(what is wrong and what to do; for sequences of different lengths, which
sample).  Then: every dtype and memory layout of ``X`` gives the same fitted
weights and predictions as a C-contiguous float32 copy.
"""

import re

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from fastlstm import LSTMClassifier, LSTMRegressor

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=2, random_state=0,
            device="cpu")
RNG = np.random.default_rng(0)
X = RNG.standard_normal((24, 5, 2)).astype(np.float32)
Y = np.arange(24) % 3


def with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def ragged(X, lengths):
    """The samples of ``X`` cut to ``lengths``, as a list."""
    return [x[:n] for x, n in zip(X, lengths)]


#: X as sequences of 5, 4, ..., 1, 5, 4, ... steps, padded with NaN
PADDED = X.copy()
for _i, _n in enumerate(5 - np.arange(24) % 5):
    PADDED[_i, _n:] = np.nan


#: (id, estimator factory, fitting call, exception, message fragment)
FIT_CASES = [
    ("nan-in-X", LSTMClassifier, lambda e: e.fit(with_value(X, (0, 0, 0), np.nan), Y),
     ValueError, "Input X contains NaN in sample 0 at step 0 in some of its inputs only; NaN "
                 "marks padding only as whole time steps.*Impute the missing values"),
    ("nan-in-a-padding-step", LSTMClassifier,
     lambda e: e.fit(with_value(PADDED, (1, 4, 0), 1.0), Y),
     ValueError, "NaN in sample 1 at step 4 in some of its inputs only"),
    ("nan-step-before-a-valid-step", LSTMClassifier,
     lambda e: e.fit(with_value(X, (2, 1), np.nan), Y),
     ValueError, "NaN in sample 2: step 1 is all NaN but a later step is not.*Pad at the end "
                 "only"),
    ("nan-padding-at-the-start", LSTMRegressor,
     lambda e: e.fit(PADDED[:, ::-1], Y),
     ValueError, "NaN in sample 1: step 0 is all NaN but a later step is not"),
    ("all-nan-sample", LSTMClassifier, lambda e: e.fit(with_value(PADDED, 7, np.nan), Y),
     ValueError, "NaN in every step of sample 7: it has no valid time step; drop it"),
    ("nan-in-2-D-X", LSTMClassifier,
     lambda e: e.fit(with_value(X.reshape(24, 10), (0, 9), np.nan), Y),
     ValueError, "Input X contains NaN.*SimpleImputer.*list of 2-D arrays.*all NaN"),
    ("inf-in-padded-X", LSTMClassifier, lambda e: e.fit(with_value(PADDED, (5, 0, 1), np.inf), Y),
     ValueError, "infinity or a value too large for dtype\\('float32'\\) in sample 5.*drop or "
                 "impute"),
    ("inf-in-a-list", LSTMRegressor,
     lambda e: e.fit(ragged(with_value(X, (6, 0, 0), -np.inf), [5, 3] * 12), Y),
     ValueError, "infinity or a value too large for dtype\\('float32'\\) in sample 6"),
    ("nan-inside-a-list-sample", LSTMClassifier,
     lambda e: e.fit(ragged(with_value(X, (3, 1, 1), np.nan), [5, 3] * 12), Y),
     ValueError, "NaN in sample 3 at step 1 in some of its inputs only"),
    ("empty-sequence-in-a-list", LSTMClassifier,
     lambda e: e.fit(ragged(X, [5, 0] + [3] * 22), Y),
     ValueError, "sample 1 of X has no time steps \\(shape \\(0, 2\\)\\).*drop the empty ones"),
    ("other-inputs-in-a-list", LSTMClassifier,
     lambda e: e.fit([X[0], X[1, :3], X[2, :4, :1]] + list(X[3:]), Y),
     ValueError, "sample 2 of X has 1 inputs per step, but sample 0 has 2; every step"),
    ("no-inputs-in-a-list", LSTMClassifier, lambda e: e.fit([X[0], X[1, :3, :0]], Y[:2]),
     ValueError, "sample 1 of X has no inputs per step"),
    ("list-of-1-D-sequences", LSTMClassifier,
     lambda e: e.fit([X[0, :, 0], X[1, :3, 0]], Y[:2]),
     ValueError, "sample 0 of X has shape \\(5,\\), but each sample of a list of sequences must "
                 "be 2-D \\(n_steps, n_inputs\\); reshape.*\\(-1, 1\\)"),
    ("ragged-steps-in-a-list-sample", LSTMClassifier,
     lambda e: e.fit([[[1.0, 2.0], [3.0]], [[1.0, 2.0]]], [0, 1]),
     ValueError, "sample 0 of X is ragged: its time steps have different numbers of inputs"),
    ("strings-in-a-list", LSTMClassifier, lambda e: e.fit([X[0], X[1, :2].astype(str)], [0, 1]),
     ValueError, "sample 1: X has dtype <U.*\\(strings\\); pass numbers"),
    ("objects-not-numbers-in-a-list", LSTMClassifier,
     lambda e: e.fit([X[0], with_value(X[1, :2].astype(object), (0, 0), "a")], [0, 1]),
     ValueError, "could not convert string to float.*sample 1 of X holds values that are not "
                 "numbers"),
    ("input-size-not-matching-a-list", lambda **k: LSTMClassifier(input_size=3, **k),
     lambda e: e.fit(ragged(X, [5, 3] * 12), Y),
     ValueError, "2 inputs per step but input_size=3"),
    ("list-longer-than-y", LSTMClassifier, lambda e: e.fit(ragged(X, [5, 3] * 12), Y[:-1]),
     ValueError, "X has 24 samples but y has 23"),
    ("inf-in-X", LSTMClassifier, lambda e: e.fit(with_value(X, (3, 1, 1), -np.inf), Y),
     ValueError, "infinity.*drop or impute those samples"),
    ("beyond-float32-X", LSTMRegressor,
     lambda e: e.fit(with_value(X.astype(np.float64), (0, 0, 0), 1e39), Y),
     ValueError, "too large for dtype\\('float32'\\).*scale X"),
    ("nan-in-y", LSTMRegressor, lambda e: e.fit(X, with_value(Y.astype(float), 2, np.nan)),
     ValueError, "Input y contains NaN. Drop or impute those samples"),
    ("inf-in-y", LSTMRegressor, lambda e: e.fit(X, with_value(Y.astype(float), 2, np.inf)),
     ValueError, "Input y contains infinity.*Drop or impute"),
    ("nan-label", LSTMClassifier, lambda e: e.fit(X, with_value(Y.astype(float), 2, np.nan)),
     ValueError, "Input y contains NaN"),
    ("1-D-X", LSTMClassifier, lambda e: e.fit(X[:, 0, 0], Y),
     ValueError, "got 1D array.*Reshape your data.*X.reshape\\(-1, 1\\)"),
    ("4-D-X", LSTMClassifier, lambda e: e.fit(X[..., None], Y),
     ValueError, "X has 4 dimensions.*reshape it"),
    ("empty-X", LSTMClassifier, lambda e: e.fit(X[:0], Y[:0]),
     ValueError, "0 sample\\(s\\).*pass at least one sample"),
    ("zero-length-sequences", LSTMClassifier, lambda e: e.fit(X[:, :0], Y),
     ValueError, "no time steps.*at least one step"),
    ("zero-inputs-per-step", LSTMClassifier, lambda e: e.fit(X[:, :, :0], Y),
     ValueError, "no inputs per step.*at least one input"),
    ("zero-columns", LSTMClassifier, lambda e: e.fit(np.zeros((24, 0)), Y),
     ValueError, "0 feature\\(s\\).*at least one value"),
    ("ragged-rows", LSTMClassifier, lambda e: e.fit([[1.0, 2.0], [1.0, 2.0, 3.0]], [0, 1]),
     ValueError, "sample 0 of X has shape \\(2,\\).*must be 2-D"),
    ("object-X-not-numbers", LSTMClassifier,
     lambda e: e.fit(with_value(X.astype(object), (0, 0, 0), "a"), Y),
     ValueError, "could not convert string to float.*pass a numeric array"),
    ("object-X-holding-a-dict", LSTMClassifier,
     lambda e: e.fit(with_value(X.astype(object), (0, 0, 0), {"a": 1}), Y),
     TypeError, "not 'dict'.*pass a numeric array"),
    ("complex-X", LSTMClassifier, lambda e: e.fit(X.astype(np.complex64), Y),
     ValueError, "Complex data not supported: X must be real; pass X.real"),
    ("complex-y", LSTMRegressor, lambda e: e.fit(X, Y.astype(complex)),
     ValueError, "Complex data not supported: y must be real"),
    ("string-X", LSTMClassifier, lambda e: e.fit(X.astype(str), Y),
     ValueError, "dtype <U.*\\(strings\\); pass numbers"),
    ("datetime-X", LSTMClassifier, lambda e: e.fit(np.zeros((24, 5), "datetime64[s]"), Y),
     TypeError, "not numeric; pass a numeric array"),
    ("sparse-X", LSTMClassifier,
     lambda e: e.fit(__import__("scipy.sparse").sparse.csr_matrix(X[:, :, 0]), Y),
     TypeError, "sparse input is not supported.*X.toarray\\(\\)"),
    ("X-longer-than-y", LSTMClassifier, lambda e: e.fit(X, Y[:-1]),
     ValueError, "X has 24 samples but y has 23; pass one target per sample"),
    ("y-longer-than-X", LSTMRegressor, lambda e: e.fit(X[:20], Y),
     ValueError, "X has 20 samples but y has 24"),
    ("single-class", LSTMClassifier, lambda e: e.fit(X, np.zeros(24)),
     ValueError, "got 1 class.*at least two distinct labels"),
    ("continuous-labels", LSTMClassifier, lambda e: e.fit(X, np.linspace(0, 1, 24)),
     ValueError, "Unknown label type: continuous"),
    ("partial-fit-without-classes", LSTMClassifier, lambda e: e.partial_fit(X, Y),
     ValueError, "classes must be passed on the first call.*classes=np.unique\\(y\\)"),
    ("partial-fit-label-outside-classes", LSTMClassifier,
     lambda e: e.partial_fit(X, Y, classes=[0, 1]),
     ValueError, "labels \\[2\\] that are not in classes_=\\[0, 1\\]; pass every label"),
    ("input-size-not-dividing-width", lambda **k: LSTMClassifier(input_size=3, **k),
     lambda e: e.fit(X.reshape(24, 10), Y),
     ValueError, "10 columns.*not a multiple of input_size=3; set input_size to a divisor"),
    ("input-size-not-matching-3-D-X", lambda **k: LSTMClassifier(input_size=3, **k),
     lambda e: e.fit(X, Y), ValueError, "2 inputs per step but input_size=3; set input_size"),
    ("negative-hidden-size", lambda **k: LSTMClassifier(**{**k, "hidden_size": -1}),
     lambda e: e.fit(X, Y), ValueError, "'hidden_size' parameter of LSTMClassifier must be"),
    ("zero-layers", lambda **k: LSTMRegressor(num_layers=0, **k),
     lambda e: e.fit(X, Y), ValueError, "'num_layers' parameter of LSTMRegressor must be"),
    ("negative-input-size", lambda **k: LSTMClassifier(input_size=-2, **k),
     lambda e: e.fit(X, Y), ValueError, "'input_size' parameter .* range \\[1, inf\\) or None"),
    ("zero-batch", lambda **k: LSTMClassifier(**{**k, "batch_size": 0}),
     lambda e: e.fit(X, Y), ValueError, "'batch_size' parameter of LSTMClassifier must be"),
    ("negative-learning-rate", lambda **k: LSTMClassifier(**{**k, "learning_rate_init": -1.0}),
     lambda e: e.fit(X, Y), ValueError, "'learning_rate_init' parameter"),
    ("unknown-device", lambda **k: LSTMRegressor(**{**k, "device": "tpu"}),
     lambda e: e.fit(X, Y), ValueError, "'device' parameter of LSTMRegressor must be a str "
                                        "among.*Got 'tpu'"),
    ("partial-fit-bad-hyper-parameter", lambda **k: LSTMRegressor(**{**k, "batch_size": 0}),
     lambda e: e.partial_fit(X, Y), ValueError, "'batch_size' parameter"),
]


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("make, call, error, fragment",
                         [case[1:] for case in FIT_CASES], ids=[case[0] for case in FIT_CASES])
def test_bad_fit_input_is_refused_with_the_fix(make, call, error, fragment):
    with pytest.raises(error, match=re.compile(fragment, re.S)):
        call(make(**TINY))


@pytest.fixture(scope="module")
def fitted():
    """A classifier fitted on 3-D X and one fitted on 2-D rows of 5 steps of 2 inputs."""
    return (LSTMClassifier(**TINY).fit(X, Y),
            LSTMClassifier(input_size=2, **TINY).fit(X.reshape(24, 10), Y))


#: (id, which fitted model (0: 3-D, 1: 2-D), method, X, exception, message fragment)
PREDICT_CASES = [
    ("other-inputs-per-step", 0, "predict", X[:, :, :1],
     ValueError, "1 inputs per step, but LSTMClassifier was fitted with 2; reshape X"),
    ("other-number-of-columns", 1, "predict", X.reshape(24, 10)[:, :8],
     ValueError, "X has 8 features, but LSTMClassifier is expecting 10 features"),
    ("nan-in-X", 0, "predict_proba", with_value(X, (5, 4, 1), np.nan),
     ValueError, "Input X contains NaN in sample 5 at step 4 in some of its inputs only"),
    ("nan-step-in-a-later-batch", 0, "predict",
     with_value(np.repeat(PADDED, 100, axis=0), (2001, 0), np.nan),
     ValueError, "NaN in sample 2001: step 0 is all NaN but a later step is not"),
    ("inf-in-a-later-batch-of-a-list", 0, "predict_proba",
     ragged(with_value(np.repeat(X, 100, axis=0), (2000, 1, 0), np.inf), [5, 2, 3] * 800),
     ValueError, "infinity.*in sample 2000.*drop or impute"),
    ("other-inputs-per-step-in-a-list", 0, "predict", ragged(X[:, :, :1], [5, 3] * 12),
     ValueError, "1 inputs per step, but LSTMClassifier was fitted with 2; reshape X"),
    ("empty-sequence-in-a-list", 0, "predict", [X[0], X[1, :0]],
     ValueError, "sample 1 of X has no time steps"),
    ("all-nan-sample", 0, "score", with_value(PADDED, 0, np.nan),
     ValueError, "NaN in every step of sample 0"),
    ("inf-in-a-later-batch", 0, "predict", with_value(np.repeat(X, 100, axis=0), (2000, 0, 0),
                                                      np.inf),
     ValueError, "infinity.*drop or impute"),
    ("1-D-X", 0, "predict", X[0, 0], ValueError, "Reshape your data"),
    ("4-D-X", 0, "predict_log_proba", X[..., None], ValueError, "X has 4 dimensions"),
    ("empty-X", 0, "predict", X[:0], ValueError, "0 sample\\(s\\)"),
    ("zero-length-sequences", 0, "predict", X[:, :0], ValueError, "no time steps"),
    ("complex-X", 0, "predict", X.astype(complex), ValueError, "Complex data not supported"),
]


@pytest.mark.parametrize("which, method, X_bad, error, fragment",
                         [case[1:] for case in PREDICT_CASES],
                         ids=[case[0] for case in PREDICT_CASES])
def test_bad_predict_input_is_refused_with_the_fix(fitted, which, method, X_bad, error, fragment):
    args = (X_bad, np.resize(Y, len(X_bad))) if method == "score" else (X_bad,)
    with pytest.raises(error, match=re.compile(fragment, re.S)):
        getattr(fitted[which], method)(*args)


def test_load_state_dict_refuses_non_finite_weights():
    state = LSTMClassifier(**TINY).fit(X, Y).state_dict()
    state["lstm.bias_hh_l0"][3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values .* in \\['lstm.bias_hh_l0'\\]"):
        LSTMClassifier(**TINY).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:overflow encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("method", ["predict", "predict_proba", "predict_log_proba"])
def test_outputs_that_overflow_float32_raise_instead_of_returning_nan(fitted, method):
    state = fitted[0].state_dict()
    state["lstm.bias_ih_l0"][:] = 50.0  # every gate open: the hidden state is all ~1
    state["head.weight"][:] = 3e38  # finite, but the head's sum of 4 of them overflows
    model = LSTMClassifier(**TINY).load_state_dict(state)
    with pytest.raises(FloatingPointError, match="outputs overflowed float32.*retrain, scale X"):
        getattr(model, method)(X)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "predict_log_proba", "score"])
def test_predict_before_fit_raises_not_fitted(method):
    args = (X, Y) if method == "score" else (X,)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(LSTMClassifier(**TINY), method)(*args)


def _layouts_and_dtypes(X_grid):
    """``X_grid`` (exactly representable in every dtype) in every dtype and memory layout."""
    fortran = np.asfortranarray(X_grid)
    wide = np.zeros(X_grid.shape[:2] + (2 * X_grid.shape[2],), np.float32)
    wide[:, :, ::2] = X_grid
    return {
        "float16": X_grid.astype(np.float16),
        "float64": X_grid.astype(np.float64),
        "int64": X_grid.astype(np.int64),
        "uint8": X_grid.astype(np.uint8),
        "bool": X_grid.astype(bool),
        "fortran-ordered": fortran,
        "strided-view": wide[:, :, ::2],
        "transposed-view": np.ascontiguousarray(X_grid.transpose(1, 0, 2)).transpose(1, 0, 2),
        "list": X_grid.tolist(),
        "object": X_grid.astype(object),
    }


@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
@pytest.mark.parametrize("bool_values", [False, True], ids=["small-ints", "zeros-and-ones"])
def test_every_dtype_and_layout_equals_a_c_contiguous_float32_copy(Estimator, bool_values):
    grid = RNG.integers(0, 2 if bool_values else 4, size=(40, 6, 3)).astype(np.float32)
    y = np.arange(40) % 2
    expected = Estimator(**TINY).fit(grid, y)
    expected_outputs = expected.predict(grid)
    for name, X_other in _layouts_and_dtypes(grid).items():
        if name == "bool" and not bool_values:
            continue
        model = Estimator(**TINY).fit(X_other, y)
        for key, value in expected.state_dict().items():
            np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=name)
        np.testing.assert_array_equal(expected.predict(X_other), expected_outputs, err_msg=name)


def test_2d_input_in_other_layouts_predicts_the_same():
    rows = X.reshape(24, 10)
    model = LSTMRegressor(input_size=2, **TINY).fit(rows, Y)
    expected = model.predict(np.ascontiguousarray(rows))
    np.testing.assert_array_equal(model.predict(np.asfortranarray(rows)), expected)
    np.testing.assert_array_equal(model.predict(rows.astype(np.float64)[::-1][::-1]), expected)
    np.testing.assert_array_equal(model.predict(np.repeat(rows, 2, axis=1)[:, ::2]), expected)
