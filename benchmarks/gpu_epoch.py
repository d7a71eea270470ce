"""One training epoch and inference on ONE GPU: fastlstm's CUDA backend vs PyTorch + cuDNN.

The workload of the issue: 60,000 x 28 x 28 float32 samples (synthetic, already on the GPU),
an LSTM(28, H) + Linear(H, 10) trained with Adam and softmax cross-entropy; one epoch is timed
after a warm-up epoch, with a fresh shuffle drawn on the host and moved once per epoch, batches
taken by indexing on the device and the losses summed on the device (the estimator's loop: no
host synchronisation inside the epoch).  Inference: forward + softmax over 10,000 samples in one
batch.  TF32 is off on both sides.

PyTorch runs three ways: eager with its default (foreach) Adam, eager with ``fused=True``, and
the whole step captured in a CUDA graph (:mod:`torch_graph`), so "x torch" is read against an
eager baseline that pays per-launch host overhead and beside one that does not.  fastlstm runs
in several variants (persistent or per-step recurrence kernels, cuBLAS or its own GEMM
kernels, with or without CUDA graphs).
A row is labelled "graph" only when graphs were really replayed in the timed epoch (fastlstm:
``CUDABackend.graph_replays``); otherwise it says "no graph" and the JSON says why.  The
issue's targets are printed as pass/fail lines computed from the measured rows.  Prints a
table and writes JSON (rewritten after each configuration, so a run cut short keeps what
finished):

    python benchmarks/gpu_epoch.py results.json [--samples 60000]

``--device cpu`` runs PyTorch's rows on the CPU (the graph row then runs its static-buffer
step without a graph) and reports why fastlstm's cannot run: a smoke test without a GPU.
"""

from __future__ import annotations

import argparse
import json
import operator
import platform
import statistics
import sys
import time
import warnings

import numpy as np

from _common import torch_model, torch_train_epoch, train_epoch
from torch_graph import TorchStaticSteps

CONFIGS = [(128, 128), (128, 1024), (100, 50)]   # (hidden, batch), the headline one first
#: (recurrence, graphs, gemm): each kind of recurrence kernel and of GEMM with graphs, and the
#: default without
FASTLSTM_VARIANTS = [("persistent", True, "cublas"), ("persistent", True, "kernels"),
                     ("step", True, "cublas"), ("persistent", False, "cublas")]
STEPS, INPUTS, CLASSES, TEST_SAMPLES, LR = 28, 28, 10, 10_000, 1e-3
INFERENCE_REPEATS = 5

#: the issue's targets: (hidden, batch, figure, against, comparison, bound).  ``against`` None
#: bounds fastlstm's own figure; else the figure is that PyTorch row's over fastlstm's (a
#: speedup).  fastlstm's figure is its best row that ran.
TARGETS = [
    (128, 128, "train_epoch_s", None, "<=", 0.2),
    (128, 128, "train_epoch_s", "eager", ">=", 5.0),
    (128, 128, "train_epoch_s", "graph", ">", 1.0),
    (128, 1024, "train_epoch_s", "eager", ">=", 2.5),
    (128, 128, "inference_s", "eager", ">=", 3.0),
    (128, 1024, "inference_s", "eager", ">=", 3.0),
]
_COMPARE = {"<=": operator.le, ">=": operator.ge, ">": operator.gt}


def make_data(samples, test_samples, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, STEPS, INPUTS), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=samples)
    X_test = rng.standard_normal((test_samples, STEPS, INPUTS), dtype=np.float32)
    return X, y, X_test


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def measure(epoch, infer, sync, batches):
    """A warm-up epoch, the timed epoch, then the median inference: the figures of one row."""
    timed(epoch, sync)                      # warm-up: compiles, captures the graphs
    seconds, total = timed(epoch, sync)
    timed(infer, sync)
    inference = statistics.median(timed(infer, sync)[0] for _ in range(INFERENCE_REPEATS))
    return dict(train_epoch_s=seconds, inference_s=inference, mean_loss=float(total) / batches)


# ----------------------------------------------------------------------------- fastlstm


