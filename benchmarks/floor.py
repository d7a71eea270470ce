"""The floor under the CPU figures of this machine: the rate its GEMMs can reach, per thread.

``blas_peak.py`` (its GEMM rates and inference chunk) and ``epoch.py`` (its
epoch and inference) report their figures also as fractions of this floor,
measured on the machine they run on (machines differ: a ratio to a rule of one
machine says nothing of another):

* :func:`fma_peak_gflops`: one core's arithmetic peak, fused multiply-adds alone
  (:func:`bf16_peak_gflops`: bfloat16's, ``vdpbf16ps`` alone);
* :func:`gemm_rates`: the one-thread rate of BLAS and of fastlstm's own GEMM (on ``B`` as
  it is, and packed) at the CPU backend's step shapes (:func:`step_shapes`);
* :func:`floor_gflops`: the larger of the two, the rate below which no GEMM of
  these shapes runs, per thread, and on several threads that times the measured
  :func:`thread_scaling` (the probe on all of them at once); :func:`training_flop`
  and :func:`inference_flop` count what an LSTM of one layer multiplies per sample,
  so ``flop / floor_all`` is the least time the GEMMs of a run can take.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from _common import summarize, time_call

def fma_peak_gflops():
    """One core's GFLOP/s on multiply-adds alone, in registers of the target's full width
    (:func:`fastlstm.kernels.peak_cpu.peak_gflops`)."""
    from fastlstm.kernels.peak_cpu import peak_gflops
    return peak_gflops("fma")


def bf16_peak_gflops():
    """One core's GFLOP/s on ``vdpbf16ps`` alone (bfloat16's peak), or ``None`` where Numba's
    target lacks AVX512-BF16."""
    from fastlstm.kernels import gemm_bf16_cpu
    from fastlstm.kernels.peak_cpu import peak_gflops
    return peak_gflops("dpbf16") if gemm_bf16_cpu.available() else None


def chunk_rows(hidden=128, steps=28, inputs=28, batch=128, infer_batch=1000):
    """Rows of the CPU backend's first chunk of a training step and of inference."""
    from fastlstm.backends.cpu import CPUBackend
    from fastlstm.model import ModelSpec

    spec, backend = ModelSpec(inputs, hidden, 1, 10), CPUBackend()
    train, infer = (backend._workspace(spec, b, steps, np.float32, mode).rows[0]
                    for b, mode in ((batch, "step"), (infer_batch, "inference")))
    return train[1] - train[0], infer[1] - infer[0]


def step_shapes(hidden=128, steps=28, inputs=28, batch=128, infer_batch=1000):
    """``{name: (m, k, n, A transposed)}`` of the GEMMs of one chunk, in training and inference."""
    R, Ri = chunk_rows(hidden, steps, inputs, batch, infer_batch)
    K, G, T = inputs + hidden, 4 * hidden, steps
    return {
        f"forward step [x,h] @ [W_ih,W_hh]^T, {R} rows": (R, K, G, False),
        f"backward step dz @ W_hh, {R} rows": (R, G, hidden, False),
        f"weight gradient [x,h]^T @ dz, {T} x {R} rows": (K, T * R, G, True),
        f"inference step, {Ri} rows": (Ri, K, G, False),
    }


