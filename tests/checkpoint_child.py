"""A fit that writes a checkpoint, run as a child process by tests/test_checkpoint.py.

``python checkpoint_child.py PATH MODE N``, where MODE says where the child stops, for the
test to see what a crash there leaves behind:

- ``pause``: before minibatch step N (counted from 0 over the whole fit) it prints
  ``paused`` and waits on stdin, in the middle of an epoch, for the test to kill it;
- ``crash-write``: the N-th checkpoint (from 1) is cut off halfway through writing its
  temporary file, as by a power loss, and the process dies on the spot (exit status
  :data:`CRASHED`).

The test imports :data:`PARAMS`, :func:`data` and :data:`STEPS_PER_EPOCH` to fit the same
model in its own process; both pin ``FASTLSTM_NUM_THREADS`` (the CPU backend's results
depend on the number of threads).
"""

import io
import os
import sys

import numpy as np

from fastlstm import LSTMClassifier
from fastlstm.backends import get_backend

PARAMS = dict(hidden_size=8, batch_size=16, learning_rate="adaptive", learning_rate_init=0.02,
              max_iter=6, early_stopping=True, validation_fraction=0.2, n_iter_no_change=20,
              tol=0.07, random_state=0, device="cpu")
N_SAMPLES = 80
#: 64 training samples (the rest is the validation split) in batches of 16
STEPS_PER_EPOCH = 4
CRASHED = 3


def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_SAMPLES, 8, 3)).astype(np.float32)
    return X, np.digitize(X[:, :, 0].sum(axis=1), [-1.0, 1.0])


def pause_before_step(number):
    backend = get_backend("cpu")  # the estimator's (one instance per thread count)
    train_step = backend.train_step
    steps = []

    def counting(*args, **kwargs):
        if len(steps) == number:
            print("paused", flush=True)
            sys.stdin.readline()  # the test kills the process here
        steps.append(None)
        return train_step(*args, **kwargs)

    backend.train_step = counting


def crash_in_write(number):
    savez = np.savez  # what fastlstm.persistence writes the archive with
    saves = []

    def cut_off(file, **arrays):
        saves.append(None)
        if len(saves) < number:
            return savez(file, **arrays)
        whole = io.BytesIO()
        savez(whole, **arrays)
        file.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        file.flush()
        os._exit(CRASHED)

    np.savez = cut_off


if __name__ == "__main__":
    path, mode, number = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"pause": pause_before_step, "crash-write": crash_in_write}[mode](number)
    LSTMClassifier(**PARAMS, checkpoint=path).fit(*data())
    sys.exit("the fit ended without being stopped")