def graph_status(graphs, replays_before, replays_after, caught=()):
    """Whether fastlstm's timed epoch replayed CUDA graphs, from ``CUDABackend.graph_replays``
    read before and after it (``None``: the backend has no such counter), and if not, why
    (``caught``: the warnings' messages, which say why a capture failed)."""
    if replays_before is None or replays_after is None:
        return dict(graph=False, graph_replays=None,
                    no_graph_reason="this CUDABackend has no graph_replays counter, so no "
                                    "replay can be shown")
    replays = replays_after - replays_before
    if replays > 0:
        return dict(graph=True, graph_replays=replays)
    reason = ("graphs=False" if not graphs else
              "graphs=True, but no CUDA graph was replayed in the timed epoch")
    if caught:
        reason += " (warnings: " + "; ".join(caught) + ")"
    return dict(graph=False, graph_replays=replays, no_graph_reason=reason)


def run_fastlstm(data, hidden, batch, recurrence, graphs, gemm):
    import cupy

    from fastlstm.backends.cuda import CUDABackend
    from fastlstm.model import ModelSpec

    backend = CUDABackend(recurrence=recurrence, graphs=graphs, gemm=gemm)
    sync = cupy.cuda.runtime.deviceSynchronize
    X_host, y_host, X_test_host = data
    X, y, X_test = cupy.asarray(X_host), cupy.asarray(y_host), cupy.asarray(X_test_host)
    spec = ModelSpec(INPUTS, hidden, 1, CLASSES)
    params = backend.asarray(spec.layout.init(0, np.float32))
    state = backend.adam_state(params)
    rng = np.random.default_rng(1)
    n = X.shape[0]
    replays = []

    def epoch():
        order = cupy.asarray(rng.permutation(n))
        replays.append(getattr(backend, "graph_replays", None))
        return train_epoch(backend, spec, params, state, X, y, order, batch, LR)

    def infer():
        outputs, _ = backend.forward(spec, params, X_test)
        return backend.softmax(outputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure(epoch, infer, sync, -(-n // batch))
    messages = sorted({str(w.message) for w in caught})
    # replays[1] was read as the timed epoch began; the inference that followed replays no
    # training graph
    result.update(graph_status(graphs, replays[1], getattr(backend, "graph_replays", None),
                               messages),
                  warnings=messages,
                  recurrence_forward=backend.recurrence_kind("forward", hidden, batch, np.float32),
                  recurrence_backward=backend.recurrence_kind("backward", hidden, batch,
                                                              np.float32),
                  **recurrence_times(backend, params, batch))
    return result


def recurrence_times(backend, params, batch, repeats=20):
    """Microseconds of one layer's forward and backward recurrence alone (CUDA events), to
    tell the kernels' time from the rest of a step.  Uses the training slot the epoch made,
    through the backend's private methods: where they changed, says so instead."""
    import cupy

    try:
        slot = next(s for key, s in backend._slots.items() if key[1] == batch)
        work, kind = slot.work, backend.recurrence
        dh_last = work.backward_buffers()["dh_last"]
        runs = (("forward", lambda: backend._forward_recurrence(work, params, 0, 0, 1, kind)),
                ("backward", lambda: backend._backward_recurrence(work, params, 0, 0, dh_last,
                                                                  None, kind)))
        out = {}
        for name, run in runs:
            run()
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(repeats):
                run()
            stop.record()
            stop.synchronize()
            out[f"{name}_recurrence_us"] = 1e3 * cupy.cuda.get_elapsed_time(start, stop) / repeats
    except Exception as exc:  # the epoch's figures stand without these
        return dict(recurrence_error=f"{type(exc).__name__}: {exc}")
    return out


# ----------------------------------------------------------------------------- PyTorch


def torch_optimizer(parameters, variant):
    """Adam as each PyTorch row runs it: the default (foreach) for "eager", ``fused=True``
    for "fused", and fused with ``capturable=True`` (its step count on the device) for
    "graph"."""
    import torch
    if variant == "eager":
        return torch.optim.Adam(parameters, lr=LR)
    return torch.optim.Adam(parameters, lr=LR, fused=True, capturable=variant == "graph")


def run_torch(data, hidden, batch, variant, device="cuda"):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = torch_model(INPUTS, hidden, CLASSES).to(device)
    optimizer = torch_optimizer(net.parameters(), variant)
    X_host, y_host, X_test_host = data
    X = torch.as_tensor(X_host, device=device)
    y = torch.as_tensor(y_host, device=device)
    X_test = torch.as_tensor(X_test_host, device=device)
    rng = np.random.default_rng(1)
    n = X.shape[0]
    static = TorchStaticSteps(net, optimizer, X, y) if variant == "graph" else None
    replays = []

    def epoch():
        order = torch.as_tensor(rng.permutation(n), device=device)
        if static is not None:
            replays.append(static.replays)
            return static.train_epoch(order, batch)
        return torch_train_epoch(net, optimizer, X, y, order, batch)

    def infer():
        with torch.no_grad():
            return torch.softmax(net(X_test), dim=1)

    result = measure(epoch, infer, sync, -(-n // batch))
    if static is not None:
        timed_replays = static.replays - replays[1]  # in the timed epoch, as for fastlstm
        result.update(graph=timed_replays > 0, graph_replays=timed_replays)
        if not timed_replays:
            result["no_graph_reason"] = f"CUDA graphs need a CUDA device, not {device}"
    return result


# ----------------------------------------------------------------------------- rows, targets


def row_label(impl, variant, result):
    """The table's name of a row: what ran, "+ graph" only where graphs were replayed, and
    for a row that failed, what was asked of it."""
    if impl == "torch":
        name = "torch eager" if variant == "eager" else "torch fused Adam"
        asked_graph = variant == "graph"
    else:
        name, asked_graph = f"fastlstm {variant[0]} ({variant[2]} GEMMs)", variant[1]
    if "error" in result:
        return name + (", graph asked" if asked_graph else "")
    if result.get("graph"):
        return name + " + graph"
    return name + (", no graph" if asked_graph or impl == "fastlstm" else "")


def run_config(data, hidden, batch, device):
    """Every row of one (hidden, batch): PyTorch's eager variants, fastlstm's, then PyTorch's
    captured one (last: a capture that fails midway should not disturb the other rows)."""
    rows = []

    def torch_jobs(variants):
        return [("torch", v, lambda v=v: run_torch(data, hidden, batch, v, device))
                for v in variants]
    jobs = (torch_jobs(("eager", "fused"))
            + [("fastlstm", v, lambda v=v: run_fastlstm(data, hidden, batch, *v))
               for v in FASTLSTM_VARIANTS]
            + torch_jobs(("graph",)))
    for impl, variant, job in jobs:
        try:
            result = job()
        except Exception as exc:  # report and go on: one broken variant must not hide others
            result = dict(error=f"{type(exc).__name__}: {exc}")
        name = variant if impl == "torch" else \
            f"{variant[0]}, graphs={variant[1]}, gemm={variant[2]}"
        row = dict(impl=impl, variant=name, label=row_label(impl, variant, result), **result)
        eager = rows[0] if rows else row  # the first job
        if "error" not in row and "error" not in eager and row is not eager:
            row["speedup_train"] = eager["train_epoch_s"] / row["train_epoch_s"]
            row["speedup_inference"] = eager["inference_s"] / row["inference_s"]
        rows.append(row)
        print_row(hidden, batch, row)  # as it comes: a run cut short still shows it
    return dict(hidden=hidden, batch=batch, rows=rows)


def evaluate_targets(configs):
    """Each of :data:`TARGETS` against the measured ``configs`` (the JSON's list): a dict
    with the figure, the bound and ``met`` (``None`` where a row it needs did not run, or a
    PyTorch graph row ran without a graph)."""
    out = []
    for hidden, batch, figure, against, comparison, bound in TARGETS:
        what = {"train_epoch_s": "epoch", "inference_s": "inference"}[figure]
        name = (f"H={hidden} batch={batch}: fastlstm {what} s {comparison} {bound}"
                if against is None else
                f"H={hidden} batch={batch}: torch {against} {what} / fastlstm {what} "
                f"{comparison} {bound}")
        target = dict(name=name, bound=bound, value=None, fastlstm_row=None, met=None)
        out.append(target)
        entry = next((c for c in configs if (c["hidden"], c["batch"]) == (hidden, batch)), None)
        if entry is None:
            target["missing"] = "configuration not run"
            continue
        ran = [r for r in entry["rows"] if r["impl"] == "fastlstm" and "error" not in r]
        if not ran:
            target["missing"] = "no fastlstm row ran"
            continue
        best = min(ran, key=lambda r: r[figure])
        target["fastlstm_row"] = best["label"]
        value = best[figure]
        if against is not None:
            base = next(r for r in entry["rows"]
                        if r["impl"] == "torch" and r["variant"] == against)
            if "error" in base or (against == "graph" and not base.get("graph")):
                target["missing"] = f"the torch {against} row did not run as such"
                continue
            value = base[figure] / value
        target["value"] = value
        target["met"] = bool(_COMPARE[comparison](value, bound))
    return out


def print_row(hidden, batch, r):
    label = r["label"]
    if "error" in r:
        print(f"{hidden:>4} {batch:>5} {label:<34} ERROR {r['error']}")
        return
    kernels = ""
    if "forward_recurrence_us" in r:
        kernels = (f"  (recurrence alone: forward {r['forward_recurrence_us']:.0f} us, "
                   f"backward {r['backward_recurrence_us']:.0f} us)")
    train, infer = (f"{r[k]:>8.2f}" if k in r else " " * 8
                    for k in ("speedup_train", "speedup_inference"))
    print(f"{hidden:>4} {batch:>5} {label:<34} {r['train_epoch_s']:>9.4f} {train} "
          f"{1e3 * r['inference_s']:>9.2f} {infer} {r['mean_loss']:>9.4f}{kernels}")
    for key in ("no_graph_reason", "recurrence_error"):
        if key in r:
            print(f"{'':>11} {key.replace('_', ' ')}: {r[key]}")
    sys.stdout.flush()


def print_targets(targets):
    for t in targets:
        if t["met"] is None:
            print(f"target {t['name']}: NOT MEASURED ({t['missing']})")
            continue
        print(f"target {t['name']}: {t['value']:.3f} ({t['fastlstm_row']}): "
              f"{'PASS' if t['met'] else 'FAIL'}")


def describe_machine(device):
    """The GPU and the libraries; a part that cannot be read says why instead."""
    machine = dict(python=platform.python_version(), device=device)
    try:
        import torch
        machine.update(torch=torch.__version__, cudnn=torch.backends.cudnn.version())
    except Exception as exc:
        machine["torch"] = f"{type(exc).__name__}: {exc}"
    try:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        machine.update(gpu=name.decode() if isinstance(name, bytes) else name,
                       cupy=cupy.__version__)
    except Exception as exc:
        machine["gpu"] = f"{type(exc).__name__}: {exc}"
    return machine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="where to write the results")
    parser.add_argument("--samples", type=int, default=60_000, help="training samples per epoch")
    parser.add_argument("--test-samples", type=int, default=TEST_SAMPLES,
                        help="samples of the inference batch")
    parser.add_argument("--device", default="cuda", help="where PyTorch runs (cpu: smoke test)")
    args = parser.parse_args(argv)
    data = make_data(args.samples, args.test_samples)
    results = dict(machine=describe_machine(args.device), samples=args.samples,
                   test_samples=args.test_samples, configs=[], targets=[])
    print(f"{results['machine']}\n{args.samples} samples x {STEPS} x {INPUTS}, one epoch after a "
          f"warm-up; inference over {args.test_samples} samples (median of "
          f"{INFERENCE_REPEATS}); x torch: against torch eager")
    header = (f"{'H':>4} {'batch':>5} {'impl':<34} {'epoch s':>9} {'x torch':>8} "
              f"{'infer ms':>9} {'x torch':>8} {'mean loss':>9}")
    print(header)
    print("-" * len(header))
    for hidden, batch in CONFIGS:
        entry = run_config(data, hidden, batch, args.device)
        results["configs"].append(entry)
        results["targets"] = evaluate_targets(results["configs"])
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print_targets(results["targets"])
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
