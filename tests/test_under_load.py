"""Under load: predict streams large inputs in bounded memory; concurrent calls agree with serial.

The memory bound is measured with ``tracemalloc`` (NumPy reports its buffers
to it): predicting N uint8 MNIST-shaped images may allocate the output and a
few batches, never a float32 copy of X.  ``benchmarks/predict_memory.py``
measures the resident memory for N = 1,000,000.

The CPU backend keeps its buffers per calling thread and uses no Numba parallel
region, so predictions and fits may run in several threads at once.
"""

import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastlstm import LSTMClassifier, LSTMRegressor
from fastlstm.estimators import PREDICT_BATCH_SIZE

RNG = np.random.default_rng(0)
N_THREADS = 8


def fitted_on_images(shape, **params):
    X = RNG.integers(0, 256, (256,) + shape, dtype=np.uint8)
    return LSTMClassifier(hidden_size=2, max_iter=1, device="cpu", random_state=0,
                          **params).fit(X, RNG.integers(0, 10, 256))


@pytest.fixture(scope="module")
def mnist_shaped_classifier():
    return fitted_on_images((28, 28))


@pytest.mark.parametrize("shape, params, method, n_batches, share", [
    ((28, 28), {}, "predict_proba", 16, 1 / 4),
    ((784,), dict(input_size=196), "predict", 32, 1 / 8),
], ids=["3-D-28-steps-of-28", "2-D-rows-read-as-4-steps-of-196"])
def test_predict_on_many_uint8_images_allocates_far_less_than_a_float32_copy(
        shape, params, method, n_batches, share):
    clf = fitted_on_images(shape, **params)
    n = n_batches * PREDICT_BATCH_SIZE
    X = RNG.integers(0, 256, (n,) + shape, dtype=np.uint8)
    float32_copy = X.size * 4
    output = n * len(clf.classes_) * 8  # the float64 probabilities
    getattr(clf, method)(X[:PREDICT_BATCH_SIZE])  # warm up (compilation)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        result = getattr(clf, method)(X)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert len(result) == n
    assert peak < output + share * float32_copy, (peak, output, float32_copy)


def test_streamed_predictions_equal_one_batch_at_a_time(mnist_shaped_classifier):
    X = RNG.integers(0, 256, (2 * PREDICT_BATCH_SIZE + 5, 28, 28), dtype=np.uint8)
    expected = np.concatenate([mnist_shaped_classifier.predict_proba(X[lo:lo + 700])
                               for lo in range(0, len(X), 700)])
    np.testing.assert_array_equal(mnist_shaped_classifier.predict_proba(X), expected)


def _concurrent_equals_serial(est, inputs, method):
    """``method`` of ``est`` on each input from its own thread, all started together."""
    serial = [getattr(est, method)(x) for x in inputs]
    barrier = threading.Barrier(len(inputs))

    def call(x):
        barrier.wait()
        return getattr(est, method)(x)

    for _ in range(2):
        with ThreadPoolExecutor(len(inputs)) as pool:
            concurrent = list(pool.map(call, inputs))
        for got, expected in zip(concurrent, serial):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("Estimator, method", [(LSTMClassifier, "predict_proba"),
                                               (LSTMClassifier, "predict"),
                                               (LSTMRegressor, "predict")])
def test_concurrent_predict_from_8_threads_equals_serial(Estimator, method):
    X = RNG.standard_normal((300, 6, 3)).astype(np.float32)
    est = Estimator(hidden_size=8, max_iter=2, device="cpu", random_state=0)
    est.fit(X, np.arange(300) % 3)
    # different inputs per thread (so answers cannot be swapped unseen), several batches each
    inputs = [RNG.standard_normal((PREDICT_BATCH_SIZE + 37 * i, 6, 3)).astype(np.float32)
              for i in range(N_THREADS)]
    _concurrent_equals_serial(est, inputs, method)


def test_concurrent_predict_and_fit_equal_serial():
    X = RNG.standard_normal((300, 6, 3)).astype(np.float32)
    y = np.arange(300) % 3

    def make():
        return LSTMClassifier(hidden_size=8, max_iter=2, device="cpu", random_state=0)

    clf = make().fit(X, y)
    inputs = [RNG.standard_normal((2000 + 37 * i, 6, 3)).astype(np.float32) for i in range(8)]
    serial = [clf.predict_proba(x) for x in inputs]
    barrier = threading.Barrier(10)

    def predict(x):
        barrier.wait()
        return clf.predict_proba(x)

    def fit():
        barrier.wait()
        return make().fit(X, y).predict_proba(X)

    with ThreadPoolExecutor(10) as pool:
        predicted = [pool.submit(predict, x) for x in inputs]
        fitted = [pool.submit(fit) for _ in range(2)]
        for future, expected in zip(predicted, serial):
            np.testing.assert_array_equal(future.result(), expected)
        for future in fitted:
            np.testing.assert_array_equal(future.result(), clf.predict_proba(X))
