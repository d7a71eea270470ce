"""Classify MNIST or Fashion-MNIST images read row by row: 28 steps of 28 pixels.

    python examples/mnist_rows.py                      # MNIST, or the bundled sample offline
    python examples/mnist_rows.py --dataset fashion --data-dir ../shared/data --epochs 15

Uses the full dataset (60,000 training / 10,000 test images) where it is on disk
or can be downloaded.  For MNIST without it (``--offline``, or no internet), the
10,000-image MNIST test set bundled with fastlstm is split 8,000 / 2,000.
"""

import argparse
import pickle
import sys
import time

import numpy as np
from sklearn.model_selection import train_test_split

from fastlstm import LSTMClassifier
from fastlstm.datasets import DatasetUnavailable, load_fashion_mnist, load_mnist, load_mnist_sample

LOADERS = {"mnist": load_mnist, "fashion": load_fashion_mnist}
#: training samples the default run sees, whatever the dataset: 20 epochs of the 8,000-image
#: MNIST sample (chosen for its accuracy, which the run prints), and so 3 epochs, in about the
#: same time, of a 60,000-image training set
DEFAULT_SAMPLES_SEEN = 160_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(LOADERS), default="mnist")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding mnist/ or fashion-mnist/ (default: $FASTLSTM_DATA, "
                             "then the user cache)")
    parser.add_argument("--offline", action="store_true",
                        help="never download; MNIST falls back to the bundled sample")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the training set (default: about "
                             f"{DEFAULT_SAMPLES_SEEN:,} samples seen in all: 20 epochs on the "
                             "8,000-image sample, 3 on a 60,000-image training set)")
    parser.add_argument("--hidden-size", type=int, default=128)
    # batch size and learning rate default to LSTMClassifier's own defaults
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--clip-grad-norm", type=float, default=1.0,
                        help="clip the gradient's norm to this (0: no clipping); steadies the "
                             "late epochs at this learning rate")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=None,
                        help="use only the first N training and N test images (quick runs)")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="save the fitted model: PATH ending in .npz gives fastlstm's safe "
                             "format (load with fastlstm.load, runs no code), .joblib joblib, "
                             "else pickle")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="save the learning curve (needs matplotlib)")
    return parser.parse_args(argv)


def load_data(args):
    """``(X_train, y_train, X_test, y_test, description)``."""
    loader = LOADERS[args.dataset]
    try:
        data = loader(args.data_dir, download=False if args.offline else None)
        return data.X_train, data.y_train, data.X_test, data.y_test, \
            f"{args.dataset} (full: {len(data.y_train)} train / {len(data.y_test)} test)"
    except DatasetUnavailable as exc:
        if args.dataset != "mnist":
            raise
        print(f"Full MNIST is not available ({exc})\n"
              "Using the bundled MNIST sample instead: 10,000 test-set images split "
              "8,000 train / 2,000 test.", flush=True)
    sample = load_mnist_sample()
    X_train, X_test, y_train, y_test = train_test_split(
        sample.X, sample.y, test_size=2000, stratify=sample.y, random_state=0)
    return X_train, y_train, X_test, y_test, "MNIST sample (8000 train / 2000 test)"


def save_model(model, path):
    if path.endswith(".npz"):
        model.save(path)
    elif path.endswith(".joblib"):
        import joblib

        joblib.dump(model, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(model, f)
    print(f"Model saved to {path}")


def plot_learning_curve(model, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no plot was written to {path} "
              "(pip install matplotlib).")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(model.loss_curve_) + 1)
    ax.plot(epochs, model.loss_curve_, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (cross-entropy)")
    ax.set_title("LSTMClassifier learning curve")
    fig.tight_layout()
    fig.savefig(path)
    print(f"Learning curve saved to {path}")


def main(argv=None):
    args = parse_args(argv)
    try:
        X_train, y_train, X_test, y_test, description = load_data(args)
    except DatasetUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.subset is not None:
        X_train, y_train = X_train[:args.subset], y_train[:args.subset]
        X_test, y_test = X_test[:args.subset], y_test[:args.subset]
    # The estimator never rescales X: pixels go to [0, 1] here.
    X_train = X_train.astype(np.float32) / 255
    X_test = X_test.astype(np.float32) / 255
    epochs = args.epochs or max(1, round(DEFAULT_SAMPLES_SEEN / len(y_train)))

    model = LSTMClassifier(hidden_size=args.hidden_size, batch_size=args.batch_size,
                           learning_rate_init=args.learning_rate, max_iter=epochs,
                           clip_grad_norm=args.clip_grad_norm or None,
                           device=args.device, random_state=args.seed, verbose=1)
    print(f"{description}; {X_train.shape[1]} steps of {X_train.shape[2]} pixels; {model}",
          flush=True)
    start = time.perf_counter()
    model.fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = model.score(X_test, y_test)
    predict_seconds = time.perf_counter() - start
    print(f"Test accuracy: {accuracy:.4f} ({len(y_test)} images)")
    print(f"Training: {fit_seconds:.1f} s for {model.n_iter_} epochs "
          f"({fit_seconds / model.n_iter_:.1f} s/epoch); prediction: {predict_seconds:.2f} s")
    if args.save:
        save_model(model, args.save)
    if args.plot:
        plot_learning_curve(model, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
