"""LSTMClassifier and LSTMRegressor: API, training loop, state and persistence (tiny problems)."""

import io
import pickle
import re

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from fastlstm import LSTMClassifier, LSTMRegressor, ParamLayout
from fastlstm.backends import BackendUnavailable, available_backends, get_backend

#: small and quick: one or two minibatches per epoch
TINY = dict(hidden_size=4, batch_size=32, learning_rate_init=0.05, max_iter=3, random_state=0,
            device="cpu")


def sequences(n=48, steps=5, inputs=2, seed=0):
    """Sequences whose class (0, 1, 2) is set by the sign and size of the first input's sum."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, steps, inputs)).astype(np.float32)
    total = X[:, :, 0].sum(axis=1)
    y = np.digitize(total, [-1.0, 1.0])
    return X, y


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)


@pytest.fixture
def count_steps(monkeypatch):
    """Record the batch length of every train_step of the CPU backend."""
    backend = get_backend("cpu")
    lengths = []
    original = backend.train_step

    def counting(spec, params, state, x, *args, **kwargs):
        lengths.append(x.shape[0])
        return original(spec, params, state, x, *args, **kwargs)

    monkeypatch.setattr(backend, "train_step", counting)
    return lengths


def test_classifier_learns_and_its_outputs_agree():
    X, y = sequences(n=96)
    clf = LSTMClassifier(**{**TINY, "hidden_size": 8, "batch_size": 96, "max_iter": 60}).fit(X, y)
    assert clf.score(X, y) > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (96, 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    assert clf.n_iter_ == len(clf.loss_curve_) and clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_string_labels_come_back_as_strings():
    X, y = sequences()
    labels = np.array(["cat", "dog", "eel"])[y]
    clf = LSTMClassifier(**TINY).fit(X, labels)
    np.testing.assert_array_equal(clf.classes_, ["cat", "dog", "eel"])
    assert set(clf.predict(X)) <= {"cat", "dog", "eel"}


def test_binary_problem_has_one_head_output_per_class():
    X, y = sequences()
    clf = LSTMClassifier(**TINY).fit(X, y > 0)
    assert clf.state_dict()["head.weight"].shape == (2, 4)
    assert clf.predict_proba(X).shape == (len(X), 2)


def test_a_single_class_is_refused():
    X, _ = sequences()
    with pytest.raises(ValueError, match="at least 2 classes"):
        LSTMClassifier(**TINY).fit(X, np.zeros(len(X)))


def test_last_partial_batch_is_trained(count_steps):
    X, y = sequences(n=10)
    LSTMClassifier(**{**TINY, "batch_size": 4, "max_iter": 2}).fit(X, y)
    assert count_steps == [4, 4, 2, 4, 4, 2]


def test_partial_fit_epochs_equal_fit_epochs():
    X, y = sequences()
    fitted = LSTMClassifier(**TINY).fit(X, y)
    stepped = LSTMClassifier(**TINY)
    for _ in range(TINY["max_iter"]):
        stepped.partial_fit(X, y, classes=[0, 1, 2])
    assert stepped.n_iter_ == fitted.n_iter_
    assert stepped.loss_curve_ == fitted.loss_curve_
    assert_same_weights(stepped, fitted)


def test_partial_fit_classes_rules():
    X, y = sequences()
    clf = LSTMClassifier(**TINY)
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        clf.partial_fit(X, y)
    clf.partial_fit(X[y == 0], y[y == 0], classes=[0, 1, 2, 3])
    np.testing.assert_array_equal(clf.classes_, [0, 1, 2, 3])
    clf.partial_fit(X, y)  # later calls may omit classes, and see a subset
    with pytest.raises(ValueError, match=re.escape("labels [7] that are not in classes_")):
        clf.partial_fit(X, np.where(y == 0, 7, y))
    with pytest.raises(ValueError, match="pass the same classes each time"):
        clf.partial_fit(X, y, classes=[0, 1, 2])
    assert clf.n_iter_ == 2


@pytest.fixture
def step_rates(monkeypatch):
    """Record the learning rate of every train_step of the CPU backend."""
    backend = get_backend("cpu")
    rates = []
    original = backend.train_step

    def recording(spec, params, state, x, y, loss, config, **kwargs):
        rates.append(config.learning_rate)
        return original(spec, params, state, x, y, loss, config, **kwargs)

    monkeypatch.setattr(backend, "train_step", recording)
    return rates


#: no epoch after the first improves on it (by more than tol), and nothing stops for that
NO_PROGRESS = dict(tol=1e9, n_iter_no_change=100)


@pytest.mark.parametrize("early_stopping", [False, True], ids=["training-loss", "validation"])
def test_adaptive_rate_is_divided_by_5_after_two_epochs_without_improvement(step_rates,
                                                                            early_stopping):
    X, y = sequences()  # two minibatches per epoch, with or without the validation split
    rate = TINY["learning_rate_init"]
    clf = LSTMClassifier(**{**TINY, "max_iter": 7}, **NO_PROGRESS, learning_rate="adaptive",
                         early_stopping=early_stopping, validation_fraction=0.25, warm_start=True)
    clf.fit(X, y)
    # epoch 1 improves (on nothing), 2 and 3 do not: 4 and 5 train at rate / 5, and so on
    per_epoch = [rate] * 3 + [rate / 5] * 2 + [rate / 5 / 5] * 2
    assert step_rates == [r for r in per_epoch for _ in range(2)]
    assert clf.n_iter_ == 7 and clf.learning_rate_ == rate / 5 / 5 / 5
    step_rates.clear()
    clf.fit(X, y)  # warm start: a new run, from learning_rate_init again
    assert step_rates[:2] == [rate, rate] and clf.n_iter_ == 14


def test_constant_rate_is_learning_rate_init_at_every_step(step_rates):
    X, y = sequences()
    params = {**TINY, "max_iter": 7, "n_iter_no_change": 100}
    clf = LSTMClassifier(**params, tol=1e9).fit(X, y)
    assert step_rates == [TINY["learning_rate_init"]] * 14
    assert clf.learning_rate == "constant" and clf.learning_rate_ == TINY["learning_rate_init"]
    # whether epochs improve or not changes nothing but when training stops
    assert_same_weights(clf, LSTMClassifier(**params, tol=0.0).fit(X, y))


@pytest.mark.parametrize("learning_rate_init, n_iter_no_change, epochs, rate, why", [
    # the rate is divided at epoch 3 (to 6e-7, below 1e-6); 2 epochs later it would be again
    (3e-6, 100, 5, 6e-7, "for 2 epochs at learning rate 6e-07 (at most 1e-06)"),
    # 4 epochs without improvement, counted across the change of the rate at epoch 3
    (0.05, 3, 5, 0.01, "for 3 epochs"),
])
def test_adaptive_rate_stops_when_tiny_or_after_n_iter_no_change(
        capsys, learning_rate_init, n_iter_no_change, epochs, rate, why):
    X, y = sequences()
    params = {**TINY, "max_iter": 20, "learning_rate_init": learning_rate_init}
    clf = LSTMClassifier(**params, learning_rate="adaptive", tol=1e9,
                         n_iter_no_change=n_iter_no_change, verbose=1).fit(X, y)
    assert clf.n_iter_ == epochs and clf.learning_rate_ == pytest.approx(rate, rel=1e-12)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"Epoch 1: loss \d+\.\d{{4}}, learning rate {learning_rate_init:.3g}, "
                        r"\d+\.\d s", lines[0]), lines[0]
    assert f"learning rate {rate:.3g}, " in lines[epochs - 1]
    assert lines[epochs:] == [f"No improvement of more than tol=1000000000.0 {why}: stopping."]


def test_partial_fit_goes_on_with_the_adaptive_schedule(step_rates):
    X, y = sequences()
    params = {**TINY, "max_iter": 5, "learning_rate": "adaptive", **NO_PROGRESS}
    fitted = LSTMClassifier(**params).fit(X, y)
    stepped = LSTMClassifier(**params)
    for _ in range(5):
        stepped.partial_fit(X, y, classes=[0, 1, 2])
    assert step_rates[10:] == step_rates[:10] and stepped.learning_rate_ == fitted.learning_rate_
    assert stepped.loss_curve_ == fitted.loss_curve_
    assert_same_weights(stepped, fitted)


def test_early_stopping_keeps_the_best_epoch():
    X, y = sequences(n=80)
    params = {**TINY, "max_iter": 8, "early_stopping": True, "validation_fraction": 0.25}
    clf = LSTMClassifier(**params, n_iter_no_change=2, tol=10.0).fit(X, y)
    # tol=10: only the first epoch improves (on nothing), so training stops
    # n_iter_no_change + 1 epochs later, as MLPClassifier's does
    assert clf.n_iter_ == 4
    assert len(clf.validation_scores_) == 4
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    # The same run stopped at its best epoch has the weights the first one kept.
    best_epoch = int(np.argmax(clf.validation_scores_)) + 1
    at_best = LSTMClassifier(**{**params, "max_iter": best_epoch}).fit(X, y)
    assert_same_weights(clf, at_best)


def test_warm_start_may_switch_early_stopping_on():
    X, y = sequences(n=60)
    clf = LSTMClassifier(**TINY, warm_start=True).fit(X, y)
    clf.set_params(early_stopping=True, validation_fraction=0.25).fit(X, y)
    assert clf.n_iter_ == 2 * TINY["max_iter"] and len(clf.validation_scores_) == TINY["max_iter"]


def test_without_early_stopping_the_training_loss_decides():
    X, y = sequences()
    clf = LSTMClassifier(**{**TINY, "max_iter": 10}, n_iter_no_change=1, tol=10.0).fit(X, y)
    assert clf.n_iter_ == 3
    assert clf.validation_scores_ is None and clf.best_validation_score_ is None
    assert clf.best_loss_ == min(clf.loss_curve_)


def test_warm_start_continues_training():
    X, y = sequences()
    clf = LSTMClassifier(**TINY, warm_start=True).fit(X, y)
    first = clf.state_dict()
    clf.fit(X, y)
    assert clf.n_iter_ == 2 * TINY["max_iter"] and len(clf.loss_curve_) == clf.n_iter_
    assert not np.array_equal(first["head.weight"], clf.state_dict()["head.weight"])
    with pytest.raises(ValueError, match="set warm_start=False"):
        clf.fit(X, np.where(y == 0, 5, y))
    clf.set_params(hidden_size=6)
    with pytest.raises(ValueError, match="set warm_start=False"):
        clf.fit(X, y)


def test_same_random_state_gives_bit_identical_weights():
    X, y = sequences()
    a = LSTMClassifier(**TINY).fit(X, y)
    b = LSTMClassifier(**TINY).fit(X, y)
    assert_same_weights(a, b)
    c = LSTMClassifier(**{**TINY, "random_state": 1}).fit(X, y)
    assert not np.array_equal(a.state_dict()["lstm.weight_hh_l0"],
                              c.state_dict()["lstm.weight_hh_l0"])


def test_initial_weights_are_param_layout_init_seeded_by_random_state():
    X, y = sequences()
    # a learning rate far below float32's resolution leaves the initial weights in place
    clf = LSTMClassifier(**{**TINY, "learning_rate_init": 1e-30, "max_iter": 1}).fit(X, y)
    seed = np.random.RandomState(TINY["random_state"]).randint(np.iinfo(np.int32).max)
    layout = ParamLayout(2, 4, 1, 3)
    expected = layout.views(layout.init(np.random.default_rng(seed), np.float32))
    for name, value in clf.state_dict().items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


@pytest.mark.parametrize("dump, load", [
    (pickle.dumps, pickle.loads),
    (lambda est: _joblib_bytes(est), lambda data: joblib.load(io.BytesIO(data))),
], ids=["pickle", "joblib"])
@pytest.mark.parametrize("Estimator", [LSTMClassifier, LSTMRegressor])
def test_pickle_and_joblib_round_trips_predict_identically(Estimator, dump, load):
    X, y = sequences()
    est = Estimator(**TINY).fit(X, y)
    clone = load(dump(est))
    np.testing.assert_array_equal(clone.predict(X), est.predict(X))
    if hasattr(est, "predict_proba"):
        np.testing.assert_array_equal(clone.predict_proba(X), est.predict_proba(X))


def _joblib_bytes(est):
    buffer = io.BytesIO()
    joblib.dump(est, buffer)
    return buffer.getvalue()


def test_verbose_one_prints_a_line_per_epoch(capsys):
    X, y = sequences(n=60)
    LSTMClassifier(**TINY, verbose=1, early_stopping=True, validation_fraction=0.25).fit(X, y)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == TINY["max_iter"]
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"Epoch {epoch}: loss \d+\.\d{{4}}, validation score \d\.\d{{4}}, "
                            r"\d+\.\d s", line), line


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream, drawn", [(FakeTerminal, True), (io.StringIO, False)],
                         ids=["terminal", "pipe"])
def test_verbose_two_draws_a_progress_bar_only_on_a_terminal(monkeypatch, capsys, stream, drawn):
    err = stream()
    monkeypatch.setattr("sys.stderr", err)
    X, y = sequences(n=40)
    LSTMClassifier(**{**TINY, "batch_size": 16, "max_iter": 1}, verbose=2).fit(X, y)
    assert ("epoch 1 [" in err.getvalue() and "40/40" in err.getvalue()) is drawn
    assert capsys.readouterr().out.startswith("Epoch 1: loss")


def test_2d_rows_are_cut_into_steps_of_input_size():
    X, y = sequences(steps=5, inputs=2)
    flat = X.reshape(len(X), 10)
    from_3d = LSTMClassifier(**TINY).fit(X, y)
    from_2d = LSTMClassifier(**TINY, input_size=2).fit(flat, y)
    assert from_2d.input_size_ == 2 and from_2d.n_features_in_ == 10
    assert_same_weights(from_2d, from_3d)
    np.testing.assert_array_equal(from_2d.predict_proba(flat), from_3d.predict_proba(X))
    # a model fitted on rows also reads the same data as 3-D sequences
    np.testing.assert_array_equal(from_2d.predict_proba(X), from_3d.predict_proba(X))


def test_2d_rows_without_input_size_are_one_value_per_step():
    X, y = sequences(steps=5, inputs=1)
    clf = LSTMClassifier(**TINY).fit(X[:, :, 0], y)
    assert clf.input_size_ == 1 and clf.state_dict()["lstm.weight_ih_l0"].shape == (16, 1)
    assert not hasattr(LSTMClassifier(**TINY).fit(X, y), "n_features_in_")


def test_input_size_errors_say_what_to_do():
    X, y = sequences(steps=5, inputs=2)
    with pytest.raises(ValueError, match="not a multiple of input_size=3; set input_size to"):
        LSTMClassifier(**TINY, input_size=3).fit(X.reshape(len(X), 10), y)
    with pytest.raises(ValueError, match="X has 2 inputs per step but input_size=3"):
        LSTMClassifier(**TINY, input_size=3).fit(X, y)
    clf = LSTMClassifier(**TINY).fit(X, y)
    with pytest.raises(ValueError, match="1 inputs per step, but LSTMClassifier was fitted with 2"):
        clf.predict(X[:, :, :1])


def test_3d_models_read_sequences_of_other_lengths():
    X, y = sequences(steps=5)
    clf = LSTMClassifier(**TINY).fit(X, y)
    assert clf.predict_proba(X[:, :3]).shape == (len(X), 3)


def test_state_dict_has_pytorch_names_and_round_trips():
    X, y = sequences()
    clf = LSTMClassifier(**{**TINY, "num_layers": 2}).fit(X, y)
    state = clf.state_dict()
    assert {k: v.shape for k, v in state.items()} == {
        "lstm.weight_ih_l0": (16, 2), "lstm.weight_hh_l0": (16, 4), "lstm.bias_ih_l0": (16,),
        "lstm.bias_hh_l0": (16,), "lstm.weight_ih_l1": (16, 4), "lstm.weight_hh_l1": (16, 4),
        "lstm.bias_ih_l1": (16,), "lstm.bias_hh_l1": (16,), "head.weight": (3, 4),
        "head.bias": (3,)}
    state["head.bias"][:] = 99  # a copy: the model is unchanged
    assert not np.any(clf.state_dict()["head.bias"] == 99)
    loaded = LSTMClassifier(hidden_size=4, num_layers=2).load_state_dict(clf.state_dict())
    np.testing.assert_array_equal(loaded.classes_, [0, 1, 2])
    np.testing.assert_array_equal(loaded.predict_proba(X), clf.predict_proba(X))
    assert loaded.n_iter_ == 0 and loaded.loss_curve_ == []


def test_load_state_dict_mismatches_say_what_to_do():
    X, y = sequences()
    clf = LSTMClassifier(**TINY).fit(X, y)
    with pytest.raises(ValueError, match="set them with set_params first"):
        LSTMClassifier(hidden_size=5).load_state_dict(clf.state_dict())
    other = LSTMClassifier(**TINY).fit(X[:, :, :1], y)
    with pytest.raises(ValueError, match="load it into an unfitted estimator"):
        other.load_state_dict(clf.state_dict())
    with pytest.raises(ValueError, match="PyTorch's names"):
        LSTMClassifier().load_state_dict({"weight": np.zeros(3)})


def test_warm_start_from_loaded_weights():
    X, y = sequences()
    trained = LSTMClassifier(**TINY).fit(X, y)
    loaded = LSTMClassifier(**TINY, warm_start=True).load_state_dict(trained.state_dict())
    loaded.fit(X, y)
    assert loaded.n_iter_ == TINY["max_iter"]
    assert not np.array_equal(loaded.state_dict()["head.bias"], trained.state_dict()["head.bias"])


def test_regressor_single_and_multiple_targets():
    X, _ = sequences(n=64)
    target = X[:, :, 0].sum(axis=1) / 3
    reg = LSTMRegressor(**{**TINY, "hidden_size": 8, "batch_size": 64, "max_iter": 60})
    reg.fit(X, target)
    assert reg.predict(X).shape == (64,) and reg.score(X, target) > 0.8
    both = np.column_stack([target, -target])
    multi = LSTMRegressor(**TINY).fit(X, both)
    assert multi.n_outputs_ == 2 and multi.predict(X).shape == (64, 2)
    assert multi.state_dict()["head.weight"].shape == (2, 4)


def test_pipeline_and_grid_search():
    X, y = sequences()
    to_sequences = FunctionTransformer(lambda rows: rows.reshape(len(rows), 5, 2))
    pipe = make_pipeline(to_sequences, LSTMClassifier(**TINY))
    search = GridSearchCV(pipe, {"lstmclassifier__hidden_size": [2, 4]}, cv=2).fit(
        X.reshape(len(X), 10), y)
    assert search.best_params_["lstmclassifier__hidden_size"] in (2, 4)
    assert search.predict(X.reshape(len(X), 10)).shape == (len(X),)


def test_invalid_hyper_parameters_are_named():
    X, y = sequences()
    with pytest.raises(ValueError, match="'hidden_size' parameter of LSTMClassifier must be"):
        LSTMClassifier(hidden_size=0).fit(X, y)
    with pytest.raises(ValueError, match="'device' parameter of LSTMRegressor must be"):
        LSTMRegressor(device="tpu").fit(X, y)


def test_cuda_device_without_a_gpu_says_what_to_do():
    if "cuda" in available_backends():
        pytest.skip("a CUDA GPU is usable here, so device='cuda' trains")
    X, y = sequences()
    with pytest.raises(BackendUnavailable, match="device='cpu'"):
        LSTMClassifier(**{**TINY, "device": "cuda"}).fit(X, y)


def test_keyboard_interrupt_stops_after_the_batch_and_keeps_a_usable_model(count_steps,
                                                                           monkeypatch):
    backend = get_backend("cpu")
    counting = backend.train_step

    def interrupted(*args, **kwargs):
        if len(count_steps) == 3:
            raise KeyboardInterrupt
        return counting(*args, **kwargs)

    monkeypatch.setattr(backend, "train_step", interrupted)
    X, y = sequences()
    with pytest.warns(UserWarning, match="interrupted by the user during epoch 2"):
        clf = LSTMClassifier(**{**TINY, "batch_size": 16}).fit(X, y)
    assert clf.n_iter_ == 1 and np.isfinite(clf.predict_proba(X)).all()


def test_non_finite_loss_stops_with_advice_and_keeps_finite_weights(monkeypatch):
    X, y = sequences()
    backend = get_backend("cpu")
    monkeypatch.setattr(backend, "train_step", lambda *args, **kwargs: float("nan"))
    clf = LSTMClassifier(**TINY)
    with pytest.raises(FloatingPointError, match="Lower learning_rate_init, set clip_grad_norm"):
        clf.fit(X, y)
    assert clf.n_iter_ == 0 and np.isfinite(clf.predict_proba(X)).all()
