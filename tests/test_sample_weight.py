"""Sample weights and class weights: the weighted loss of every backend, and the estimators'
``sample_weight`` and ``class_weight`` (scikit-learn's conventions, metadata routing included).

The backends' weighted losses and gradients are compared with the oracle in
tests/test_backend_parity.py (and, for the CUDA kernels, tests/test_cuda_emulated.py); here:
the oracle's own definition and gradient, and what weights of ones and of zero do.
"""

import numpy as np
import pytest
import sklearn
from sklearn.exceptions import UnsetMetadataPassedError
from sklearn.metrics import accuracy_score, balanced_accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.class_weight import compute_class_weight

from fastlstm import LSTMClassifier, LSTMRegressor, load, reference
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


@pytest.mark.parametrize("loss", reference.LOSSES)
def test_integer_weights_equal_repeated_samples_in_float64(loss):
    # What sklearn means by a sample weight: a weight of k is k copies of the sample (in the
    # full-batch loss and gradient; minibatches and float32 rounding make fits differ).
    backend = get_backend("cpu")
    spec, params, x, y, _, _ = make_problem((7, 4, 2, 5, 2, 3), loss)
    counts = np.array([0, 1, 3, 2, 0, 1, 4])
    weighted = run_step(backend, spec, params, x, y, loss, counts.astype(float))
    repeated = run_step(backend, spec, params, x.repeat(counts, axis=0),
                        y.repeat(counts, axis=0), loss, None)
    assert weighted[0] == pytest.approx(repeated[0], rel=1e-12)
    assert rel_err(weighted[1], repeated[1]) < 1e-12


def run_step(backend, spec, params, x, y, loss, weights):
    """The loss and the parameters' gradient of one batch."""
    outputs, cache = backend.forward(spec, params, x, train=True)
    value, doutputs = backend.loss(outputs, y, loss, weights)
    return value, backend.backward(spec, params, cache, doutputs).params


# ------------------------------------------------------------------------------ estimators

TINY = dict(hidden_size=4, batch_size=16, learning_rate_init=0.05, max_iter=3, random_state=0,
            device="cpu")


def sequences(n=48, seed=0):
    """Sequences whose class (0, 1, 2) is set by the sum of their first input."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5, 2)).astype(np.float32)
    return X, np.digitize(X[:, :, 0].sum(axis=1), [-1.0, 1.0])


def fitted_state(est):
    return [est._params, est._adam.m, est._adam.v, np.array(est.loss_curve_)]


def assert_bit_identical(a, b):
    for x, y in zip(fitted_state(a), fitted_state(b)):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("early_stopping", [False, True], ids=["all", "early-stopping"])
@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_weights_of_one_fit_bit_identical_weights_to_no_weights(Estimator, early_stopping):
    X, y = sequences()
    params = dict(TINY, alpha=0.01, early_stopping=early_stopping)
    plain = Estimator(**params).fit(X, y)
    ones = Estimator(**params).fit(X, y, sample_weight=np.ones(len(X)))
    assert_bit_identical(plain, ones)
    assert plain.validation_scores_ == ones.validation_scores_
    plain.partial_fit(X, y)
    ones.partial_fit(X, y, sample_weight=np.ones(len(X)))
    assert_bit_identical(plain, ones)


def test_zero_weight_samples_do_not_move_the_weights():
    # Exactly: what a sample of weight zero holds never reaches the weights (its loss and
    # gradient are multiplied by 0), whatever the batches; so two fits that differ only there
    # are bit-identical, shuffling and minibatches included (the same permutation).
    X, y = sequences()
    weights = np.where(np.arange(48) % 4 == 0, 0.0, 1.0)
    other_X, other_y = X.copy(), y.copy()
    other_X[weights == 0] = np.random.default_rng(5).standard_normal((12, 5, 2))
    other_y[weights == 0] = (y[weights == 0] + 1) % 3
    a = LSTMClassifier(**TINY).fit(X, y, sample_weight=weights)
    b = LSTMClassifier(**TINY).fit(other_X, other_y, sample_weight=weights)
    assert_bit_identical(a, b)
    # and, in one full batch, fitting without them: the same up to the rounding of sums
    # over another number of rows
    full = dict(TINY, batch_size=64, shuffle=False)
    kept = LSTMClassifier(**full).fit(X[weights > 0], y[weights > 0])
    np.testing.assert_allclose(LSTMClassifier(**full).fit(X, y, sample_weight=weights)._params,
                               kept._params, rtol=0, atol=1e-6)
    assert np.array_equal(kept.classes_, [0, 1, 2])


def imbalanced(n, seed):
    """A 9:1 task: the rare class's first input is shifted up, a little."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(int)
    X = rng.standard_normal((n, 6, 2)).astype(np.float32)
    X[:, :, 0] += 0.8 * y[:, None]
    return X, y


