"""Scale-out on Dask: searches, thread budgets, chunked prediction and faults.

Each test that needs a cluster uses one ``LocalCluster`` of 2 worker processes x 1
thread (nannies), listening on 127.0.0.1 only, started here and shut down at the end
of the module.  Skipped without the ``fastlstm[dask]`` extra.  Every wait is bounded:
futures by ``result(timeout=...)``, blocking calls (a search) by :func:`bounded`.

CPU fits are deterministic for a ``random_state`` AND a thread count (the weight
gradient of a batch is summed over the threads' rows): the search on the cluster
matches the default joblib backend because both give each fit one thread (loky
sets ``OMP_NUM_THREADS = cores // n_jobs`` in its workers, a Dask nanny sets it to 1).
"""

import itertools
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
cloudpickle = pytest.importorskip("cloudpickle")
joblib = pytest.importorskip("joblib")

from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402

from fastlstm import LSTMClassifier  # noqa: E402
from fastlstm.backends import get_backend  # noqa: E402
from fastlstm.backends.cpu import default_num_threads  # noqa: E402

#: seconds any one wait on the cluster may take (a whole search takes a few)
TIMEOUT = 120
#: seconds between the cycles of the cluster's Active Memory Manager (Dask's default: 2)
AMM_INTERVAL = 0.1
#: the tiny model of every test
FIXED = dict(max_iter=3, batch_size=16, random_state=0, device="cpu")
GRID = {"hidden_size": [2, 6], "learning_rate_init": [3e-3, 3e-2]}

def data(n=80, steps=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, steps, 3)).astype(np.float32)
    y = (X[:, :, 0].sum(axis=1) > 0).astype(int) + (X[:, -1, 1] > 1)
    return X, y


class KillsItsWorkerOnce(LSTMClassifier):
    """An LSTMClassifier whose fit, in the one process that creates ``marker`` first,
    kills that process (SIGKILL, as the OOM killer would) instead of fitting; elsewhere
    (``marker`` None or present, or in process ``spare_pid``) it fits as usual."""

    def __init__(self, hidden_size=4, learning_rate_init=1e-2, marker=None, spare_pid=None):
        super().__init__(hidden_size, learning_rate_init=learning_rate_init, **FIXED)
        self.marker = marker
        self.spare_pid = spare_pid

    def fit(self, X, y):
        if self.marker is not None and os.getpid() != self.spare_pid:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                # past a few cycles of the cluster's Active Memory Manager, which drops
                # the copies a broadcast made unless it is stopped (see the test)
                time.sleep(10 * AMM_INTERVAL)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().fit(X, y)


def bounded(fn, timeout=TIMEOUT):
    """``fn()`` run in a thread of its own, failing the test after ``timeout`` seconds."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout)
        except FuturesTimeout:
            pytest.fail(f"no result after {timeout} s: hung")


def results(futures):
    """The results of ``futures``, each waited for at most :data:`TIMEOUT` seconds."""
    return [future.result(timeout=TIMEOUT) for future in futures]


def search(estimator, backend=None, grid=GRID, scatter=None, cv=2, **kwargs):
    """A fitted GridSearchCV(n_jobs=-1) of ``estimator`` on :func:`data`, on joblib
    ``backend`` (None: the default, loky) with ``scatter``, bounded in time."""
    def run():
        gs = GridSearchCV(estimator, grid, cv=cv, n_jobs=-1, **kwargs)
        if backend is None:
            return gs.fit(X, y)
        with joblib.parallel_backend(backend, scatter=scatter):
            return gs.fit(X, y)
    X, y = data()
    if scatter is not None:  # the arrays themselves: joblib finds them by id
        X, y = scatter[:2]
    return bounded(run)


def cluster_task_budget():
    """In a worker task: the budget, the thread count of the backend a fit would get,
    and the worker's ``nthreads``."""
    return (default_num_threads(), get_backend("cpu").num_threads,
            distributed.get_worker().state.nthreads)


