"""One training epoch and inference on ONE GPU: fastlstm's CUDA backend vs PyTorch + cuDNN.

The workload of the issue: 60,000 x 28 x 28 float32 samples (synthetic, already on the GPU),
an LSTM(28, H) + Linear(H, 10) trained with Adam and softmax cross-entropy; one epoch is timed
after a warm-up epoch, with a fresh shuffle drawn on the host and moved once per epoch, batches
taken by indexing on the device and the losses summed on the device (the estimator's loop: no
host synchronisation inside the epoch).  Inference: forward + softmax over 10,000 samples in one
batch.  TF32 is off on both sides.

fastlstm runs in several variants (persistent or per-step recurrence kernels, with or without
CUDA graphs) so one run shows which wins.  Prints a table and writes JSON:

    python benchmarks/gpu_epoch.py results.json [--samples 60000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

from _common import torch_model, torch_train_epoch, train_epoch

CONFIGS = [(128, 128), (128, 1024), (100, 50)]   # (hidden, batch)
VARIANTS = [("persistent", True), ("step", True), ("persistent", False)]
STEPS, INPUTS, CLASSES, TEST_SAMPLES, LR = 28, 28, 10, 10_000, 1e-3
INFERENCE_REPEATS = 5


def make_data(samples, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((samples, STEPS, INPUTS), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=samples)
    X_test = rng.standard_normal((TEST_SAMPLES, STEPS, INPUTS), dtype=np.float32)
    return X, y, X_test


def timed(fn, sync):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


# ----------------------------------------------------------------------------- fastlstm


def run_fastlstm(data, hidden, batch, recurrence, graphs):
    import cupy

    from fastlstm.backends.cuda import CUDABackend
    from fastlstm.model import ModelSpec

    backend = CUDABackend(recurrence=recurrence, graphs=graphs)
    sync = cupy.cuda.runtime.deviceSynchronize
    X_host, y_host, X_test_host = data
    X, y, X_test = cupy.asarray(X_host), cupy.asarray(y_host), cupy.asarray(X_test_host)
    spec = ModelSpec(INPUTS, hidden, 1, CLASSES)
    params = backend.asarray(spec.layout.init(0, np.float32))
    state = backend.adam_state(params)
    rng = np.random.default_rng(1)
    n = X.shape[0]

    def epoch():
        order = cupy.asarray(rng.permutation(n))
        return train_epoch(backend, spec, params, state, X, y, order, batch, LR)

    def infer():
        outputs, _ = backend.forward(spec, params, X_test)
        return backend.softmax(outputs)

    timed(epoch, sync)                      # warm-up: compiles, captures the graphs
    seconds, total = timed(epoch, sync)
    timed(infer, sync)
    inference = statistics.median(timed(infer, sync)[0] for _ in range(INFERENCE_REPEATS))
    return dict(train_epoch_s=seconds, inference_s=inference,
                mean_loss=float(total) / -(-n // batch),
                recurrence_forward=backend.recurrence_kind("forward", hidden, batch, np.float32),
                recurrence_backward=backend.recurrence_kind("backward", hidden, batch, np.float32),
                **recurrence_times(backend, params, batch))


def recurrence_times(backend, params, batch, repeats=20):
    """Microseconds of one layer's forward and backward recurrence alone (CUDA events), to
    tell the kernels' time from the rest of a step.  Uses the training slot the epoch made."""
    import cupy

    slot = next(s for key, s in backend._slots.items() if key[1] == batch)
    work = slot.work
    out = {}
    for name, run in (("forward", lambda: backend._forward_recurrence(work, params, 0, 1, None)),
                      ("backward", lambda: backend._backward_recurrence(
                          work, params, 0, work.backward_buffers()["dh_last"], None, None))):
        run()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(repeats):
            run()
        stop.record()
        stop.synchronize()
        out[f"{name}_recurrence_us"] = 1e3 * cupy.cuda.get_elapsed_time(start, stop) / repeats
    return out


# ----------------------------------------------------------------------------- PyTorch


def run_torch(data, hidden, batch):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    sync = torch.cuda.synchronize
    torch.manual_seed(0)
    net = torch_model(INPUTS, hidden, CLASSES).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    X_host, y_host, X_test_host = data
    X = torch.as_tensor(X_host, device=device)
    y = torch.as_tensor(y_host, device=device)
    X_test = torch.as_tensor(X_test_host, device=device)
    rng = np.random.default_rng(1)
    n = X.shape[0]

    def epoch():
        order = torch.as_tensor(rng.permutation(n), device=device)
        return torch_train_epoch(net, optimizer, X, y, order, batch)

    def infer():
        with torch.no_grad():
            return torch.softmax(net(X_test), dim=1)

    timed(epoch, sync)
    seconds, total = timed(epoch, sync)
    timed(infer, sync)
    inference = statistics.median(timed(infer, sync)[0] for _ in range(INFERENCE_REPEATS))
    return dict(train_epoch_s=seconds, inference_s=inference,
                mean_loss=float(total) / -(-n // batch))


# ----------------------------------------------------------------------------- main


def describe_machine():
    import cupy
    import torch
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return dict(gpu=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                cupy=cupy.__version__, torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), python=platform.python_version())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="where to write the results")
    parser.add_argument("--samples", type=int, default=60_000, help="training samples per epoch")
    args = parser.parse_args(argv)
    data = make_data(args.samples)
    results = dict(machine=describe_machine(), samples=args.samples, configs=[])
    print(f"{results['machine']}\n{args.samples} samples x {STEPS} x {INPUTS}, one epoch after a "
          f"warm-up; inference over {TEST_SAMPLES} samples (median of {INFERENCE_REPEATS})")
    header = (f"{'H':>4} {'batch':>5} {'impl':<26} {'epoch s':>9} {'x torch':>8} "
              f"{'infer ms':>9} {'x torch':>8} {'mean loss':>9}")
    print(header)
    print("-" * len(header))
    for hidden, batch in CONFIGS:
        entry = dict(hidden=hidden, batch=batch, torch=run_torch(data, hidden, batch), fastlstm={})
        base = entry["torch"]
        rows = [("torch cuDNN", base)]
        for recurrence, graphs in VARIANTS:
            label = f"fastlstm {recurrence}{' + graph' if graphs else ''}"
            try:
                result = run_fastlstm(data, hidden, batch, recurrence, graphs)
            except Exception as exc:  # report and go on: one broken variant must not hide others
                result = dict(error=f"{type(exc).__name__}: {exc}")
            entry["fastlstm"][label] = result
            rows.append((label, result))
        for label, r in rows:
            if "error" in r:
                print(f"{hidden:>4} {batch:>5} {label:<26} ERROR {r['error']}")
                continue
            kernels = ""
            if "forward_recurrence_us" in r:
                kernels = (f"  (recurrence alone: forward {r['forward_recurrence_us']:.0f} us, "
                           f"backward {r['backward_recurrence_us']:.0f} us)")
            print(f"{hidden:>4} {batch:>5} {label:<26} {r['train_epoch_s']:>9.4f} "
                  f"{base['train_epoch_s'] / r['train_epoch_s']:>8.2f} "
                  f"{1e3 * r['inference_s']:>9.2f} {base['inference_s'] / r['inference_s']:>8.2f} "
                  f"{r['mean_loss']:>9.4f}{kernels}")
            if label != "torch cuDNN":
                r["speedup_train"] = base["train_epoch_s"] / r["train_epoch_s"]
                r["speedup_inference"] = base["inference_s"] / r["inference_s"]
        results["configs"].append(entry)
        sys.stdout.flush()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
