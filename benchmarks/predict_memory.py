"""Peak memory of ``predict_proba`` on a large uint8 MNIST-shaped input.

Fits a small classifier on 2,000 random images, then makes ``N`` random
uint8 images of 28 x 28 and predicts them.  Prints the peak resident memory of
the process (``ru_maxrss``) before and after the prediction, the growth, the
size of ``X`` and of a float32 copy of it, and the seconds taken:

    python benchmarks/predict_memory.py [--n 1000000] [--hidden-size 8]

Run it in a fresh process: ``ru_maxrss`` only ever grows.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from fastlstm import LSTMClassifier

MIB = 2**20


def peak_rss():
    """Peak resident set size of this process so far, in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--hidden-size", type=int, default=8)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    clf = LSTMClassifier(hidden_size=args.hidden_size, max_iter=1, device="cpu", random_state=0)
    clf.fit(rng.integers(0, 256, (2000, 28, 28), dtype=np.uint8) / 255, rng.integers(0, 10, 2000))
    X = rng.integers(0, 256, (args.n, 28, 28), dtype=np.uint8)
    clf.predict_proba(X[:2048])  # compile and warm up at the size of the batches
    before = peak_rss()
    start = time.perf_counter()
    proba = clf.predict_proba(X)
    seconds = time.perf_counter() - start
    after = peak_rss()
    print(f"predict_proba on {args.n:,} x 28 x 28 uint8 (hidden_size={args.hidden_size}): "
          f"{seconds:.1f} s")
    print(f"X: {X.nbytes / MIB:.0f} MiB; a float32 copy of X: {X.size * 4 / MIB:.0f} MiB; "
          f"the output (float64): {proba.nbytes / MIB:.0f} MiB")
    print(f"peak RSS before: {before / MIB:.0f} MiB, after: {after / MIB:.0f} MiB, "
          f"growth: {(after - before) / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
