"""Variable-length sequences: one training epoch and inference, fastlstm vs PyTorch, same run.

The data: ``--samples`` (4,096) sequences of uniformly random lengths from
``--min-steps`` (default: a tenth of ``--max-steps``) to ``--max-steps`` (28..280)
steps of 28 random inputs each (fixed seed), zero-padded to ``--max-steps``, and
random labels of 10 classes; the same arrays for every contender.  Training: one
epoch of Adam (lr 1e-3) in shuffled minibatches of 128 (one permutation per round,
shared by the contenders, so that every contender sees the same batches), an LSTM
with H=128, one layer, and a linear head on the last valid step's hidden state,
softmax cross-entropy.  The contenders:

* ``torch_packed``: ``nn.LSTM(batch_first=True)`` + ``nn.Linear`` on
  ``pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)``, the
  head on ``h_n[-1]``, ``torch.optim.Adam``;
* ``torch_padded``: the same network on the padded data, the head on the last of
  the ``--max-steps`` steps (what a user who ignores the lengths runs; it learns
  from the padding, and is here for its cost only);
* ``fastlstm_ragged``: the CPU backend's ``train_step(..., lengths=lengths)``, which
  neither reads nor computes a row's steps past its length;
* ``fastlstm_padded``: the CPU backend on the padded data, ``lengths=None``;
* ``fastlstm_ragged_bi``: ``ModelSpec(..., bidirectional=True)`` with the lengths
  (the head reads ``[h_forward, h_reverse]``, PyTorch's ``cat(h_n[-2], h_n[-1])``);
* ``torch_packed_bi`` (only when asked for, with ``--contenders``: several times
  ``torch_packed``, itself the slowest contender by far): ``nn.LSTM(bidirectional=True)``
  packed.

PyTorch's packed epoch is long on the CPU: the backward of each step's slice of the
packed sequence zero-fills a gradient of the whole packed batch (``SliceBackward0``,
``aten::fill_`` in its profile), so a batch costs about the square of its steps.

Then inference throughput (forward, no gradients) of each over ``--infer-samples``
of the sequences in batches of ``--infer-batch`` (1,000), with their lengths for
the packed and ragged contenders.  ``torch.set_num_threads`` is the number of
threads fastlstm uses.  The contenders run in alternating rounds (``--repeat``,
default 1: PyTorch's packed epoch alone takes minutes on 2 cores) and the medians
are compared; every round is printed, with the CPU time (all threads) beside the
wall time (on a shared machine the CPU time varies less; the epoch ratios are
printed for both).  The ratios printed are the ones the project tracks (targets in
brackets): fastlstm ragged / PyTorch packed epoch time (<= 0.25x), fastlstm ragged /
fastlstm padded (<= 0.6x; its floor is the valid steps' share of the padded ones,
printed), bidirectional / unidirectional (<= 2.1x), and the inference throughputs.
Where both fastlstm ragged and padded run, each round also takes one epoch of the two
minibatch by minibatch (:func:`fastlstm_paired_epoch`): on a machine whose speed drifts,
that ragged / padded ratio is the steadier one.

    python benchmarks/ragged.py [--samples 4096] [--min-steps 28] [--max-steps 280]
        [--hidden 128] [--batch 128] [--repeat 1] [--threads N] [--json out.json]
        [--no-torch] [--contenders NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

INPUTS, CLASSES, LR = 28, 10, 1e-3

#: every contender: (label, library, bidirectional, uses the lengths)
CONTENDERS = {
    "fastlstm_ragged": ("fastlstm ragged", "fastlstm", False, True),
    "torch_packed": ("PyTorch packed", "torch", False, True),
    "fastlstm_padded": ("fastlstm padded", "fastlstm", False, False),
    "torch_padded": ("PyTorch padded", "torch", False, False),
    "fastlstm_ragged_bi": ("fastlstm ragged bidirectional", "fastlstm", True, True),
    "torch_packed_bi": ("PyTorch packed bidirectional", "torch", True, True),
}
DEFAULT_CONTENDERS = [name for name in CONTENDERS if name != "torch_packed_bi"]

#: (key, numerator, denominator, what, target): the ratios printed and written;
#: "epoch" ratios are of epoch times (lower: the numerator is faster), "inference" ones
#: of throughputs (higher: the numerator is faster)
RATIOS = [
    ("epoch_fastlstm_ragged_over_torch_packed", "fastlstm_ragged", "torch_packed",
     "epoch", 0.25),
    ("epoch_fastlstm_ragged_over_fastlstm_padded", "fastlstm_ragged", "fastlstm_padded",
     "epoch", 0.6),
    ("epoch_fastlstm_bi_over_uni", "fastlstm_ragged_bi", "fastlstm_ragged", "epoch", 2.1),
    ("epoch_fastlstm_padded_over_torch_padded", "fastlstm_padded", "torch_padded",
     "epoch", None),
    ("epoch_torch_packed_over_torch_padded", "torch_packed", "torch_padded", "epoch", None),
    ("epoch_torch_bi_over_uni", "torch_packed_bi", "torch_packed", "epoch", None),
    ("epoch_fastlstm_bi_over_torch_bi", "fastlstm_ragged_bi", "torch_packed_bi",
     "epoch", None),
    ("inference_fastlstm_ragged_over_torch_packed", "fastlstm_ragged", "torch_packed",
     "inference", None),
    ("inference_fastlstm_ragged_over_fastlstm_padded", "fastlstm_ragged", "fastlstm_padded",
     "inference", None),
    ("inference_fastlstm_padded_over_torch_padded", "fastlstm_padded", "torch_padded",
     "inference", None),
    ("inference_fastlstm_bi_over_uni", "fastlstm_ragged_bi", "fastlstm_ragged",
     "inference", None),
    ("inference_fastlstm_bi_over_torch_bi", "fastlstm_ragged_bi", "torch_packed_bi",
     "inference", None),
]


def ragged_data(samples, min_steps, max_steps, seed=0):
    """``X`` (samples, max_steps, 28) float32, zero past each row's length; ``lengths``
    (int64, uniform in ``min_steps..max_steps``); ``y``, class labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_steps, max_steps + 1, size=samples).astype(np.int64)
    X = rng.random((samples, max_steps, INPUTS), dtype=np.float32)
    X[np.arange(max_steps)[None, :] >= lengths[:, None]] = 0
    y = rng.integers(0, CLASSES, size=samples)
    return X, lengths, y


