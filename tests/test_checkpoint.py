"""Checkpoints: a fit killed at any moment resumes from its last epoch, bit-identically.

A child process (checkpoint_child.py) fits with ``checkpoint=PATH`` and is killed with
SIGKILL in the middle of an epoch, or dies halfway through writing a checkpoint; the test
then loads the checkpoint, resumes the fit with ``warm_start=True`` and compares the
weights with an uninterrupted fit's.  In-process tests resume from every epoch's checkpoint
(early stopping, adaptive rate, variable lengths), and check the rules: a finished fit's
checkpoint warm-starts as any fitted model, resuming on other data or another validation
split is refused, ``partial_fit`` ends the unfinished fit.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastlstm
import fastlstm.estimators
from checkpoint_child import CRASHED, PARAMS, STEPS_PER_EPOCH, data
from fastlstm import LSTMClassifier, LSTMRegressor
from fastlstm.persistence import ModelFileError

CHILD = Path(__file__).with_name("checkpoint_child.py")
#: the CPU backend's results depend on the thread count: the same in every process
THREADS = "1"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("FASTLSTM_NUM_THREADS", THREADS)


@pytest.fixture(scope="module")
def uninterrupted():
    """The child's fit, run to its end here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLSTM_NUM_THREADS", THREADS)
        return LSTMClassifier(**PARAMS).fit(*data())


