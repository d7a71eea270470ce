"""Helpers shared by the benchmark scripts: timing, problem set-up, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np


def time_call(fn, repeat, warmup=1, min_time=0.0):
    """Seconds per call of ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    Returns the list of times.  With ``min_time`` > 0, calls are batched so that
    each timed sample lasts at least that long (for calls of a few microseconds).
    """
    for _ in range(warmup):
        fn()
    inner = 1
    if min_time > 0:
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        inner = max(1, int(min_time / max(once, 1e-9)))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return times


def summarize(times):
    """``(median, spread)``: spread is (max - min) / median, the relative range of the samples."""
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med if med > 0 else 0.0


def cpu_choices_description():
    """One line: the CPU backend's choices in this process (``fastlstm.backends.cpu_choices``)
    and where they come from; measuring them first where this CPU has none cached."""
    from fastlstm.backends import cpu_choices
    c = cpu_choices.cpu_choices()
    source = cpu_choices.source()
    chunks = (f"training chunks of {c.train_chunk_bytes / 2**20:g} MiB of state"
              if c.train_chunk_bytes else "no small training chunks")
    return (f"CPU backend's choices ({source}): time-loop GEMM {c.step_gemm}, weight-gradient "
            f"GEMM {c.grad_gemm}, {chunks}, at most {c.max_chunk_rows} rows a chunk")


def machine_description():
    """One line naming the CPU, the core count, the load, and the library versions."""
    import numba
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"{cpu}, {os.cpu_count()} cores, load average {load:.2f} at start; "
            f"Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}")
    try:
        import torch
        text += f", PyTorch {torch.__version__}"
    except ImportError:
        pass
    return text


def lstm_problem(batch, steps, inputs, hidden, outputs=10, dtype=np.float32, seed=0):
    """The network's spec, parameters (PyTorch's init), random inputs and class labels."""
    from fastlstm.model import ModelSpec
    rng = np.random.default_rng(seed)
    spec = ModelSpec(inputs, hidden, 1, outputs)
    params = spec.layout.init(rng, dtype)
    x = rng.random((batch, steps, inputs), dtype=np.float64).astype(dtype)
    y = rng.integers(0, outputs, size=batch)
    return spec, params, x, y


def train_step(backend, spec, params, state, X, y, lr, dropout=None, lengths=None):
    """``step(start, idx)``: one ``train_step`` of fastlstm on the minibatch ``X[idx]``,
    ``y[idx]`` (``start``: its first position in the epoch's order), as the estimators run
    it; with ``dropout`` (``(p, recurrent_p)``), masks seeded by ``start``, as the
    estimators seed them anew for every minibatch; with ``lengths``, the rows' lengths
    ``lengths[idx]``.  Returns the minibatch's loss.  Call it inside ``backend.session()``."""
    from fastlstm.backends import AdamConfig
    from fastlstm.dropout import Dropout
    config = AdamConfig(lr)

    def step(start, idx):
        drop = None if dropout is None else Dropout(*dropout, seed=start)
        return backend.train_step(spec, params, state, X[idx], y[idx], "cross_entropy", config,
                                  dropout=drop,
                                  lengths=None if lengths is None else lengths[idx])
    return step


def train_epoch(backend, spec, params, state, X, y, order, batch, lr, dropout=None,
                lengths=None):
    """One epoch as the estimators run it: in one backend session, minibatches taken from
    ``X``, ``y`` by indexing with ``order`` (a permutation, on the backend), one
    :func:`train_step` each.

    Returns the sum of the minibatch losses, left on the device (no synchronisation).
    """
    step = train_step(backend, spec, params, state, X, y, lr, dropout, lengths)
    total = 0.0
    with backend.session():
        for start in range(0, len(order), batch):
            total = total + step(start, order[start:start + batch])
    return total


def paired_epoch(steps, order, batch):
    """One epoch of each contender of ``steps`` (name: ``step(start, idx)``), minibatch by
    minibatch: every minibatch runs every contender's step in turn, the order rotated by
    one each minibatch, and each step is timed alone.  Returns name: the seconds of its
    steps.

    A shared machine's speed drifts by a quarter within seconds: between two contenders'
    whole epochs that drift is part of their ratio, between two steps of one minibatch
    (milliseconds apart) hardly.  The same goes for :func:`paired_inference`.
    """
    names = list(steps)
    seconds = dict.fromkeys(names, 0.0)
    for n, start in enumerate(range(0, len(order), batch)):
        idx = order[start:start + batch]
        for name in names[n % len(names):] + names[:n % len(names)]:
            began = time.perf_counter()
            steps[name](start, idx)
            seconds[name] += time.perf_counter() - began
    return seconds


def paired_inference(forwards, samples, batch):
    """:func:`paired_epoch` for inference: ``forwards`` (name: ``forward(rows)``, the
    predictions of the samples of the slice ``rows``) over ``samples`` samples in batches
    of ``batch``.  Returns name: samples per second."""
    def batch_of(forward):
        return lambda start, idx: forward(slice(start, start + len(idx)))
    seconds = paired_epoch({name: batch_of(f) for name, f in forwards.items()},
                           range(samples), batch)
    return {name: samples / s for name, s in seconds.items()}


def torch_model(inputs, hidden, classes):
    """The PyTorch baseline: ``nn.LSTM(inputs, hidden, batch_first=True)`` and ``nn.Linear``
    on the last step's hidden state (the model fastlstm trains)."""
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
            self.head = nn.Linear(hidden, classes)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    return LSTMClassifier()


def torch_train_step(net, optimizer, X, y, autocast=False):
    """:func:`train_step` for the PyTorch baseline: ``step(start, idx)``, one Adam step on
    softmax cross-entropy over the minibatch ``X[idx]``, ``y[idx]`` (tensors).
    ``autocast``: the forward and the loss under ``torch.autocast("cpu",
    dtype=torch.bfloat16)``, the backward after it, as PyTorch's documentation has it.
    Returns the loss, a tensor."""
    import torch
    from torch.nn.functional import cross_entropy

    def step(start, idx):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = cross_entropy(net(X[idx]), y[idx])
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def torch_train_epoch(net, optimizer, X, y, order, batch, autocast=False):
    """:func:`train_epoch` for the PyTorch baseline: :func:`torch_train_step` over the
    minibatches taken with ``order`` (a tensor beside ``X``).

    Returns the sum of the minibatch losses, left on the device (no synchronisation).
    """
    step = torch_train_step(net, optimizer, X, y, autocast)
    total = 0.0
    for start in range(0, len(order), batch):
        total = total + step(start, order[start:start + batch])
    return total