# -- fastlstm ---------------------------------------------------------------------------

def fastlstm_model(hidden, bidirectional, rng):
    from fastlstm.backends import get_backend
    from fastlstm.model import ModelSpec
    spec = ModelSpec(INPUTS, hidden, 1, CLASSES, bidirectional=bidirectional)
    return get_backend("cpu"), spec, spec.layout.init(rng, np.float32)


def fastlstm_ready(model, X, lengths, y, order, batch):
    """``(backend, spec, params, state)``: ``model``'s, after one untimed step on a copy
    (the Numba kernels compiled or loaded, the workspace made)."""
    from fastlstm.backends import AdamConfig
    backend, spec, params = model
    idx = order[:batch]
    backend.train_step(spec, params.copy(), backend.adam_state(params), X[idx], y[idx],
                       "cross_entropy", AdamConfig(LR),
                       lengths=None if lengths is None else lengths[idx])
    return backend, spec, params, backend.adam_state(params)


def fastlstm_epoch(model, X, lengths, y, order, batch):
    """:func:`_common.train_epoch` with each minibatch's lengths (or none)."""
    from _common import train_epoch
    backend, spec, params, state = fastlstm_ready(model, X, lengths, y, order, batch)
    start, cpu_start = time.perf_counter(), time.process_time()
    total = train_epoch(backend, spec, params, state, X, y, order, batch, LR, lengths=lengths)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, total / -(-len(order) // batch)


def fastlstm_paired_epoch(model, X, lengths, y, order, batch):
    """One epoch of ``fastlstm_ragged`` and one of ``fastlstm_padded`` taken together,
    minibatch by minibatch (:func:`_common.paired_epoch`): ``(ragged seconds, padded
    seconds)``, the sums of their own steps.  A machine whose speed drifts between
    contenders' epochs (a shared one) slows both steps of a minibatch alike, so their ratio
    varies far less between rounds."""
    from _common import paired_epoch, train_step
    backend, spec, params = model
    steps = {}
    for name, lens in (("ragged", lengths), ("padded", None)):
        _, _, p, state = fastlstm_ready((backend, spec, params.copy()), X, lens, y, order, batch)
        steps[name] = train_step(backend, spec, p, state, X, y, LR, lengths=lens)
    with backend.session():
        seconds = paired_epoch(steps, order, batch)
    return seconds["ragged"], seconds["padded"]


def fastlstm_inference(model, X, lengths, batch):
    backend, spec, params = model
    lens = (lambda b: lengths[b:b + batch]) if lengths is not None else (lambda b: None)
    backend.forward(spec, params, X[:batch], lengths=lens(0))
    start = time.perf_counter()
    with backend.session():  # as the estimators' predict
        for b in range(0, len(X), batch):
            backend.forward(spec, params, X[b:b + batch], lengths=lens(b))
    return len(X) / (time.perf_counter() - start)


# -- PyTorch ----------------------------------------------------------------------------

def torch_packed_model(inputs, hidden, classes, bidirectional):
    """``nn.LSTM`` on ``pack_padded_sequence(..., enforce_sorted=False)``, ``nn.Linear``
    on ``h_n`` of the top layer (both directions' where bidirectional)."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    class PackedLSTMClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(inputs, hidden, batch_first=True, bidirectional=bidirectional)
            self.head = nn.Linear((2 if bidirectional else 1) * hidden, classes)

        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.lstm(packed)
            h = torch.cat((h_n[-2], h_n[-1]), 1) if bidirectional else h_n[-1]
            return self.head(h)

    return PackedLSTMClassifier()


def torch_model_for(name, hidden):
    import torch
    from _common import torch_model
    _, _, bidirectional, packed = CONTENDERS[name]
    torch.manual_seed(0)
    if packed:
        return torch_packed_model(INPUTS, hidden, CLASSES, bidirectional)
    return torch_model(INPUTS, hidden, CLASSES)


def torch_epoch(net, X, lengths, y, order, batch):
    """:func:`_common.torch_train_epoch`, with the lengths given to the packed model."""
    import torch
    from torch.nn.functional import cross_entropy
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    Xt, yt, order = torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(order)
    Lt = None if lengths is None else torch.from_numpy(lengths)

    def step(idx):
        opt.zero_grad(set_to_none=True)
        out = net(Xt[idx]) if Lt is None else net(Xt[idx], Lt[idx])
        loss = cross_entropy(out, yt[idx])
        loss.backward()
        opt.step()
        return loss.detach()

    step(order[:batch])  # one untimed step
    start, cpu_start = time.perf_counter(), time.process_time()
    total = 0.0
    for b in range(0, len(order), batch):
        total = total + step(order[b:b + batch])
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, float(total) / -(-len(order) // batch)


def torch_inference(net, X, lengths, batch):
    import torch
    Xt = torch.from_numpy(X)
    Lt = None if lengths is None else torch.from_numpy(lengths)

    def run(b):
        return net(Xt[b:b + batch]) if Lt is None else net(Xt[b:b + batch], Lt[b:b + batch])

    with torch.inference_mode():
        run(0)
        start = time.perf_counter()
        for b in range(0, len(X), batch):
            run(b)
    return len(X) / (time.perf_counter() - start)


# -- the run ----------------------------------------------------------------------------

def run_contender(name, args, X, lengths, y, order, Xi, Li, rng):
    _, library, bidirectional, ragged = CONTENDERS[name]
    L, Li = (lengths, Li) if ragged else (None, None)
    if library == "fastlstm":
        model = fastlstm_model(args.hidden, bidirectional, rng)
        secs, cpu, loss = fastlstm_epoch(model, X, L, y, order, args.batch)
        infer = fastlstm_inference(model, Xi, Li, args.infer_batch)
    else:
        net = torch_model_for(name, args.hidden)
        secs, cpu, loss = torch_epoch(net, X, L, y, order, args.batch)
        infer = torch_inference(net, Xi, Li, args.infer_batch)
    return dict(epoch_s=secs, epoch_cpu_s=cpu, mean_loss=loss, inference_samples_per_s=infer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="training sequences (4096)")
    parser.add_argument("--min-steps", type=int,
                        help="shortest sequence (default: a tenth of --max-steps, 28)")
    parser.add_argument("--max-steps", type=int, default=280,
                        help="longest sequence, and the padded length (280)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units H (128)")
    parser.add_argument("--batch", type=int, default=128, help="training minibatch (128)")
    parser.add_argument("--infer-samples", type=int, default=2000,
                        help="inference sequences, the first of the training set (2000)")
    parser.add_argument("--infer-batch", type=int, default=1000, help="inference batch (1000)")
    parser.add_argument("--threads", type=int, help="threads for both fastlstm and PyTorch "
                        "(default: the cores fastlstm would use)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternating rounds of every contender's epoch + inference; "
                             "medians are compared (default 1)")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS),
                        default=DEFAULT_CONTENDERS, metavar="NAME",
                        help=f"which to run, of {', '.join(CONTENDERS)} "
                             f"(default: all but torch_packed_bi)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contenders")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.min_steps is None:
        args.min_steps = max(1, args.max_steps // 10)
    if not 1 <= args.min_steps <= args.max_steps:
        parser.error("need 1 <= --min-steps <= --max-steps")

    from _common import cpu_choices_description, machine_description
    if args.threads:
        os.environ["FASTLSTM_NUM_THREADS"] = str(args.threads)
    from fastlstm.backends import get_backend
    threads = get_backend("cpu").num_threads
    machine = machine_description()
    command = shlex.join(["python", *sys.argv])
    print(machine)
    print(cpu_choices_description())
    print(f"command: {command}")

    names = [n for n in CONTENDERS if n in args.contenders]  # in the alternating order
    results = dict(machine=machine, choices=cpu_choices_description(), command=command, threads=threads, samples=args.samples,
                   min_steps=args.min_steps, max_steps=args.max_steps, inputs=INPUTS,
                   classes=CLASSES, batch=args.batch, hidden=args.hidden,
                   infer_samples=None, infer_batch=args.infer_batch, repeat=args.repeat)
    if args.no_torch:
        names = [n for n in names if CONTENDERS[n][1] != "torch"]
    elif any(CONTENDERS[n][1] == "torch" for n in names):
        try:
            import torch
        except ImportError:
            print("  PyTorch is not installed: no baseline")
            names = [n for n in names if CONTENDERS[n][1] != "torch"]
        else:
            torch.set_num_threads(threads)
            results["torch_version"] = torch.__version__
    if not names:
        parser.error("no contender left to run")

    X, lengths, y = ragged_data(args.samples, args.min_steps, args.max_steps)
    Xi, Li = X[:args.infer_samples], lengths[:args.infer_samples]
    results["infer_samples"] = len(Xi)
    work = lengths.sum() / lengths.size / args.max_steps
    results["valid_step_fraction"] = float(work)
    print(f"data: {len(X)} random sequences of {args.min_steps}..{args.max_steps} steps "
          f"(mean {lengths.mean():.1f}: {work:.1%} of the padded steps are valid), "
          f"{INPUTS} inputs, {CLASSES} classes; batch {args.batch}, H={args.hidden}, one "
          f"layer, {threads} threads; inference on {len(Xi)} in batches of "
          f"{args.infer_batch}\n")

    rng = np.random.default_rng(1)
    runs = {name: [] for name in names}
    paired = {"fastlstm_ragged", "fastlstm_padded"} <= set(names)
    results["paired_epoch_s"] = []
    width = max(len(CONTENDERS[n][0]) for n in names)
    for round_ in range(args.repeat):
        order = rng.permutation(len(X))
        for name in names:
            r = run_contender(name, args, X, lengths, y, order, Xi, Li, rng)
            runs[name].append(r)
            print(f"  round {round_ + 1}  {CONTENDERS[name][0]:{width}s}  epoch "
                  f"{r['epoch_s']:7.2f} s  (CPU time {r['epoch_cpu_s']:7.2f} s, mean loss "
                  f"{r['mean_loss']:.3f})  inference {r['inference_samples_per_s']:8,.0f} "
                  f"samples/s", flush=True)
        if paired:
            secs = fastlstm_paired_epoch(fastlstm_model(args.hidden, False, rng), X, lengths,
                                         y, order, args.batch)
            results["paired_epoch_s"].append(secs)
            print(f"  round {round_ + 1}  fastlstm ragged and padded, minibatch by minibatch: "
                  f"{secs[0]:.2f} s and {secs[1]:.2f} s ({secs[0] / secs[1]:.2f}x)", flush=True)
    medians = {name: {key: statistics.median(r[key] for r in rs)
                      for key in ("epoch_s", "epoch_cpu_s", "inference_samples_per_s")}
               for name, rs in runs.items()}
    results["runs"], results["medians"] = runs, medians
    print(f"\n  medians of {args.repeat} round{'s' if args.repeat > 1 else ''}:")
    for name, m in medians.items():
        print(f"  {CONTENDERS[name][0]:{width}s}  epoch {m['epoch_s']:7.2f} s  (CPU time "
              f"{m['epoch_cpu_s']:7.2f} s)  inference {m['inference_samples_per_s']:8,.0f} "
              f"samples/s")

    ratios, cpu_ratios, targets = {}, {}, {}
    print()
    for key, num, den, what, target in RATIOS:
        if num not in medians or den not in medians:
            continue
        if what == "epoch":
            value = medians[num]["epoch_s"] / medians[den]["epoch_s"]
            # on a shared machine the CPU time varies less than the wall time
            cpu_ratios[key] = medians[num]["epoch_cpu_s"] / medians[den]["epoch_cpu_s"]
            text = "epoch time"
        else:
            value = (medians[num]["inference_samples_per_s"]
                     / medians[den]["inference_samples_per_s"])
            text = "inference throughput"
        ratios[key] = value
        line = f"  {CONTENDERS[num][0]} / {CONTENDERS[den][0]}: {text} {value:.2f}x"
        if key in cpu_ratios:
            line += f" (CPU time {cpu_ratios[key]:.2f}x)"
        if target is not None:
            targets[key] = target
            line += f"  (target <= {target}x: {'met' if value <= target else 'NOT met'})"
        print(line)
    if paired:
        value = statistics.median(r / p for r, p in results["paired_epoch_s"])
        ratios["epoch_fastlstm_ragged_over_fastlstm_padded_paired"] = value
        print(f"  fastlstm ragged / fastlstm padded, minibatch by minibatch: epoch time "
              f"{value:.2f}x (median of the rounds' sums; target <= 0.6x: "
              f"{'met' if value <= 0.6 else 'NOT met'})")
    if "epoch_fastlstm_ragged_over_fastlstm_padded" in ratios:
        print(f"  (the valid steps are {work:.2f} of the padded ones: the floor of "
              f"ragged / padded)")
    results.update(ratios=ratios, cpu_time_ratios=cpu_ratios, targets=targets)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
