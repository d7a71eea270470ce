"""Accuracy on ragged sequences: fastlstm against PyTorch's packed LSTM, same settings.

The task: MNIST read row by row (the 10,000 images that ship with fastlstm, split
8,000 / 2,000), each image cut to a random number of its first rows (``--min-rows`` to
28), the label kept.  Both models are one LSTM layer of ``--hidden`` units and a linear
head on each sequence's last valid hidden state, trained with Adam (learning rate
2e-3, minibatches of 64, shuffled every epoch) for ``--epochs`` epochs on the same
sequences:

- fastlstm: ``LSTMClassifier`` fitted on the list of sequences (variable length);
- PyTorch: ``nn.LSTM`` on ``pack_padded_sequence`` + ``nn.Linear`` on ``h_n[-1]``;
- fastlstm on the same sequences zero-padded to 28 rows as fixed-length input, the
  naive alternative: what padding costs in accuracy.

Prints the test accuracy of each (and the wall time of its training), the difference
between fastlstm and PyTorch (the project's target: within 1 point), and writes JSON
with ``--json``.

    python benchmarks/ragged_accuracy.py [--epochs 10] [--seeds 0 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description  # noqa: E402

LEARNING_RATE, BATCH = 2e-3, 64


def ragged_mnist(min_rows, seed, n_train=8000):
    """``(train, test)``, each ``(sequences, labels)``: images cut to random numbers of rows."""
    from fastlstm.datasets import load_mnist_sample

    X, y = load_mnist_sample(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    X, y = X[order].astype(np.float32) / 255.0, y[order]
    lengths = rng.integers(min_rows, 29, len(X))
    seqs = [image[:n] for image, n in zip(X, lengths)]
    return (seqs[:n_train], y[:n_train]), (seqs[n_train:], y[n_train:])


def padded(seqs, steps=28):
    out = np.zeros((len(seqs), steps, seqs[0].shape[1]), np.float32)
    for row, seq in enumerate(seqs):
        out[row, :len(seq)] = seq
    return out


def fastlstm_accuracy(train, test, hidden, epochs, seed, pad):
    from fastlstm import LSTMClassifier

    clf = LSTMClassifier(hidden_size=hidden, max_iter=epochs, batch_size=BATCH,
                         learning_rate_init=LEARNING_RATE, random_state=seed, device="cpu")
    start = time.perf_counter()
    clf.fit(padded(train[0]) if pad else train[0], train[1])
    seconds = time.perf_counter() - start
    return clf.score(padded(test[0]) if pad else test[0], test[1]), seconds


def torch_accuracy(train, test, hidden, epochs, seed, threads):
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(seed)
    torch.set_num_threads(threads)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(28, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.lstm(packed)
            return self.head(h_n[-1])

    def tensors(seqs, labels):
        return (torch.from_numpy(padded(seqs)), torch.tensor([len(s) for s in seqs]),
                torch.from_numpy(np.asarray(labels)))

    X, L, y = tensors(*train)
    net = Packed()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        for lo in range(0, len(X), BATCH):
            idx = order[lo:lo + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(X[idx], L[idx]), y[idx])
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    X, L, y = tensors(*test)
    with torch.inference_mode():
        predicted = net(X, L).argmax(dim=1)
    return float((predicted == y).float().mean()), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--min-rows", type=int, default=8, help="fewest rows kept (8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    print(machine_description())
    print(f"ragged MNIST rows: {args.train_samples} training sequences of {args.min_rows}-28 "
          f"rows, H={args.hidden}, {args.epochs} epochs, Adam {LEARNING_RATE}, batch {BATCH}, "
          f"{args.threads} threads")
    rows = []
    for seed in args.seeds:
        train, test = ragged_mnist(args.min_rows, seed, args.train_samples)
        row = dict(seed=seed)
        row["fastlstm"], row["fastlstm_s"] = fastlstm_accuracy(train, test, args.hidden,
                                                               args.epochs, seed, pad=False)
        row["fastlstm_padded"], row["fastlstm_padded_s"] = fastlstm_accuracy(
            train, test, args.hidden, args.epochs, seed, pad=True)
        if not args.no_torch:
            row["torch_packed"], row["torch_packed_s"] = torch_accuracy(
                train, test, args.hidden, args.epochs, seed, args.threads)
        rows.append(row)
        print(f"seed {seed}: fastlstm {row['fastlstm']:.4f} ({row['fastlstm_s']:.1f} s), "
              f"fastlstm zero-padded {row['fastlstm_padded']:.4f} "
              f"({row['fastlstm_padded_s']:.1f} s)"
              + ("" if args.no_torch else f", PyTorch packed {row['torch_packed']:.4f} "
                 f"({row['torch_packed_s']:.1f} s)"), flush=True)
    summary = {key: float(np.mean([row[key] for row in rows]))
               for key in rows[0] if key != "seed"}
    print(f"mean over seeds {args.seeds}: fastlstm {summary['fastlstm']:.4f}, zero-padded "
          f"{summary['fastlstm_padded']:.4f}", end="")
    if not args.no_torch:
        gap = 100 * (summary["fastlstm"] - summary["torch_packed"])
        summary["points_vs_torch"] = gap
        print(f", PyTorch packed {summary['torch_packed']:.4f}: fastlstm {gap:+.2f} points "
              "(target: within 1)")
    else:
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine_description(),
                                                   args=vars(args), runs=rows,
                                                   mean=summary), indent=2))


if __name__ == "__main__":
    main()
