"""The LSTM kernels' loops in 256-bit and in 512-bit registers, side by side.

On a target with AVX-512, ``lstm_cpu.forward_layer`` and ``backward_layer`` vectorise
their loops (the gate math) in 256-bit registers, and ``forward_layer_full_width``
and ``backward_layer_full_width``, the same kernels, in 512-bit ones
(:func:`fastlstm.kernels._cpu_features.prefer_vector_bits`); the backend runs the
second pair from ``lstm_cpu.FULL_WIDTH_FROM_HIDDEN`` hidden units on.  This times
both pairs on one thread, on an inference chunk (its rows, ``T`` steps) and on a
training chunk's forward and backward (the rows the backend cuts for a training
step), each version in turn, round after round: the figure is the median over the
rounds of the 512-bit time over the 256-bit one *in the same round*, which a shared
machine's drift hardly moves.  On a target without AVX-512 the two versions are the
same code and the ratio is 1.

    python benchmarks/vector_width.py [--hidden 128] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from _common import machine_description
from floor import chunk_rows

T, I = 28, 28


def chunk(rows, hidden, train, rng):
    """The arguments of ``forward_layer`` for one chunk of ``rows`` rows with every step, laid
    out as the CPU backend lays them out, and with ``train`` a ``run_backward(kernel)`` that
    runs a ``backward_layer`` on that chunk (else None)."""
    from fastlstm.kernels import gemm_bf16_cpu, gemm_cpu, lstm_cpu
    H, K, G = hidden, I + hidden, 4 * hidden
    f = np.float32
    x = rng.random((rows, T, I), dtype=f)
    w = (rng.standard_normal((K, G)) * 0.1).astype(f)
    w_hh = np.ascontiguousarray(w[I:].T)
    panels = np.empty((gemm_cpu.panel_count(G), K, gemm_cpu.NR), f)
    hh_panels = np.empty((gemm_cpu.panel_count(H), G, gemm_cpu.NR), f)
    gemm_cpu.pack_panels(w, panels)
    gemm_cpu.pack_panels(w_hh, hh_panels)
    slots = T if train else 2
    active, slot, cslot = lstm_cpu.packed_steps(np.full(rows, T), rows, not train, False)
    zeros = np.zeros((rows, H), f)
    gates = np.empty((T * rows, G), f) if train else None
    buffers = dict(xh=np.zeros((slots * rows, K), f), c=np.zeros((slots * rows, H), f),
                   gates=gates, z=np.empty((rows, G), f))
    no_dropout, float32 = lstm_cpu.no_dropout(f), gemm_bf16_cpu.FLOAT32
    forward = (x, w, np.zeros(G, f), buffers["xh"], buffers["c"], gates,
               np.empty((rows, 0, H), f), np.empty((rows, H), f), buffers["z"], zeros, zeros,
               active, slot, cslot, True, False, panels, *no_dropout, *float32)
    if not train:
        return forward, None
    dh_last = rng.standard_normal((rows, H)).astype(f)
    dh, dc = np.empty((rows, H), f), np.empty((rows, H), f)
    backward = (gates, buffers["c"], zeros, w_hh, np.empty((0, H), f),
                np.empty((T * rows, G), f), dh, dc, np.zeros(G, f), active, slot, cslot, False,
                hh_panels, False, *no_dropout, *float32)

    def run_backward(backward_layer):
        # backward returns the initial states' gradients in dh and dc: each call starts anew
        # from the last step's (fed back, they shrink to denormals within a few calls)
        dh[...] = dh_last
        dc[...] = 0
        backward_layer(*backward)
    return forward, run_backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    print(machine_description())
    from fastlstm.kernels import lstm_cpu
    train_rows, infer_rows = chunk_rows(args.hidden)
    rng = np.random.default_rng(0)
    infer_args, _ = chunk(infer_rows, args.hidden, False, rng)
    fwd_args, run_backward = chunk(train_rows, args.hidden, True, rng)
    versions = {"256-bit": (lstm_cpu.forward_layer, lstm_cpu.backward_layer),
                "512-bit": (lstm_cpu.forward_layer_full_width,
                               lstm_cpu.backward_layer_full_width)}
    work = {
        f"inference chunk, {infer_rows} rows": lambda f, b: f(*infer_args),
        f"training chunk forward + backward, {train_rows} rows":
            lambda f, b: (f(*fwd_args), run_backward(b)),
    }
    times = {name: {v: [] for v in versions} for name in work}
    with threadpool_limits(1, user_api="blas"):
        for fns in versions.values():  # compile
            for run in work.values():
                run(*fns)
        for r in range(args.rounds):
            order = list(versions) if r % 2 else list(versions)[::-1]
            for name, run in work.items():
                for v in order:
                    start = time.perf_counter()
                    for _ in range(5):
                        run(*versions[v])
                    times[name][v].append((time.perf_counter() - start) / 5)
    results = {}
    chosen = "512-bit" if lstm_cpu.layer_kernels(args.hidden)[0] is versions["512-bit"][0] \
        else "256-bit"
    print(f"H={args.hidden}, T={T}, one thread, {args.rounds} rounds; median ms, and the paired "
          f"median of 512-bit / 256-bit (< 1: 512 bits are faster); the backend runs "
          f"the {chosen} kernels at this size")
    for name, t in times.items():
        ratio = float(np.median(np.array(t["512-bit"]) / np.array(t["256-bit"])))
        ms = {v: float(np.median(s)) * 1e3 for v, s in t.items()}
        results[name] = dict(ms=ms, ratio_512_over_256=ratio)
        print(f"  {name:42s} 256-bit {ms['256-bit']:7.3f}  512-bit {ms['512-bit']:7.3f}"
              f"  ratio {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