def test_balanced_class_weight_raises_the_balanced_accuracy_of_an_imbalanced_task():
    X, y = imbalanced(300, seed=0)
    X_test, y_test = imbalanced(1000, seed=1)
    params = dict(hidden_size=8, batch_size=32, max_iter=5, learning_rate_init=0.01,
                  random_state=0, device="cpu")
    scores = {cw: balanced_accuracy_score(
        y_test, LSTMClassifier(**params, class_weight=cw).fit(X, y).predict(X_test))
        for cw in (None, "balanced")}
    # unweighted, the rare class is hardly ever predicted
    assert scores[None] < 0.6 and scores["balanced"] > 0.75, scores


def test_class_weight_multiplies_the_sample_weights():
    X, y = sequences()
    sw = np.random.default_rng(2).random(48)
    per_class = {0: 2.0, 1: 0.5}  # class 2 is left out: it weighs 1
    by_class = LSTMClassifier(**TINY, class_weight=per_class).fit(X, y, sample_weight=sw)
    by_sample = LSTMClassifier(**TINY).fit(X, y, sample_weight=sw * np.array([2.0, 0.5, 1])[y])
    assert_bit_identical(by_class, by_sample)
    balanced = LSTMClassifier(**TINY, class_weight="balanced").fit(X, y)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)[y]
    assert_bit_identical(balanced, LSTMClassifier(**TINY).fit(X, y, sample_weight=expected))


def test_partial_fit_takes_a_class_weight_dict_but_not_balanced():
    X, y = sequences()
    with pytest.raises(ValueError, match="'balanced' is not supported by partial_fit.*"
                                         "compute_class_weight"):
        LSTMClassifier(**TINY, class_weight="balanced").partial_fit(X, y, classes=[0, 1, 2])
    stepped = LSTMClassifier(**TINY, class_weight={1: 3.0}).partial_fit(X, y, classes=[0, 1, 2])
    weighted = LSTMClassifier(**TINY).partial_fit(X, y, classes=[0, 1, 2],
                                                  sample_weight=np.where(y == 1, 3.0, 1.0))
    assert_bit_identical(stepped, weighted)


