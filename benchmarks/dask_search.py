"""Fits side by side on a Dask cluster: do fastlstm's threads keep to their budget?

Starts a ``LocalCluster`` on 127.0.0.1 of ``--workers`` worker processes x 1 thread
(nannies: each sets ``OMP_NUM_THREADS=1`` in its worker, so a fit's budget there is 1
thread) and times ``LSTMClassifier.fit`` inside worker tasks:

* ``alone``: one fit on one worker, the others idle;
* ``alone, all cores``: the same with ``FASTLSTM_NUM_THREADS`` set to every core;
* ``side by side``: one fit on each worker, all at once;
* ``oversubscribed``: the same, each on every core (``FASTLSTM_NUM_THREADS``): what
  fits did before they followed the budget;
* a search: ``GridSearchCV(n_jobs=-1)`` of 4 candidates x 2 folds on joblib's default
  backend (loky), then on the cluster (``joblib.parallel_backend("dask")``), with their
  ``best_params_``.

Each fit reports its wall time, the CPU time of its process (user + system) and the
thread count its backend ran with; side by side, the fits' start and end times show
that they overlapped.  The data: the MNIST images that ship with fastlstm, read row by
row (28 steps of 28 pixels).  With W workers on W cores, fits side by side should each
take about as long as one fit alone.  A benchmark: it prints figures and asserts nothing
about speed.  On a machine shared with other work, compare CPU times too.

    python benchmarks/dask_search.py                 # 2 workers, fits of a few seconds
    python benchmarks/dask_search.py --samples 256 --hidden 16 --epochs 1 --repeat 1  # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description  # noqa: E402


def timed_fit(params, X, y, threads=None):
    """In a worker task: fit (on ``threads`` threads, else on the worker's budget), and say
    how long it took, where, and on how many threads."""
    import resource

    from fastlstm import LSTMClassifier
    from fastlstm.backends import get_backend

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    # the workers run one task at a time (1 thread each): the process's setting is this fit's
    saved = os.environ.pop("FASTLSTM_NUM_THREADS", None)
    if threads:
        os.environ["FASTLSTM_NUM_THREADS"] = str(threads)
    try:
        cpu0, start, t0 = cpu(), time.time(), time.perf_counter()
        LSTMClassifier(**params).fit(X, y)
        wall = time.perf_counter() - t0
        used = get_backend("cpu").num_threads
    finally:
        os.environ.pop("FASTLSTM_NUM_THREADS", None)
        if saved is not None:
            os.environ["FASTLSTM_NUM_THREADS"] = saved
    return dict(wall=wall, cpu=cpu() - cpu0, start=start, end=start + wall, threads=used,
                pid=os.getpid())


def run_fits(client, workers, params, X, y, repeat, threads=None):
    """``repeat`` rounds of one fit on each of ``workers``, all at once; per round, the
    fits' reports."""
    rounds = []
    for _ in range(repeat):
        futures = [client.submit(timed_fit, params, X, y, threads, workers=[w],
                                 allow_other_workers=False, pure=False) for w in workers]
        rounds.append([f.result(timeout=3600) for f in futures])
    return rounds


def run_search(params, X, y):
    """Wall seconds, best_params_ and mean test scores of a small grid search on loky,
    then on Dask (the default client)."""
    import joblib
    from sklearn.model_selection import GridSearchCV

    from fastlstm import LSTMClassifier

    grid = {"hidden_size": [max(1, params["hidden_size"] // 2), params["hidden_size"]],
            "learning_rate_init": [2e-3, 1e-2]}
    base = {k: v for k, v in params.items() if k not in grid}
    out = {}
    gs = GridSearchCV(LSTMClassifier(**base), grid, cv=2, n_jobs=-1, refit=False)
    for name in ("loky", "dask"):
        with joblib.parallel_backend(name):
            gs.fit(X[:200], y[:200])  # start loky's workers (imports, Numba's cache), untimed
            t0 = time.perf_counter()
            gs.fit(X, y)
        out[name] = (time.perf_counter() - t0, gs.best_params_,
                     gs.cv_results_["mean_test_score"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--samples", type=int, default=8192, help="images (at most 10,000)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of fits per scenario")
    parser.add_argument("--no-search", action="store_true", help="skip the grid searches")
    args = parser.parse_args(argv)

    cores = len(os.sched_getaffinity(0))
    from fastlstm.datasets import load_mnist_sample
    X, y = load_mnist_sample(return_X_y=True)
    X, y = (X[:args.samples] / np.float32(255)).astype(np.float32), y[:args.samples]
    params = dict(hidden_size=args.hidden, batch_size=args.batch, max_iter=args.epochs,
                  random_state=0, device="cpu")
    print(machine_description())
    print(f"cores this process may use: {cores}; fit: {len(X)} MNIST images (28 steps x 28 "
          f"pixels), hidden {args.hidden}, batch {args.batch}, "
          f"{args.epochs} epochs; {args.repeat} round(s) per scenario, medians")

    scenarios = [("alone", 1, None), ("alone, all cores", 1, cores),
                 ("side by side", args.workers, None), ("oversubscribed", args.workers, cores)]
    print(f"\n{'scenario':<18}{'fits':>5}{'threads/fit':>13}{'wall/fit s':>12}"
          f"{'CPU/fit s':>11}{'round wall s':>14}{'overlap':>9}")
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(args.workers, timeout=120)
        workers = sorted(client.scheduler_info()["workers"])
        X_f, y_f = client.scatter([X, y], broadcast=True)
        run_fits(client, workers, dict(params, max_iter=1), X_f, y_f, 1)  # warm-up, untimed
        alone = None
        for name, n, threads in scenarios:
            rounds = run_fits(client, workers[:n], params, X_f, y_f, args.repeat, threads)
            walls = [r["wall"] for fits in rounds for r in fits]
            cpus = [r["cpu"] for fits in rounds for r in fits]
            spans = [max(r["end"] for r in fits) - min(r["start"] for r in fits)
                     for fits in rounds]
            # the share of the round during which every fit was running
            overlaps = [max(0.0, min(r["end"] for r in fits) - max(r["start"] for r in fits))
                        / span for fits, span in zip(rounds, spans)]
            used = sorted({r["threads"] for fits in rounds for r in fits})
            wall = statistics.median(walls)
            alone = wall if alone is None else alone
            print(f"{name:<18}{n:>5}{'/'.join(map(str, used)):>13}{wall:>12.2f}"
                  f"{statistics.median(cpus):>11.2f}{statistics.median(spans):>14.2f}"
                  f"{statistics.median(overlaps):>9.0%}   x{wall / alone:.2f} of alone")

        if not args.no_search:
            out = run_search(params, X, y)
            print("\nGridSearchCV(n_jobs=-1), 4 candidates x 2 folds, no refit:")
            for name, (wall, best, means) in out.items():
                print(f"  {name:<5} {wall:7.2f} s  best_params_ {best}  mean_test_score "
                      f"{np.array2string(means, precision=4)}")
            same = (out["loky"][1] == out["dask"][1]
                    and np.array_equal(out["loky"][2], out["dask"][2]))
            print(f"  same best_params_ and mean_test_score: {same}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