def our_gemms(m, k, n, transposed):
    """``(blas, plain, packed)``: calls of one product of that shape, by BLAS, by our GEMM on
    ``B`` as it is and on ``B`` packed beforehand (:func:`fastlstm.kernels.gemm_cpu.gemm_panels`,
    as the backend runs the step GEMMs on weights it packs once per batch; None for a weight
    gradient, ``transposed``, whose ``B`` the backend does not pack).  Compiled before
    returning."""
    from fastlstm.kernels import gemm_cpu
    rng = np.random.default_rng(0)
    a = rng.random((k, m) if transposed else (m, k), dtype=np.float32)
    a, b = (a.T if transposed else a), rng.random((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    panels = np.empty((gemm_cpu.panel_count(n), k, gemm_cpu.NR), np.float32)
    gemm_cpu.pack_panels(b, panels)
    calls = (lambda: np.matmul(a, b, out=out), lambda: gemm_cpu.gemm(a, b, out, False),
             None if transposed else lambda: gemm_cpu.gemm_panels(a, panels, out, False))
    for call in calls[1:]:
        if call is not None:
            call()
    return calls


def gflops(fn, m, k, n, repeat=7):
    median, _ = summarize(time_call(fn, repeat, min_time=0.05))
    return 2 * m * k * n / median / 1e9


def gemm_rates(shapes, threads=(1,)):
    """``{name: {"BLAS <n> thr": GFLOP/s, ..., "ours 1 thr": GFLOP/s, "packed 1 thr": GFLOP/s
    or None}}`` for ``shapes``, by the calls of :func:`our_gemms` (None: not packed)."""
    rates = {}
    for name, (m, k, n, transposed) in shapes.items():
        blas, plain, packed = our_gemms(m, k, n, transposed)
        rates[name] = {}
        for t in threads:
            with threadpool_limits(t, user_api="blas"):
                rates[name][f"BLAS {t} thr"] = gflops(blas, m, k, n)
        rates[name]["ours 1 thr"] = gflops(plain, m, k, n)
        rates[name]["packed 1 thr"] = None if packed is None else gflops(packed, m, k, n)
    return rates


def packed_over_unpacked(shapes, rounds=25):
    """``{name: time ratio}``: our GEMM on ``B`` packed over our GEMM on ``B`` as it is, for
    the shapes whose ``B`` the backend packs (not the weight gradients), each the median over
    ``rounds`` of the two timed one after the other in the same round (so that a shared
    machine's drift, which moves the rates of :func:`gemm_rates` from one shape and kernel to
    the next, cancels)."""
    ratios = {}
    for name, (m, k, n, transposed) in shapes.items():
        _, plain, packed = our_gemms(m, k, n, transposed)
        if packed is None:
            continue
        pairs = []
        for r in range(rounds):
            order = (plain, packed) if r % 2 else (packed, plain)
            seconds = {fn: time_call(fn, 1, min_time=0.02)[0] for fn in order}
            pairs.append(seconds[packed] / seconds[plain])
        ratios[name] = float(np.median(pairs))
    return ratios


def floor_gflops(hidden=128, batch=128, threads=1):
    """``{"probe", "best_gemm", "floor", "scaling", "floor_all"}`` in GFLOP/s: the peak probe
    and the best one-thread GEMM rate at the training step's shapes, per thread; the larger
    of the two (``floor``, per thread); what ``threads`` threads give together
    (:func:`thread_scaling`); and the floor of them all, ``threads * floor * scaling``."""
    shapes = {name: s for name, s in step_shapes(hidden, batch=batch).items()
              if not name.startswith("inference")}
    best = max(rate for r in gemm_rates(shapes).values() for rate in r.values() if rate)
    probe = fma_peak_gflops()
    scaling = thread_scaling(threads, probe)
    floor = max(probe, best)
    return dict(probe=probe, best_gemm=best, floor=floor, scaling=scaling,
                floor_all=threads * floor * scaling)


def thread_scaling(threads, probe):
    """The share of ``threads`` times one core's peak (``probe``, measured) that the peak
    probe reaches on ``threads`` threads at once, at most 1: below 1 where the threads share
    a physical core, or a host with other guests (then the floor of ``threads`` threads is
    lower than ``threads`` times one core's)."""
    from fastlstm.kernels.peak_cpu import peak_gflops
    if threads == 1:
        return 1.0
    return min(1.0, peak_gflops("fma", threads=threads) / (threads * probe))


def inference_flop(hidden, steps=28, inputs=28):
    """What one sample's forward multiplies in one layer: ``[x, h] @ W^T`` per step (the
    first step's ``h`` is zero, its part skipped)."""
    return 2 * 4 * hidden * (inputs + (steps - 1) * (inputs + hidden))


def training_flop(hidden, steps=28, inputs=28):
    """What one sample's training step multiplies in one layer: forward, ``dz @ W_hh`` per
    step but the first, and the weight gradient ``[x, h]^T @ dz`` (the head is left out)."""
    return 2 * inference_flop(hidden, steps, inputs) + 2 * 4 * hidden * hidden * (steps - 1)
