"""Sequences of different lengths through the estimators: every input form, the same model.

A list of 2-D arrays, the same as a NaN-padded 3-D array (tslearn's convention) and
:func:`fastlstm.pad_sequences` of the list give identical fits and predictions; the
lengths reach every ``train_step`` and ``forward`` with their rows, and the padding
never reaches the backend; a task decided by each sample's last valid step is
learnt from ragged input and not from the same data read as fixed-length input.
"""

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split

from fastlstm import LSTMClassifier, LSTMRegressor, pad_sequences, reference
from fastlstm.backends import get_backend
from fastlstm.estimators import PREDICT_BATCH_SIZE

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=2, random_state=0,
            device="cpu")
STEPS, INPUTS = 6, 2


def ragged_data(n=40, seed=0, steps=STEPS):
    """Sequences of 1 to ``steps`` steps, the longest ``steps``; class 0/1/2 from the sum of
    the first input over each one's valid steps; the full-length arrays they are cut from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, n)
    lengths[0] = steps
    full = rng.standard_normal((n, steps, INPUTS)).astype(np.float32)
    seqs = [x[:k] for x, k in zip(full, lengths)]
    y = np.digitize([s[:, 0].sum() for s in seqs], [-0.7, 0.7])
    return seqs, y, lengths, full


def targets(Estimator, y):
    return y if Estimator is LSTMClassifier else y.astype(float) - 1


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


def input_forms(seqs):
    """The same sequences in every accepted form of different lengths."""
    objects = np.empty(len(seqs), dtype=object)
    objects[:] = seqs
    return {
        "list": seqs,
        "tuple": tuple(seqs),
        "list-of-lists": [s.tolist() for s in seqs],
        "object-array": objects,
        "nan-padded": pad_sequences(seqs),
        "nan-padded-float64-longer": pad_sequences(seqs, dtype=np.float64, n_steps=STEPS + 3),
    }


@pytest.fixture
def record(monkeypatch):
    """Record the arguments of every train_step and forward of the CPU backend."""
    backend = get_backend("cpu")
    calls = {"train_step": [], "forward": []}
    for name in calls:
        original = getattr(backend, name)

        def recording(spec, params, *args, _name=name, _original=original, **kwargs):
            x = args[1] if _name == "train_step" else args[0]  # after the state
            calls[_name].append((np.array(x), kwargs.get("lengths")))
            return _original(spec, params, *args, **kwargs)

        monkeypatch.setattr(backend, name, recording)
    return calls


# ------------------------------------------------------------------ input forms
@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_every_input_form_fits_and_predicts_identically(Estimator):
    seqs, y, _, _ = ragged_data()
    y = targets(Estimator, y)
    expected = Estimator(**TINY).fit(seqs, y)
    outputs = {"predict": expected.predict(seqs), "score": expected.score(seqs, y)}
    if Estimator is LSTMClassifier:
        outputs["predict_proba"] = expected.predict_proba(seqs)
        outputs["predict_log_proba"] = expected.predict_log_proba(seqs)
    for form, X in input_forms(seqs).items():
        model = Estimator(**TINY).fit(X, y)
        assert_same_weights(model, expected)
        for method, value in outputs.items():
            args = (X, y) if method == "score" else (X,)
            np.testing.assert_array_equal(getattr(expected, method)(*args), value,
                                          err_msg=f"{form} {method}")


@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_partial_fit_on_every_input_form_equals_fit(Estimator):
    seqs, y, _, _ = ragged_data()
    y = targets(Estimator, y)
    fitted = Estimator(**TINY).fit(seqs, y)
    classes = {"classes": [0, 1, 2]} if Estimator is LSTMClassifier else {}
    for form, X in input_forms(seqs).items():
        stepped = Estimator(**TINY).partial_fit(X, y, **classes)
        for _ in range(TINY["max_iter"] - 1):
            stepped.partial_fit(X, y)
        assert stepped.loss_curve_ == fitted.loss_curve_, form
        assert_same_weights(stepped, fitted)


def test_regressor_with_several_targets_on_ragged_input():
    seqs, _, _, _ = ragged_data()
    y = np.array([[s[-1, 0], s[:, 1].mean()] for s in seqs])
    reg = LSTMRegressor(**TINY).fit(seqs, y)
    assert reg.n_outputs_ == 2 and reg.predict(seqs).shape == (40, 2)
    np.testing.assert_array_equal(reg.predict(pad_sequences(seqs)), reg.predict(seqs))


def test_a_model_fitted_on_ragged_input_reads_fixed_length_input_and_back():
    seqs, y, _, full = ragged_data()
    clf = LSTMClassifier(**TINY).fit(seqs, y)
    assert clf.input_size_ == INPUTS and not hasattr(clf, "n_features_in_")
    fixed = LSTMClassifier(**TINY).fit(full, y)
    assert clf.predict_proba(full).shape == fixed.predict_proba(seqs).shape == (40, 3)
    # sequences of full length are the plain array, whatever form they come in
    np.testing.assert_array_equal(clf.predict_proba(list(full)), clf.predict_proba(full))


def test_equal_lengths_in_a_ragged_form_are_bit_identical_to_the_plain_array(record):
    _, y, _, full = ragged_data()
    expected = LSTMClassifier(**TINY).fit(full, y)
    assert all(lengths is None for _, lengths in record["train_step"])
    objects = np.empty(len(full), dtype=object)
    objects[:] = list(full)
    # every sample ends in two all-NaN steps: trimmed, all have every step left
    for X in (objects, pad_sequences(list(full), n_steps=STEPS + 2)):
        record["train_step"].clear()
        model = LSTMClassifier(**TINY).fit(X, y)
        assert all(lengths is None for _, lengths in record["train_step"])
        assert_same_weights(model, expected)
        np.testing.assert_array_equal(model.predict_proba(X), expected.predict_proba(full))


def test_pad_sequences_pads_with_nan_at_the_end():
    seqs = [np.arange(6).reshape(3, 2), np.arange(2).reshape(1, 2)]
    X = pad_sequences(seqs)
    assert X.shape == (2, 3, 2) and X.dtype == np.float32
    np.testing.assert_array_equal(X[0], seqs[0])
    np.testing.assert_array_equal(X[1, :1], seqs[1])
    assert np.isnan(X[1, 1:]).all()
    longer = pad_sequences(seqs, dtype=np.float64, n_steps=5)
    assert longer.shape == (2, 5, 2) and longer.dtype == np.float64
    assert np.isnan(longer[0, 3:]).all()
    np.testing.assert_array_equal(pad_sequences(list(X)), X)  # padded input pads as is


#: (id, call, message fragment)
PAD_SEQUENCES_CASES = [
    ("integer-dtype", lambda: pad_sequences([np.zeros((2, 1))], dtype=np.int64),
     "dtype must be a floating dtype, which can hold the NaN padding; got int64"),
    ("n-steps-too-short", lambda: pad_sequences([np.zeros((4, 1))], n_steps=3),
     "n_steps=3 is not an integer at least the length of the longest sequence \\(4 steps\\)"),
    ("n-steps-not-an-integer", lambda: pad_sequences([np.zeros((4, 1))], n_steps=4.5),
     "n_steps=4.5 is not an integer"),
    ("1-D-sequence", lambda: pad_sequences([np.zeros(4)]),
     "sample 0 of sequences has shape \\(4,\\).*must be 2-D"),
    ("empty-sequence", lambda: pad_sequences([np.zeros((4, 1)), np.zeros((0, 1))]),
     "sample 1 of sequences has no time steps"),
    ("other-inputs", lambda: pad_sequences([np.zeros((4, 1)), np.zeros((2, 3))]),
     "sample 1 of sequences has 3 inputs per step, but sample 0 has 1"),
    ("no-sequences", lambda: pad_sequences([]), "Found sequences with 0 sample\\(s\\)"),
]


@pytest.mark.parametrize("call, fragment", [case[1:] for case in PAD_SEQUENCES_CASES],
                         ids=[case[0] for case in PAD_SEQUENCES_CASES])
def test_pad_sequences_refuses_what_the_estimators_refuse(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# ---------------------------------------------------------- lengths and padding
def test_each_minibatch_gets_its_rows_lengths_and_no_padding(record):
    seqs, y, lengths, _ = ragged_data(n=50)
    for i, s in enumerate(seqs):
        s[0, 0] = i  # names the sample in the batches the backend gets
    LSTMClassifier(**{**TINY, "batch_size": 16}).fit(pad_sequences(seqs), y)
    assert [len(x) for x, _ in record["train_step"]] == [16, 16, 16, 2] * TINY["max_iter"]
    seen = []
    for x, batch_lengths in record["train_step"]:
        assert isinstance(batch_lengths, np.ndarray) and batch_lengths.dtype.kind == "i"
        rows = x[:, 0, 0].astype(int)
        seen.append(rows)
        np.testing.assert_array_equal(batch_lengths, lengths[rows])
        assert x.dtype == np.float32 and np.isfinite(x).all()
        for row, sample in zip(x, rows):
            np.testing.assert_array_equal(row[:lengths[sample]], seqs[sample])
            assert not row[lengths[sample]:].any()
    epochs = np.concatenate(seen).reshape(TINY["max_iter"], -1)
    assert all(sorted(epoch) == list(range(50)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])  # shuffled: the lengths went along


def test_early_stopping_splits_the_lengths_with_the_samples(record):
    seqs, y, lengths, _ = ragged_data(n=60)
    for i, s in enumerate(seqs):
        s[0, 0] = i
    params = {**TINY, "early_stopping": True, "validation_fraction": 0.25, "max_iter": 3}
    clf = LSTMClassifier(**params).fit(seqs, y)
    assert len(clf.validation_scores_) == 3
    validation = [(x, n) for x, n in record["forward"] if len(x) == 15]
    assert len(validation) == 3
    for x, batch_lengths in validation + record["train_step"]:
        np.testing.assert_array_equal(batch_lengths, lengths[x[:, 0, 0].astype(int)])
    assert_same_weights(clf, LSTMClassifier(**params).fit(pad_sequences(seqs), y))


def test_predict_converts_lists_and_padded_arrays_one_batch_at_a_time(record):
    seqs, y, _, _ = ragged_data(n=40)
    clf = LSTMClassifier(**TINY).fit(seqs, y)
    many = [s[:1] if i >= PREDICT_BATCH_SIZE else s
            for i, s in enumerate(seqs * (2 * PREDICT_BATCH_SIZE // 40 + 1))]
    for X in (many, pad_sequences(many)):
        record["forward"].clear()
        proba = clf.predict_proba(X)
        # each batch is as long as its longest sample: the second one's samples have 1 step
        assert [x.shape for x, _ in record["forward"]] == [
            (PREDICT_BATCH_SIZE, STEPS, INPUTS), (PREDICT_BATCH_SIZE, 1, INPUTS),
            (len(many) - 2 * PREDICT_BATCH_SIZE, 1, INPUTS)]
        assert record["forward"][1][1] is None  # all of one length: the fixed-length path
        np.testing.assert_array_equal(proba[:40], clf.predict_proba(seqs))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_predictions_are_the_networks_on_each_samples_valid_steps(bidirectional):
    seqs, y, lengths, _ = ragged_data(n=40)
    clf = LSTMClassifier(**TINY, num_layers=2, bidirectional=bidirectional).fit(seqs, y)
    padded = np.nan_to_num(pad_sequences(seqs, dtype=np.float64))
    weights = {name: value.astype(np.float64) for name, value in clf.state_dict().items()}
    outputs, _ = reference.forward(weights, padded, lengths=lengths)
    np.testing.assert_allclose(clf.predict_proba(seqs), reference.softmax(outputs),
                               rtol=1e-5, atol=1e-6)


def last_step_task(n, seed, steps=8):
    """Label: the sign of the first input at each sample's last valid step.  The full
    arrays past that step hold values of the same distribution, which decide nothing."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, steps + 1, n)
    full = rng.standard_normal((n, steps, 2)).astype(np.float32)
    y = (full[np.arange(n), lengths - 1, 0] > 0).astype(int)
    return [x[:k] for x, k in zip(full, lengths)], full, y