@pytest.fixture(scope="module", autouse=True)
def default_budget():
    """The budget of this process and of the workers it starts: the defaults (no
    ``FASTLSTM_NUM_THREADS`` or ``OMP_NUM_THREADS`` from the caller's environment).
    And this module's functions and classes travel to the workers by value, whatever
    pytest's import mode."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("FASTLSTM_NUM_THREADS", raising=False)
            mp.delenv("OMP_NUM_THREADS", raising=False)
            yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="module")
def client():
    # the scheduler runs in this process: it reads the config when it starts
    with dask.config.set({"distributed.scheduler.active-memory-manager.interval":
                          f"{AMM_INTERVAL}s"}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster, timeout=TIMEOUT) as client:
        client.wait_for_workers(2, timeout=TIMEOUT)
        yield client


@pytest.fixture(scope="module")
def reference():
    """The search on the default joblib backend (loky worker processes)."""
    return search(LSTMClassifier(**FIXED))


def assert_same_search(got, expected):
    assert got.best_params_ == expected.best_params_
    for key in ("mean_test_score", "std_test_score"):
        np.testing.assert_array_equal(got.cv_results_[key], expected.cv_results_[key], key)
    assert list(got.cv_results_["params"]) == list(expected.cv_results_["params"])
    # refit in this process on the same thread count: the same weights, bit for bit
    np.testing.assert_array_equal(got.best_estimator_._params, expected.best_estimator_._params)


# -- thread budgets (no cluster) ----------------------------------------------------------

def test_budget_follows_the_settings_and_each_count_has_its_own_backend(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert default_num_threads() == cores
    assert get_backend("cpu") is get_backend("cpu")
    assert get_backend("cpu").num_threads == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what loky and Dask's nanny set in workers
    one = get_backend("cpu")
    assert default_num_threads() == 1 and one.num_threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")  # ignored
    assert default_num_threads() == cores
    monkeypatch.setenv("FASTLSTM_NUM_THREADS", "3")  # ours wins over everything
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_num_threads() == 3 and get_backend("cpu").num_threads == 3
    monkeypatch.setenv("FASTLSTM_NUM_THREADS", "1")
    assert get_backend("cpu") is one


def test_the_thread_count_changes_the_last_bits_of_a_fit_not_its_predictions(monkeypatch):
    # what "deterministic" depends on (documented): the count, not where the fit runs
    X, y = data()
    fits = {}
    for n in (1, 2):
        monkeypatch.setenv("FASTLSTM_NUM_THREADS", str(n))
        assert get_backend("cpu").num_threads == n
        fits[n] = [LSTMClassifier(hidden_size=4, **FIXED).fit(X, y) for _ in range(2)]
    for a, b in fits.values():
        np.testing.assert_array_equal(a._params, b._params)  # reruns: bit-identical
    assert not np.array_equal(fits[1][0]._params, fits[2][0]._params)
    np.testing.assert_allclose(fits[1][0]._params, fits[2][0]._params, rtol=0, atol=1e-5)
    if get_backend("cpu").choices.own_step_gemm:  # a row's outputs do not depend on the other rows
        model = fits[1][0]
        expected = model.predict_proba(X)
        monkeypatch.setenv("FASTLSTM_NUM_THREADS", "1")
        np.testing.assert_array_equal(model.predict_proba(X), expected)


def test_threads_of_one_process_keep_their_own_budgets(monkeypatch):
    # an in-process cluster: 1 worker x 2 task threads shares the cores of this process,
    # each task gets half; this thread keeps the whole, fitting at the same time, and
    # each side's fit matches a fit on its own count
    cores = len(os.sched_getaffinity(0))
    X, y = data()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp", host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster, timeout=TIMEOUT) as client:
        budgets = results(client.map(lambda _: cluster_task_budget(), range(2), pure=False))
        fitted = [LSTMClassifier(hidden_size=4, **FIXED) for _ in range(2)]
        fitted = client.map(lambda est: est.fit(X, y), fitted, pure=False)
        here = LSTMClassifier(hidden_size=4, **FIXED).fit(X, y)
        fitted = results(fitted)
    assert budgets == [(max(1, cores // 2), max(1, cores // 2), 2)] * 2
    assert get_backend("cpu").num_threads == cores
    monkeypatch.setenv("FASTLSTM_NUM_THREADS", str(max(1, cores // 2)))
    on_half = LSTMClassifier(hidden_size=4, **FIXED).fit(X, y)
    for est in fitted:
        np.testing.assert_array_equal(est._params, on_half._params)
    if cores // 2 != cores:
        assert not np.array_equal(here._params, on_half._params)


# -- on the cluster ----------------------------------------------------------------------

def test_workers_fit_on_one_thread_each(client):
    budgets = results(client.map(lambda _: cluster_task_budget(), range(4), pure=False))
    assert budgets == [(1, 1, 1)] * 4


def test_grid_search_on_dask_matches_the_default_joblib_backend(client, reference):
    got = search(LSTMClassifier(**FIXED), "dask")
    assert_same_search(got, reference)
    assert len(set(reference.cv_results_["mean_test_score"])) > 1  # the grid is not a tie


def test_prediction_chunk_by_chunk_on_a_dask_array_equals_predict(client):
    X, y = data()
    clf = LSTMClassifier(hidden_size=4, **FIXED).fit(X, y)
    X_big = np.random.default_rng(1).standard_normal((2500, 8, 3)).astype(np.float32)
    X_dask = da.from_array(X_big, chunks=(700, -1, -1))  # chunks along the samples only
    labels = X_dask.map_blocks(clf.predict, drop_axis=[1, 2], dtype=clf.classes_.dtype)
    proba = X_dask.map_blocks(clf.predict_proba, drop_axis=2,
                              chunks=(X_dask.chunks[0], (len(clf.classes_),)), dtype=np.float64)
    labels, proba = results(client.compute([labels, proba]))
    np.testing.assert_array_equal(labels, clf.predict(X_big))
    np.testing.assert_array_equal(proba, clf.predict_proba(X_big))


def test_a_fit_that_raises_on_a_worker_comes_back_as_that_exception(client):
    X, y = data()
    future = client.submit(LSTMClassifier(hidden_size=0, **FIXED).fit, X, y)
    with pytest.raises(InvalidParameterError, match="hidden_size"):
        future.result(timeout=TIMEOUT)
    with pytest.raises(InvalidParameterError, match="hidden_size"):
        search(LSTMClassifier(**FIXED), "dask", grid={"hidden_size": [2, 0]},
               error_score="raise")
    client.wait_for_workers(2, timeout=TIMEOUT)  # the workers lived on


def test_a_worker_killed_during_a_search_gives_the_same_best_params(client, reference,
                                                                    tmp_path):
    # joblib's Dask backend sends each argument of over 1 kB to ONE worker (no copy):
    # killing that worker loses X and the search fails (FutureCancelledError).  The
    # README's recipe: broadcast X, y and the CV splits' indices to every worker, and
    # stop the Active Memory Manager, whose ReduceReplicas policy drops all copies but
    # one of data no task waits for (the kill comes after several of its cycles)
    X, y = data()
    splits = list(StratifiedKFold(2).split(X, y))  # what cv=2 means for a classifier
    before = set(client.run(os.getpid).values())
    marker = tmp_path / "killed"
    client.amm.stop()
    try:
        got = search(KillsItsWorkerOnce(marker=str(marker), spare_pid=os.getpid()), "dask",
                     scatter=[X, y, *itertools.chain.from_iterable(splits)], cv=splits)
    finally:
        client.amm.start()
    assert marker.exists()  # a fit killed its worker; its nanny started a new one
    client.wait_for_workers(2, timeout=TIMEOUT)
    assert set(client.run(os.getpid).values()) != before
    assert_same_search(got, reference)


def test_the_benchmark_runs_at_a_tiny_size():
    # benchmarks/dask_search.py: it runs to the end and prints its table (speed is reported
    # there, never asserted)
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dask_search.py"
    done = subprocess.run([sys.executable, str(script), "--samples", "200", "--hidden", "4",
                           "--epochs", "1", "--repeat", "1", "--no-search"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("alone ", "alone, all cores ", "side by side ", "oversubscribed "):
        assert line in done.stdout, done.stdout