def start_child(path, mode, number):
    env = {**os.environ, "FASTLSTM_NUM_THREADS": THREADS,
           "PYTHONPATH": os.pathsep.join([str(Path(fastlstm.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(CHILD), str(path), mode, str(number)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)


def resume(path):
    est = fastlstm.load(path)
    return est.set_params(warm_start=True).fit(*data())


def assert_same_fit(resumed, uninterrupted):
    assert np.array_equal(resumed._params, uninterrupted._params)
    assert np.array_equal(resumed._adam.m, uninterrupted._adam.m)
    assert resumed._adam.step == uninterrupted._adam.step
    assert resumed.n_iter_ == uninterrupted.n_iter_
    assert resumed.loss_curve_ == uninterrupted.loss_curve_
    assert resumed.validation_scores_ == uninterrupted.validation_scores_
    assert resumed.learning_rate_ == uninterrupted.learning_rate_
    assert resumed._rng.bit_generator.state == uninterrupted._rng.bit_generator.state


def test_a_fit_killed_mid_epoch_resumes_from_its_last_checkpoint_bit_identically(
        tmp_path, uninterrupted):
    path = tmp_path / "fit.npz"
    # killed in the middle of the last epoch: the checkpoint holds a rate divided once, an
    # epoch without improvement and the best weights so far (epoch 4's)
    epochs = 5
    child = start_child(path, "pause", epochs * STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2)
    try:
        assert child.stdout.readline() == "paused\n"
        checkpoint = fastlstm.load(path)
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate()
    assert checkpoint.n_iter_ == epochs and checkpoint._unfinished_fit["epochs"] == epochs
    assert checkpoint.n_iter_ < uninterrupted.n_iter_ == PARAMS["max_iter"]
    assert checkpoint.learning_rate_ == PARAMS["learning_rate_init"] / 5
    assert checkpoint._no_improvement_count == 1
    assert not np.array_equal(checkpoint._best_params, checkpoint._params)
    resumed = resume(path)
    assert_same_fit(resumed, uninterrupted)
    assert resumed._unfinished_fit is None
    assert not [p.name for p in tmp_path.iterdir() if p.name != "fit.npz"]  # no leftovers


def test_a_checkpoint_cut_off_while_written_is_never_taken_for_the_last_one(
        tmp_path, uninterrupted):
    path = tmp_path / "fit.npz"
    child = start_child(path, "crash-write", 4)  # epochs 1 to 3 were saved whole
    child.communicate()
    assert child.returncode == CRASHED
    (partial,) = [p for p in tmp_path.iterdir() if p != path]
    assert partial.name.startswith(".fastlstm-") and partial.stat().st_size > 0
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        fastlstm.load(partial)
    assert fastlstm.load(path).n_iter_ == 3
    assert_same_fit(resume(path), uninterrupted)
    # the file at the path itself, cut short, is refused as well
    data_ = path.read_bytes()
    path.write_bytes(data_[:len(data_) // 2])
    with pytest.raises(ModelFileError):
        fastlstm.load(path)


def checkpoints_of(est, X, y, tmp_path, monkeypatch):
    """Fit ``est`` with a checkpoint; the file as it was after each epoch."""
    path = tmp_path / "fit.npz"
    copies = []
    save = fastlstm.estimators.BaseLSTM.save

    def save_and_copy(self, where):
        save(self, where)
        copies.append(shutil.copy(where, tmp_path / f"epoch-{len(copies) + 1}.npz"))

    with monkeypatch.context() as patch:
        patch.setattr(fastlstm.estimators.BaseLSTM, "save", save_and_copy)
        est.set_params(checkpoint=path).fit(X, y)
    assert len(copies) == est.n_iter_
    assert Path(copies[-1]).read_bytes() == path.read_bytes()
    return copies


def ragged_data(n=60):
    rng = np.random.default_rng(1)
    X = [rng.standard_normal((k, 2)).astype(np.float32) for k in rng.integers(1, 7, n)]
    return X, np.array([x[:, 0].sum() for x in X])


@pytest.mark.parametrize("Estimator, params, make_data", [
    (LSTMClassifier, PARAMS, data),
    (LSTMClassifier, {**PARAMS, "early_stopping": False, "learning_rate": "constant"}, data),
    # stops early, at epoch 5: its last checkpoint is the finished model
    (LSTMRegressor, dict(hidden_size=4, batch_size=16, max_iter=8, learning_rate="adaptive",
                         n_iter_no_change=3, tol=1e9, random_state=0, device="cpu",
                         bidirectional=True), ragged_data),
    # the dropout masks are seeded from the generator the checkpoint holds
    (LSTMClassifier, {**PARAMS, "num_layers": 2, "dropout": 0.3, "recurrent_dropout": 0.3},
     data),
], ids=["early-stopping-adaptive", "constant", "ragged-stopping-regressor", "dropout"])
def test_every_epochs_checkpoint_resumes_to_the_uninterrupted_fit(
        tmp_path, monkeypatch, Estimator, params, make_data):
    X, y = make_data()
    full = Estimator(**params).fit(X, y)
    copies = checkpoints_of(Estimator(**params), X, y, tmp_path, monkeypatch)
    assert len(copies) == full.n_iter_
    for epoch, copy in enumerate(copies[:-1], start=1):
        checkpoint = fastlstm.load(copy)
        assert checkpoint.n_iter_ == epoch and checkpoint._unfinished_fit["epochs"] == epoch
        resumed = checkpoint.set_params(warm_start=True).fit(X, y)
        assert_same_fit(resumed, full)
    finished = fastlstm.load(copies[-1])
    assert finished._unfinished_fit is None
    assert np.array_equal(finished._params, full._params)


def test_warm_start_from_a_finished_fits_checkpoint_is_a_new_run(tmp_path, monkeypatch):
    X, y = data()
    params = {**PARAMS, "max_iter": 3}
    in_memory = LSTMClassifier(**params).fit(X, y)
    (*_, last) = checkpoints_of(LSTMClassifier(**params), X, y, tmp_path, monkeypatch)
    loaded = fastlstm.load(last)
    for est in (in_memory, loaded):  # another max_iter epochs, Adam and the rate afresh
        est.set_params(warm_start=True, checkpoint=None).fit(X, y)
    assert loaded.n_iter_ == in_memory.n_iter_ == 6
    assert np.array_equal(loaded._params, in_memory._params)
    assert loaded._adam.step == in_memory._adam.step == 3 * STEPS_PER_EPOCH


def test_resuming_on_other_data_or_another_split_is_refused(tmp_path, monkeypatch):
    X, y = data()
    first, *_ = checkpoints_of(LSTMClassifier(**PARAMS), X, y, tmp_path, monkeypatch)
    checkpoint = fastlstm.load(first).set_params(warm_start=True)
    with pytest.raises(ValueError, match="stopped after 1 of its epochs on 80 samples, but X "
                                         "has 70; resume it with the X and y of that fit"):
        checkpoint.fit(X[:70], y[:70])
    with pytest.raises(ValueError, match="with early_stopping=True, validation_fraction=0.2; "
                                         "set them back"):
        checkpoint.set_params(validation_fraction=0.25).fit(X, y)
    with pytest.raises(ValueError, match="set them back"):
        checkpoint.set_params(validation_fraction=0.2, early_stopping=False).fit(X, y)
    assert checkpoint.n_iter_ == 1  # nothing trained
    # starting afresh is always possible
    assert checkpoint.set_params(warm_start=False, max_iter=1).fit(X, y).n_iter_ == 1


def test_partial_fit_on_an_unfinished_fits_checkpoint_trains_an_epoch_of_its_own(
        tmp_path, monkeypatch):
    X, y = data()
    first, *_ = checkpoints_of(LSTMClassifier(**PARAMS), X, y, tmp_path, monkeypatch)
    checkpoint = fastlstm.load(first)
    weights = checkpoint._params.copy()
    checkpoint.partial_fit(X, y)
    assert checkpoint.n_iter_ == 2 and checkpoint._unfinished_fit is None
    assert not np.array_equal(checkpoint._params, weights)
    # the fit is over: warm_start now starts a new run of max_iter epochs
    checkpoint.set_params(warm_start=True, checkpoint=None, max_iter=2).fit(X, y)
    assert checkpoint.n_iter_ == 4


def test_a_checkpoint_in_a_missing_folder_is_refused_before_training(tmp_path):
    clf = LSTMClassifier(**PARAMS, checkpoint=tmp_path / "missing" / "fit.npz")
    with pytest.raises(ValueError, match="folder that does not exist.*create it"):
        clf.fit(*data())
    assert not hasattr(clf, "n_iter_")


def test_an_interrupted_fit_in_memory_is_finished_and_its_checkpoint_resumes(
        tmp_path, monkeypatch, uninterrupted):
    # Ctrl-C stops mid-epoch: the estimator in memory is not at the end of an epoch, so a
    # warm start is a new run; the checkpoint of the last whole epoch resumes the fit.
    backend = fastlstm.estimators.get_backend("cpu")
    train_step, steps = backend.train_step, []

    def interrupted(*args, **kwargs):
        steps.append(None)
        if len(steps) == 2 * STEPS_PER_EPOCH + 1:
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    path = tmp_path / "fit.npz"
    clf = LSTMClassifier(**PARAMS, checkpoint=path)
    with monkeypatch.context() as patch:
        patch.setattr(backend, "train_step", interrupted)
        with pytest.warns(UserWarning, match="interrupted by the user during epoch 3"):
            clf.fit(*data())
    assert clf._unfinished_fit is None and clf.n_iter_ == 2
    assert fastlstm.load(path)._unfinished_fit["epochs"] == 2
    assert_same_fit(resume(path), uninterrupted)
