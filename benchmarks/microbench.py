"""Kernel microbenchmarks: every fastlstm backend here, and PyTorch's equivalent as the baseline.

Operations, for one minibatch of an LSTM (one layer) with a linear head of 10 outputs:

  forward-train   forward over the whole sequence, keeping what backward needs
  forward-infer   forward over the whole sequence, keeping nothing per step
  backward        backpropagation through time + weight gradients (from a saved forward)
  head+loss       linear head, softmax cross-entropy, and their gradients
  adam            one Adam update of every parameter (one flat buffer in fastlstm)

Each is run once to warm up (compilation, caches), then --repeat times; the
table shows the median time, the spread ((max - min) / median) and the GFLOP/s
achieved at the median (GEMM flops counted as 2*m*n*k; Adam as 12 flops per
parameter).  Backends: "reference" (NumPy, the oracle), "cpu" (Numba kernels)
and "cuda" where a GPU is usable; "torch" is PyTorch's nn.LSTM / nn.Linear /
cross_entropy / optim.Adam on the CPU with torch.set_num_threads equal to the
threads fastlstm's CPU backend uses (benchmarks/gpu_epoch.py compares GPUs).

Sizes: one configuration (--batch, --steps, --inputs, --hidden; default
B=128, T=28, I=28, H=128, float32), and optional sweeps over the hidden size
(--sweep-hidden, default values 32..512) and the batch (--sweep-batch, 1..1024).
The NumPy reference is timed at the single configuration only: it is far too
slow for the sweeps (--reference-in-sweeps forces it).

Examples:
    python benchmarks/microbench.py
    python benchmarks/microbench.py --sweep-hidden --sweep-batch --json bench.json
    python benchmarks/microbench.py --ops forward-infer --sweep-batch 1,1000 --backends cpu torch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import lstm_problem, machine_description, summarize, time_call  # noqa: E402

OPS = ("forward-train", "forward-infer", "backward", "head+loss", "adam")
OUTPUTS = 10
HIDDEN_SWEEP = (32, 64, 128, 256, 512)
BATCH_SWEEP = (1, 8, 32, 128, 512, 1024)


def flops(op, B, T, I, H, n_params):
    G = 4 * H
    head = 2 * B * H * OUTPUTS
    lstm = 2 * B * T * G * (I + H)                 # every step: [x_t, h] @ [W_ih, W_hh]^T
    return {"forward-train": lstm + head, "forward-infer": lstm + head,
            "backward": lstm + 2 * B * T * G * H + 2 * head,   # weight grads + dh recurrence
            "head+loss": 3 * head, "adam": 12 * n_params}[op]


def fastlstm_ops(name, B, T, I, H, dtype):
    """{op: zero-argument callable} for the fastlstm backend ``name``."""
    from fastlstm.backends import AdamConfig, get_backend
    backend = get_backend(name)
    spec, params, x, y = lstm_problem(B, T, I, H, OUTPUTS, dtype)
    xp = backend.xp
    params, x, y = backend.asarray(params), backend.asarray(x), backend.asarray(y)
    outputs, cache = backend.forward(spec, params, x, train=True)
    _, doutputs = backend.loss(outputs, y, "cross_entropy")
    grads = backend.backward(spec, params, cache, doutputs).params
    state = backend.adam_state(params)
    views = spec.layout.views(params)
    w, b = views["head.weight"], views["head.bias"]
    h = xp.asarray(np.random.default_rng(1).standard_normal((B, H)).astype(dtype))
    sync = lambda: None  # noqa: E731
    if name == "cuda":  # GPU work is asynchronous: time it to completion
        import cupy
        sync = cupy.cuda.Device().synchronize

    def head_loss():
        out = h @ w.T + b
        _, d = backend.loss(out, y, "cross_entropy")
        return d.T @ h, d.sum(axis=0), d @ w

    def synced(fn):
        def call():
            fn()
            sync()
        return call

    ops = {"forward-train": lambda: backend.forward(spec, params, x, train=True),
           "forward-infer": lambda: backend.forward(spec, params, x, train=False),
           "backward": lambda: backend.backward(spec, params, cache, doutputs),
           "head+loss": head_loss,
           "adam": lambda: backend.adam_step(params, grads, state, AdamConfig(1e-3))}
    return {op: synced(fn) for op, fn in ops.items()}, spec.layout.size


def torch_ops(B, T, I, H, dtype):
    import torch
    from torch import nn
    torch.manual_seed(0)
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    lstm = nn.LSTM(I, H, batch_first=True).to(tdtype)
    head = nn.Linear(H, OUTPUTS).to(tdtype)
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.rand(B, T, I, dtype=tdtype)
    y = torch.randint(0, OUTPUTS, (B,))
    h = torch.randn(B, H, dtype=tdtype, requires_grad=True)
    out, _ = lstm(x)
    last = out[:, -1]
    dlast = torch.randn_like(last)
    for p in params:
        p.grad = torch.randn_like(p)

    def forward_train():
        with torch.enable_grad():
            return lstm(x)

    def forward_infer():
        with torch.inference_mode():
            return lstm(x)

    def backward():
        torch.autograd.backward(last, dlast, retain_graph=True)

    def head_loss():
        loss = nn.functional.cross_entropy(head(h), y)
        loss.backward()

    ops = {"forward-train": forward_train, "forward-infer": forward_infer, "backward": backward,
           "head+loss": head_loss, "adam": opt.step}
    return ops, sum(p.numel() for p in params)


def available(names):
    from fastlstm.backends import available_backends
    here = set(available_backends())
    out = []
    for name in names:
        if name == "torch":
            try:
                import torch  # noqa: F401
            except ImportError:
                print("PyTorch is not installed: no baseline")
                continue
        elif name not in here:
            print(f"backend {name!r} is not available here: skipped")
            continue
        out.append(name)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", "-B", type=int, default=128)
    parser.add_argument("--steps", "-T", type=int, default=28)
    parser.add_argument("--inputs", "-I", type=int, default=28)
    parser.add_argument("--hidden", "-H", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--sweep-hidden", nargs="?", const=",".join(map(str, HIDDEN_SWEEP)),
                        metavar="H,H,...", help="also sweep the hidden size (default list "
                        f"{','.join(map(str, HIDDEN_SWEEP))}), other sizes as given")
    parser.add_argument("--sweep-batch", nargs="?", const=",".join(map(str, BATCH_SWEEP)),
                        metavar="B,B,...", help="also sweep the batch size (default list "
                        f"{','.join(map(str, BATCH_SWEEP))}), other sizes as given")
    parser.add_argument("--backends", nargs="+", default=["reference", "cpu", "cuda", "torch"],
                        help="what to time (default: all that are available here)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per measurement (15)")
    parser.add_argument("--reference-in-sweeps", action="store_true",
                        help="time the (slow) NumPy reference in the sweeps too")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = parser.parse_args()

    dtype = np.dtype(args.dtype).type
    backends = available(args.backends)
    threads = None
    if "cpu" in backends or "torch" in backends:
        from fastlstm.backends import get_backend
        threads = get_backend("cpu").num_threads
    if "torch" in backends:
        import torch
        torch.set_num_threads(threads)

    base = (args.batch, args.steps, args.inputs, args.hidden)
    configs = [("single", base)]
    if args.sweep_hidden:
        configs += [("hidden", (base[0], base[1], base[2], int(h)))
                    for h in args.sweep_hidden.split(",")]
    if args.sweep_batch:
        configs += [("batch", (int(b),) + base[1:]) for b in args.sweep_batch.split(",")]

    print(machine_description())
    print(f"{args.dtype}, {threads} threads (fastlstm cpu and torch), median of {args.repeat} "
          "runs after a warm-up; spread = (max - min) / median\n")
    header = f"{'B':>5} {'T':>3} {'I':>3} {'H':>4}  {'op':<14} {'backend':<10} " \
             f"{'median ms':>10} {'spread':>7} {'GFLOP/s':>8}  {'vs torch':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for kind, (B, T, I, H) in configs:
        row_backends = [b for b in backends if b != "reference" or kind == "single"
                        or args.reference_in_sweeps]
        table = {}
        for name in row_backends:
            ops, n_params = (torch_ops(B, T, I, H, dtype) if name == "torch"
                             else fastlstm_ops(name, B, T, I, H, dtype))
            repeat = max(3, args.repeat // 5) if name == "reference" else args.repeat
            for op in args.ops:
                times = time_call(ops[op], repeat, warmup=1, min_time=0.02)
                med, spread = summarize(times)
                gflops = flops(op, B, T, I, H, n_params) / med / 1e9
                table[op, name] = med
                results.append(dict(sweep=kind, batch=B, steps=T, inputs=I, hidden=H, op=op,
                                    backend=name, median_s=med, spread=spread, gflops=gflops,
                                    times_s=times, dtype=args.dtype, threads=threads))
        for op in args.ops:
            for name in row_backends:
                med = table[op, name]
                rel = table.get((op, "torch"))
                ratio = f"{rel / med:7.2f}x" if rel and name != "torch" else ""
                r = next(r for r in results if r["op"] == op and r["backend"] == name
                         and (r["batch"], r["hidden"]) == (B, H) and r["sweep"] == kind)
                print(f"{B:>5} {T:>3} {I:>3} {H:>4}  {op:<14} {name:<10} {med * 1e3:10.3f} "
                      f"{r['spread']:6.0%} {r['gflops']:8.1f}  {ratio:>8}")
        print()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.2f}   ('vs torch' = torch time / this time: "
          "above 1 is faster than PyTorch)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine_description(),
                                                   results=results), indent=1))


if __name__ == "__main__":
    main()
