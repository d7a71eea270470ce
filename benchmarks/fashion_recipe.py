"""The README's Fashion-MNIST recipe: its training time and test accuracy.

Fits ``LSTMClassifier`` with the settings of :data:`RECIPE` (two bidirectional
layers, dropout between them, the adaptive learning rate on a held-out tenth,
whose best epoch is kept) on the 60,000
Fashion-MNIST training images read row by row (28 steps of 28 pixels / 255), with
``verbose=1`` (a line per epoch), then scores the 10,000 test images.  Prints the
wall and CPU time of the fit and the accuracy; the project's target is >= 91.0% in
at most 15 minutes of training on two cores.  ``--max-iter`` and ``--seed`` change
the run, ``--json`` writes the figures.

    python benchmarks/fashion_recipe.py [--data ../shared/data] [--max-iter N] [--seed S]
        [--samples N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_description  # noqa: E402
from epoch import DEFAULT_DATA  # noqa: E402

#: the recipe of the README
RECIPE = dict(hidden_size=128, num_layers=2, bidirectional=True, dropout=0.25, batch_size=128,
              learning_rate_init=2e-3, learning_rate="adaptive", early_stopping=True,
              max_iter=40)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data_home of fastlstm.datasets")
    parser.add_argument("--max-iter", type=int, default=RECIPE["max_iter"])
    parser.add_argument("--seed", type=int, default=0, help="random_state (0)")
    parser.add_argument("--samples", type=int, help="train on the first N images only (a "
                        "smoke test; the recipe's figures are for all 60,000)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    from fastlstm import LSTMClassifier
    from fastlstm.datasets import load_fashion_mnist
    data = load_fashion_mnist(args.data)
    X_train, X_test = data.X_train / np.float32(255), data.X_test / np.float32(255)
    y_train = data.y_train
    if args.samples:
        X_train, y_train = X_train[:args.samples], y_train[:args.samples]
    settings = {**RECIPE, "max_iter": args.max_iter}
    print(machine_description())
    print(f"LSTMClassifier({', '.join(f'{k}={v!r}' for k, v in settings.items())}, "
          f"random_state={args.seed})", flush=True)
    clf = LSTMClassifier(**settings, random_state=args.seed, verbose=1)
    start, cpu_start = time.perf_counter(), time.process_time()
    clf.fit(X_train, y_train)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    accuracy = clf.score(X_test, data.y_test)
    print(f"fit: {clf.n_iter_} epochs in {wall:.0f} s wall ({wall / 60:.1f} min), {cpu:.0f} s CPU; "
          f"test accuracy {accuracy:.4f} (target >= 0.910 in <= 15 min on two cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine_description(), settings=settings, seed=args.seed,
            train_samples=len(X_train), wall_s=wall,
            cpu_s=cpu, epochs=clf.n_iter_, loss_curve=clf.loss_curve_,
            test_accuracy=accuracy), indent=2))


if __name__ == "__main__":
    main()
