"""The floor under the CPU figures of this machine: the rate its GEMMs can reach, per thread.

``blas_peak.py`` (its GEMM rates and inference chunk) and ``epoch.py`` (its
epoch and inference) report their figures also as fractions of this floor,
measured on the machine they run on (machines differ: a ratio to a rule of one
machine says nothing of another):

* :func:`fma_peak_gflops`: one core's arithmetic peak, fused multiply-adds alone;
* :func:`gemm_rates`: the one-thread rate of BLAS and of fastlstm's own GEMM at the
  CPU backend's step shapes (:func:`step_shapes`);
* :func:`floor_gflops`: the larger of the two, the rate below which no GEMM of
  these shapes runs; :func:`training_flop` and :func:`inference_flop` count what an
  LSTM of one layer multiplies per sample, so ``flop / (threads * floor)`` is the
  least time the GEMMs of a run can take.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from _common import summarize, time_call

#: independent accumulators of the peak probe: a core with two FMA units of 4 cycles'
#: latency needs 8 to keep both busy; 16 leave room and still fit 32 AVX-512 registers
CHAINS = 16


def _probe(lanes, fused):
    """A jitted ``run(rounds)``: ``CHAINS`` accumulators of ``lanes`` float32 lanes, each
    multiplied and added ``rounds`` times, written as LLVM vector IR.

    Not as a loop for LLVM to vectorise: on Intel's server cores LLVM's vectoriser
    prefers 256-bit vectors even where the registers have 512 bits, and a loop-written
    probe measured half the peak there (132.6 GFLOP/s against OpenBLAS's 194).
    """
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def chains(typingctx, rounds):
        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.FloatType(), lanes)
            a, b = ir.Constant(vty, [0.999] * lanes), ir.Constant(vty, [1e-3] * lanes)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                                 f"llvm.fma.v{lanes}f32")
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [1 + i / 64] * lanes))
                    for i in range(CHAINS)]
            with cgutils.for_range(builder, args[0]):
                for acc in accs:
                    value = builder.load(acc)
                    step = builder.call(fma, [value, a, b]) if fused else \
                        builder.fadd(builder.fmul(value, a), b)
                    builder.store(step, acc)
            total = builder.load(accs[0])
            for acc in accs[1:]:  # the result depends on every chain: none is optimised away
                total = builder.fadd(total, builder.load(acc))
            return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        return types.float32(rounds), codegen

    @njit
    def run(rounds):
        return chains(rounds)
    return run


def fma_peak_gflops():
    """One core's GFLOP/s on multiply-adds alone, in registers of the target's full width."""
    from fastlstm.kernels._cpu_features import has_fma, vector_bits
    lanes = max(vector_bits(), 128) // 32
    run = _probe(lanes, has_fma())
    rounds = 2_000_000
    run(1)  # compile
    return gflops(lambda: run(rounds), 1, CHAINS * lanes, rounds)


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


def operands(m, k, n, transposed):
    rng = np.random.default_rng(0)
    a = rng.random((k, m) if transposed else (m, k), dtype=np.float32)
    return (a.T if transposed else a), rng.random((k, n), dtype=np.float32)


def gflops(fn, m, k, n, repeat=7):
    median, _ = summarize(time_call(fn, repeat, min_time=0.05))
    return 2 * m * k * n / median / 1e9


def gemm_rates(shapes, threads=(1,)):
    """``{name: {"BLAS <n> thr": GFLOP/s, ..., "ours 1 thr": GFLOP/s}}`` for ``shapes``."""
    from fastlstm.kernels import gemm_cpu
    rates = {}
    for name, (m, k, n, transposed) in shapes.items():
        a, b = operands(m, k, n, transposed)
        out = np.empty((m, n), np.float32)
        gemm_cpu.gemm(a, b, out, False)  # compile or load before timing
        rates[name] = {}
        for t in threads:
            with threadpool_limits(t, user_api="blas"):
                rates[name][f"BLAS {t} thr"] = gflops(lambda: np.matmul(a, b, out=out), m, k, n)
        rates[name]["ours 1 thr"] = gflops(lambda: gemm_cpu.gemm(a, b, out, False), m, k, n)
    return rates


def floor_gflops(hidden=128, batch=128):
    """``{"probe", "best_gemm", "floor"}`` in GFLOP/s per thread: the peak probe, the best
    one-thread GEMM rate at the training step's shapes, and the larger of the two."""
    shapes = {name: s for name, s in step_shapes(hidden, batch=batch).items()
              if not name.startswith("inference")}
    best = max(max(r.values()) for r in gemm_rates(shapes).values())
    probe = fma_peak_gflops()
    return dict(probe=probe, best_gemm=best, floor=max(probe, best))


def inference_flop(hidden, steps=28, inputs=28):
    """What one sample's forward multiplies in one layer: ``[x, h] @ W^T`` per step (the
    first step's ``h`` is zero, its part skipped)."""
    return 2 * 4 * hidden * (inputs + (steps - 1) * (inputs + hidden))


def training_flop(hidden, steps=28, inputs=28):
    """What one sample's training step multiplies in one layer: forward, ``dz @ W_hh`` per
    step but the first, and the weight gradient ``[x, h]^T @ dz`` (the head is left out)."""
    return 2 * inference_flop(hidden, steps, inputs) + 2 * 4 * hidden * hidden * (steps - 1)