def test_a_task_decided_by_the_last_valid_step_is_learnt_only_without_the_padding():
    seqs, full, y = last_step_task(300, seed=0)
    test_seqs, test_full, test_y = last_step_task(300, seed=1)
    params = {**TINY, "hidden_size": 8, "batch_size": 50, "max_iter": 30}
    clf = LSTMClassifier(**params).fit(pad_sequences(seqs), y)
    assert clf.score(test_seqs, test_y) > 0.9
    # read past their lengths (the padding leaking), the same samples decide nothing
    leaky = LSTMClassifier(**params).fit(full, y)
    assert leaky.score(test_full, test_y) < 0.7
    # alone, a sample has no padding at all: in a batch, its padding changes nothing
    alone = np.concatenate([clf.predict_proba([s]) for s in test_seqs[:40]])
    np.testing.assert_allclose(clf.predict_proba(test_seqs[:40]), alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- scikit-learn's tools
def test_grid_search_cross_val_score_and_train_test_split_take_nan_padded_arrays():
    seqs, y, _, _ = ragged_data(n=48)
    X = pad_sequences(seqs)
    search = GridSearchCV(LSTMClassifier(**TINY), {"hidden_size": [2, 4]}, cv=2).fit(X, y)
    assert search.best_params_["hidden_size"] in (2, 4)
    np.testing.assert_array_equal(search.predict(X), search.best_estimator_.predict(seqs))
    scores = cross_val_score(LSTMRegressor(**TINY), X, y.astype(float), cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
    clf = LSTMClassifier(**TINY).fit(X_train, y_train)
    assert 0 <= clf.score(X_test, y_test) <= 1
