"""What dropout costs: training epochs with and without it, same network, same run.

One epoch (``--samples`` 60,000 x 28 x 28, H = ``--hidden`` 128, minibatches of
``--batch`` 128, Adam, cross-entropy; Fashion-MNIST where found, else random
pixels: the time does not depend on the values) on the CPU backend, in pairs:

* one layer, and one layer with ``recurrent_dropout`` (target: <= 1.10x);
* two layers, and two layers with ``dropout`` between them (target: <= 1.10x).

The rate is ``--p`` (0.25).  The four contenders run in alternating rounds
(``--repeat``, default 3) so that the load of a shared machine falls on all of
them; medians of wall and CPU time (all threads) are compared, every round is
printed.  ``python benchmarks/epoch.py`` compares the epoch without dropout with
PyTorch's.

    python benchmarks/dropout.py [--samples 60000] [--repeat 3] [--p 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import machine_description, train_epoch  # noqa: E402
from epoch import DEFAULT_DATA, load_images  # noqa: E402

#: name: (layers, (p, recurrent_p) as multiples of --p, or None)
CONTENDERS = {"1 layer": (1, None), "1 layer, recurrent_dropout": (1, (0, 1)),
              "2 layers": (2, None), "2 layers, dropout": (2, (1, 0))}
#: (with dropout, without): the ratios the project tracks
PAIRS = [("1 layer, recurrent_dropout", "1 layer"), ("2 layers, dropout", "2 layers")]


def epoch(backend, X, y, layers, dropout, args, seed):
    from fastlstm.backends import AdamConfig
    from fastlstm.dropout import Dropout
    from fastlstm.model import ModelSpec
    rng = np.random.default_rng(seed)
    spec = ModelSpec(X.shape[2], args.hidden, layers, 10)
    params = spec.layout.init(rng, np.float32)
    state = backend.adam_state(params)
    # one untimed step: compile or load the Numba kernels
    backend.train_step(spec, params.copy(), backend.adam_state(params), X[:args.batch],
                       y[:args.batch], "cross_entropy", AdamConfig(1e-3),
                       dropout=None if dropout is None else Dropout(*dropout))
    start, cpu_start = time.perf_counter(), time.process_time()
    total = train_epoch(backend, spec, params, state, X, y, rng.permutation(len(X)),
                        args.batch, 1e-3, dropout)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, float(total) / -(-len(X) // args.batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--p", type=float, default=0.25, help="the dropout rate (0.25)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    from fastlstm.backends import get_backend
    backend = get_backend("cpu")
    X, y, source = load_images(args.data, args.samples, np.random.default_rng(0))
    print(machine_description())
    print(f"data: {source}; {len(X)} x 28 x 28, H={args.hidden}, batch {args.batch}, "
          f"{backend.num_threads} threads, p={args.p}")
    rounds = {name: [] for name in CONTENDERS}
    for r in range(args.repeat):
        for name, (layers, rates) in CONTENDERS.items():
            dropout = None if rates is None else tuple(args.p * m for m in rates)
            seconds, cpu, loss = epoch(backend, X, y, layers, dropout, args, seed=r)
            rounds[name].append(dict(wall_s=seconds, cpu_s=cpu, mean_loss=loss))
            print(f"  round {r + 1}: {name:28s} {seconds:6.2f} s wall, {cpu:6.2f} s CPU, "
                  f"loss {loss:.3f}", flush=True)
    medians = {name: {key: statistics.median(run[key] for run in runs)
                      for key in ("wall_s", "cpu_s")} for name, runs in rounds.items()}
    ratios = {}
    print("medians, and with / without dropout (target <= 1.10x):")
    for name, m in medians.items():
        print(f"  {name:28s} {m['wall_s']:6.2f} s wall, {m['cpu_s']:6.2f} s CPU")
    for with_, without in PAIRS:
        ratio = {key: medians[with_][key] / medians[without][key] for key in ("wall_s", "cpu_s")}
        ratios[f"{with_} / {without}"] = ratio
        print(f"  {with_} / {without}: {ratio['wall_s']:.3f}x wall, {ratio['cpu_s']:.3f}x CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine_description(), source=source, args=vars(args), rounds=rounds,
            medians=medians, ratios=ratios), indent=2))


if __name__ == "__main__":
    main()
