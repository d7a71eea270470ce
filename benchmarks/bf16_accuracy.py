"""Fashion-MNIST test accuracy after 5 epochs: ``precision="bfloat16"`` against float32.

Fits ``LSTMClassifier`` twice with the settings of the README's recipe
(:data:`fashion_recipe.RECIPE`, but ``max_iter=5``) and the same ``random_state``, once
in each precision, on the 60,000 Fashion-MNIST training images read row by row (28
steps of 28 pixels / 255), on the CPU; then scores the 10,000 test images.  Prints each
fit's accuracy, time and the difference in points; the target is bfloat16 within 0.3
points of float32.  Needs a CPU with AVX512-BF16.

    python benchmarks/bf16_accuracy.py [--data ../shared/data] [--max-iter 5] [--seed 0]
        [--samples N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_description  # noqa: E402
from epoch import DEFAULT_DATA  # noqa: E402
from fashion_recipe import RECIPE  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data_home of fastlstm.datasets")
    parser.add_argument("--max-iter", type=int, default=5, help="epochs of each fit (5)")
    parser.add_argument("--seed", type=int, default=0, help="random_state of both fits (0)")
    parser.add_argument("--samples", type=int, help="train on the first N images only (a "
                        "smoke test; the figures are for all 60,000)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    from fastlstm import LSTMClassifier
    from fastlstm.datasets import load_fashion_mnist
    from fastlstm.kernels import gemm_bf16_cpu
    if not gemm_bf16_cpu.available():
        print("this CPU lacks AVX512-BF16 (vdpbf16ps): fastlstm has no bfloat16 here")
        sys.exit(1)
    data = load_fashion_mnist(args.data)
    X_train, X_test = data.X_train / np.float32(255), data.X_test / np.float32(255)
    y_train = data.y_train
    if args.samples:
        X_train, y_train = X_train[:args.samples], y_train[:args.samples]
    settings = {**RECIPE, "max_iter": args.max_iter, "device": "cpu"}
    machine = machine_description()
    print(machine)
    print(f"LSTMClassifier({', '.join(f'{k}={v!r}' for k, v in settings.items())}, "
          f"random_state={args.seed}, precision=...)", flush=True)
    fits = {}
    for precision in ("float32", "bfloat16"):
        clf = LSTMClassifier(**settings, random_state=args.seed, precision=precision, verbose=1)
        load = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        clf.fit(X_train, y_train)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        accuracy = clf.score(X_test, data.y_test)
        fits[precision] = dict(test_accuracy=accuracy, epochs=clf.n_iter_, wall_s=wall, cpu_s=cpu,
                               load_average_at_start=load, loss_curve=clf.loss_curve_)
        print(f"{precision}: {clf.n_iter_} epochs in {wall:.0f} s wall, {cpu:.0f} s CPU (load "
              f"average {load:.2f} at the start); test accuracy {accuracy:.4f}", flush=True)
    points = 100 * (fits["bfloat16"]["test_accuracy"] - fits["float32"]["test_accuracy"])
    print(f"bfloat16 - float32: {points:+.2f} points of test accuracy (target: within 0.3)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine, command=" ".join(sys.argv), settings=settings, seed=args.seed,
            train_samples=len(X_train), fits=fits, bfloat16_minus_float32_points=points),
            indent=2))


if __name__ == "__main__":
    main()