def test_weights_follow_the_shuffles_and_the_validation_split(monkeypatch):
    # Each sample's weight is unique, so every batch shows whether its weights are its own.
    X, y = sequences(60)
    weights = 1 + np.arange(60) / 60
    weight_of = {X[i].tobytes(): weights[i] for i in range(60)}
    backend = get_backend("cpu")
    step, seen = backend.train_step, []

    def recording(spec, params, state, x, yb, loss, config, lengths=None, sample_weight=None,
                  dropout=None):
        value = step(spec, params, state, x, yb, loss, config, lengths, sample_weight, dropout)
        seen.append((x.copy(), sample_weight.copy(), value))
        return value

    scored = []
    validation_score = LSTMClassifier._validation_score

    def scoring(self, outputs, y_val, sample_weight):
        scored.append(sample_weight)
        return validation_score(self, outputs, y_val, sample_weight)

    monkeypatch.setattr(backend, "train_step", recording)
    monkeypatch.setattr(LSTMClassifier, "_validation_score", scoring)
    clf = LSTMClassifier(**dict(TINY, max_iter=2, early_stopping=True, validation_fraction=0.2))
    clf.fit(X, y, sample_weight=weights)
    trained = []
    for xb, wb, _ in seen:
        assert [weight_of[row.tobytes()] for row in xb] == wb.tolist()
        trained += wb.tolist()
    assert len(scored) == 2 and len(scored[0]) == 12  # the held-out samples' weights
    per_epoch = len(trained) // 2
    assert sorted(trained[:per_epoch] + scored[0].tolist()) == weights.tolist()
    # the epoch's loss: the batches' losses weighted by the batches' weights
    batches = seen[:len(seen) // 2]
    want = sum(v * wb.sum() for _, wb, v in batches) / sum(wb.sum() for _, wb, _ in batches)
    assert clf.loss_curve_[0] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("Estimator, metric", [(LSTMClassifier, accuracy_score),
                                               (LSTMRegressor, r2_score)])
def test_score_weighs_the_samples(Estimator, metric):
    X, y = sequences()
    est = Estimator(**TINY).fit(X, y)
    weights = np.random.default_rng(4).random(48)
    assert est.score(X, y, sample_weight=weights) == pytest.approx(
        metric(y, est.predict(X), sample_weight=weights))


@pytest.mark.parametrize("bad, message", [
    (-np.ones(48), "Negative values in data passed to `sample_weight`"),
    (np.ones(47), r"sample_weight.shape == \(47,\), expected \(48,\)"),
    (np.full(48, np.nan), "Input sample_weight contains NaN"),
    (np.zeros(48), "Sample weights must contain at least one non-zero number"),
], ids=["negative", "length", "nan", "all-zero"])
def test_bad_sample_weights_are_refused(bad, message):
    X, y = sequences()
    with pytest.raises(ValueError, match=message):
        LSTMClassifier(**TINY).fit(X, y, sample_weight=bad)


def test_bad_class_weights_are_refused():
    X, y = sequences()
    with pytest.raises(ValueError, match="'class_weight' parameter of LSTMClassifier must be"):
        LSTMClassifier(**TINY, class_weight="even").fit(X, y)
    with pytest.raises(ValueError, match=r"The classes, \[0, 1, 2\], are not in class_weight"):
        LSTMClassifier(**TINY, class_weight={7: 2.0}).fit(X, y)
    with pytest.raises(ValueError, match="every sample has zero weight"):
        LSTMClassifier(**TINY, class_weight={0: 0, 1: 0, 2: 0}).fit(X, y)
    assert "class_weight" not in LSTMRegressor().get_params()


def test_zero_weight_in_a_part_of_the_early_stopping_split_is_refused():
    X, y = sequences()
    weights = np.zeros(48)
    weights[0] = 1.0  # one sample: either the training or the validation part has none
    with pytest.raises(ValueError, match="part of the early_stopping split has zero weight"):
        LSTMClassifier(**TINY, early_stopping=True).fit(X, y, sample_weight=weights)


@pytest.mark.parametrize("class_weight", [{0: 2.0, 2: 0.5}, {"b": 3.0}, "balanced"],
                         ids=["int-labels", "str-labels", "balanced"])
def test_class_weight_round_trips_through_a_model_file(tmp_path, class_weight):
    X, y = sequences()
    labels = np.array(["a", "b", "c"])[y] if "b" in class_weight else y
    clf = LSTMClassifier(**TINY, class_weight=class_weight).fit(X, labels)
    clf.save(tmp_path / "model.npz")
    loaded = load(tmp_path / "model.npz")
    assert loaded.get_params() == clf.get_params()
    if isinstance(class_weight, dict):
        assert [type(k) for k in loaded.class_weight] == [type(k) for k in class_weight]
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_a_class_weight_a_model_file_cannot_hold_is_refused(tmp_path):
    X, y = sequences()
    clf = LSTMClassifier(**TINY, class_weight={0: 2.0}).fit(X, y)
    clf.set_params(class_weight={(0, 1): 2.0})
    with pytest.raises(TypeError, match=r"class_weight has the label \(0, 1\) \(a tuple\), "
                                        "which a model file cannot hold"):
        clf.save(tmp_path / "model.npz")


# ----------------------------------------------------------------- Pipeline and GridSearchCV

@pytest.fixture
def fit_weights(monkeypatch):
    """The sample_weight each fit of an LSTMClassifier receives (None where none)."""
    received = []
    sample_weight = LSTMClassifier._sample_weight

    def recording(self, weights, X, y, incremental):
        received.append(None if weights is None else np.asarray(weights))
        return sample_weight(self, weights, X, y, incremental)

    monkeypatch.setattr(LSTMClassifier, "_sample_weight", recording)
    return received


def test_pipeline_and_grid_search_pass_sample_weight_on(fit_weights):
    X, y = sequences()
    weights = 1 + np.arange(48.0)
    pipe = make_pipeline(FunctionTransformer(), LSTMClassifier(**TINY))
    pipe.fit(X, y, lstmclassifier__sample_weight=weights)
    np.testing.assert_array_equal(fit_weights.pop(), weights)
    search = GridSearchCV(LSTMClassifier(**TINY), {"hidden_size": [2, 4]}, cv=2)
    search.fit(X, y, sample_weight=weights)
    # every fit of the search gets the weights of its own samples
    assert len(fit_weights) == 5
    for got in fit_weights[:4]:
        assert len(got) == 24 and set(got) < set(weights)
    np.testing.assert_array_equal(fit_weights[4], weights)  # the refit on all of X


def test_metadata_routing_routes_sample_weight_to_fit_and_score(fit_weights, monkeypatch):
    X, y = sequences()
    weights = 1 + np.arange(48.0)
    scored = []
    score = LSTMClassifier.score

    def recording_score(self, X, y, sample_weight=None):
        scored.append(sample_weight)
        return score(self, X, y, sample_weight=sample_weight)

    monkeypatch.setattr(LSTMClassifier, "score", recording_score)
    with sklearn.config_context(enable_metadata_routing=True):
        clf = LSTMClassifier(**TINY).set_fit_request(sample_weight=True) \
            .set_score_request(sample_weight=True)
        pipe = make_pipeline(FunctionTransformer(), clf)
        pipe.fit(X, y, sample_weight=weights)
        np.testing.assert_array_equal(fit_weights.pop(), weights)
        GridSearchCV(pipe, {"lstmclassifier__hidden_size": [2, 4]}, cv=2).fit(
            X, y, sample_weight=weights)
        assert len(fit_weights) == 5 and all(w is not None for w in fit_weights)
        assert len(scored) == 4 and all(len(w) == 24 for w in scored)
        # unrequested, a weight is an error, not silently dropped
        with pytest.raises(UnsetMetadataPassedError):
            make_pipeline(LSTMClassifier(**TINY)).fit(X, y, sample_weight=weights)
