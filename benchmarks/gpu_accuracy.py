"""Same model, same data, same initial weights: test accuracy of each backend after training.

Uses the MNIST test set bundled in the package (no download: runs on an offline GPU machine):
the first 8,000 images train, the last 2,000 test.  LSTM(28, 128) + Linear(128, 10), Adam,
batch 128, the estimator's loop (shuffle on the host once per epoch, batches indexed on the
device, losses summed on the device).  Prints one line per backend and writes JSON:

    python benchmarks/gpu_accuracy.py results.json [--backends cuda cpu] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _common import train_epoch
from fastlstm.backends import get_backend
from fastlstm.datasets import load_mnist_sample
from fastlstm.model import ModelSpec

HIDDEN, BATCH, LR, TRAIN = 128, 128, 1e-3, 8000


def train_and_score(backend, X_train, y_train, X_test, y_test, epochs):
    spec = ModelSpec(28, HIDDEN, 1, 10)
    params = backend.asarray(spec.layout.init(0, np.float32))
    state = backend.adam_state(params)
    X, y = backend.asarray(X_train), backend.asarray(y_train)
    rng = np.random.default_rng(1)
    losses = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = backend.asarray(rng.permutation(len(X_train)))
        total = train_epoch(backend, spec, params, state, X, y, order, BATCH, LR)
        losses.append(float(total) / -(-len(X_train) // BATCH))
    seconds = time.perf_counter() - start
    outputs, _ = backend.forward(spec, params, backend.asarray(X_test))
    predicted = backend.to_host(backend.softmax(outputs)).argmax(axis=1)
    return dict(accuracy=float((predicted == y_test).mean()), epoch_losses=losses,
                train_s=seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--backends", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    data = load_mnist_sample()
    X = (data.X.astype(np.float32) / 255.0)
    X_train, y_train, X_test, y_test = X[:TRAIN], data.y[:TRAIN], X[TRAIN:], data.y[TRAIN:]
    results, errors = {}, {}
    for name in args.backends:
        try:
            r = train_and_score(get_backend(name), X_train, y_train, X_test, y_test,
                                args.epochs)
        except Exception as exc:  # report and go on: one broken backend must not hide others
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name:>5}: ERROR {errors[name]}")
            continue
        results[name] = r
        print(f"{name:>5}: test accuracy {100 * r['accuracy']:.2f}% after {args.epochs} epochs "
              f"({r['train_s']:.1f} s), epoch losses {[round(v, 4) for v in r['epoch_losses']]}")
    if len(results) > 1:
        accuracies = [r["accuracy"] for r in results.values()]
        spread = 100 * (max(accuracies) - min(accuracies))
        print(f"largest accuracy difference: {spread:.2f} points")
    with open(args.json, "w") as f:
        json.dump(dict(epochs=args.epochs, hidden=HIDDEN, batch=BATCH, results=results,
                       errors=errors), f, indent=2)
    if errors:
        raise SystemExit(f"failed: {', '.join(errors)}")


if __name__ == "__main__":
    main()
