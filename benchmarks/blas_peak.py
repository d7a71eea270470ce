"""The floor under every CPU figure: what BLAS's sgemm and fastlstm's own GEMM reach here.

Times a large square sgemm (the machine's practical BLAS peak) and the GEMM
shapes of the CPU backend at B=128, T=28, I=28, H=128: those of one chunk of
a training step (its rows as the backend cuts them) and of inference (batches
of 1,000), with BLAS on one thread and on all cores, and with the
register-blocked kernel of ``fastlstm.kernels.gemm_cpu`` (one thread; the
backend runs it per thread).  The weight gradient is timed in the layout the
backend uses: ``[x, h]^T`` is a transposed view.

Then the ceiling of inference: one core's arithmetic peak (independent fused
multiply-adds on registers only), and one inference chunk of the backend's
shape (its rows, 28 steps) through ``lstm_cpu.forward_layer`` next to its step
GEMMs alone: the samples/s of one core if the gate math cost nothing.

    python benchmarks/blas_peak.py [--size 2048]
"""

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from _common import machine_description, summarize, time_call

T, I, H = 28, 28, 128


def chunk_rows():
    """Rows of the CPU backend's first chunk of a training step (batch 128) and of inference
    (batch 1000)."""
    from fastlstm.backends.cpu import CPUBackend
    from fastlstm.model import ModelSpec

    spec, backend = ModelSpec(I, H, 1, 10), CPUBackend()
    train, infer = (backend._workspace(spec, batch, T, np.float32, mode).rows[0]
                    for batch, mode in ((128, "step"), (1000, "inference")))
    return train[1] - train[0], infer[1] - infer[0]


def step_shapes():
    """``{name: (m, k, n, A transposed)}`` of the GEMMs of one chunk, in training and inference."""
    R, Ri = chunk_rows()
    return {
        f"forward step [x,h] @ [W_ih,W_hh]^T, {R} rows": (R, I + H, 4 * H, False),
        f"backward step dz @ W_hh, {R} rows": (R, 4 * H, H, False),
        f"weight gradient [x,h]^T @ dz, {T} x {R} rows": (I + H, T * R, 4 * H, True),
        f"inference step, {Ri} rows": (Ri, I + H, 4 * H, False),
    }


def fma_peak_gflops():
    """One core's GFLOP/s on fused multiply-adds alone: 12 SIMD vectors of independent chains."""
    from numba import njit
    from fastlstm.kernels._cpu_features import vector_bits

    lanes = 12 * max(vector_bits(), 128) // 32

    @njit(fastmath={"contract"}, error_model="numpy")
    def chains(start, rounds):
        # a local copy and a trip count known when compiling: LLVM keeps ``acc`` in registers
        acc = start.copy()
        a, b = np.float32(0.999), np.float32(1e-3)
        for _ in range(rounds):
            for j in range(lanes):
                acc[j] = acc[j] * a + b
        return acc

    start = np.ones(lanes, np.float32)
    rounds = 200_000
    chains(start, 1)
    return gflops(lambda: chains(start, rounds), 1, start.size, rounds)


def inference_split(rows):
    """Seconds of one inference chunk of ``rows`` rows through ``forward_layer``, and of its
    step GEMMs alone (the same calls), on one thread."""
    from fastlstm.kernels import gemm_cpu, lstm_cpu

    rng = np.random.default_rng(0)
    K, G = I + H, 4 * H
    x = rng.random((rows, T, I), dtype=np.float32)
    w = (rng.standard_normal((K, G)) * 0.1).astype(np.float32)
    bias = np.zeros(G, np.float32)
    xh, c = np.zeros((2 * rows, K), np.float32), np.zeros((2 * rows, H), np.float32)
    z, hseq = np.empty((rows, G), np.float32), np.empty((rows, 0, H), np.float32)
    h_last, zeros = np.empty((rows, H), np.float32), np.zeros((rows, H), np.float32)
    # every row active at every step, two slots in turn: the CPU backend's inference
    active = np.append(np.full(T, rows), 0)
    slot = (np.arange(T + 1) % 2) * rows
    first = np.ascontiguousarray(x[:, 0])
    no_dropout = lstm_cpu.no_dropout(np.float32)

    def layer():
        lstm_cpu.forward_layer(x, w, bias, xh, c, None, hseq, h_last, z, zeros, zeros, active,
                               slot, slot, True, False, True, *no_dropout)

    def gemms():  # what forward_layer multiplies: the input part first (h0 = 0), then [x, h]
        gemm_cpu.gemm(first, w[:I], z, False)
        for _ in range(T - 1):
            gemm_cpu.gemm(xh[rows:], w, z, False)

    with threadpool_limits(1, user_api="blas"):
        return tuple(summarize(time_call(fn, 9, min_time=0.05))[0] for fn in (layer, gemms))


def operands(m, k, n, transposed):
    rng = np.random.default_rng(0)
    a = rng.random((k, m) if transposed else (m, k), dtype=np.float32)
    return (a.T if transposed else a), rng.random((k, n), dtype=np.float32)


def gflops(fn, m, k, n, repeat=7):
    median, _ = summarize(time_call(fn, repeat, min_time=0.05))
    return 2 * m * k * n / median / 1e9


def main():
    from fastlstm.kernels import gemm_cpu
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square sgemm")
    args = parser.parse_args()
    print(machine_description())
    cores = threadpool_limits(user_api="blas").get_original_num_threads()["blas"]
    print(f"fastlstm gemm: blocks of {gemm_cpu.MR} x {gemm_cpu.NR}; the CPU backend uses it "
          f"{'here' if gemm_cpu.PAYS_OFF else 'nowhere here (BLAS instead)'}")
    shapes = {f"square sgemm {args.size}": (args.size,) * 3 + (False,), **step_shapes()}
    print(f"{'GEMM':48s} {'BLAS 1 thr':>11s} {f'BLAS {cores} thr':>11s} {'ours 1 thr':>11s}"
          f"   GFLOP/s")
    for name, (m, k, n, transposed) in shapes.items():
        a, b = operands(m, k, n, transposed)
        out = np.empty((m, n), np.float32)
        gemm_cpu.gemm(a, b, out, False)  # compile or load before timing
        figures = []
        for threads in (1, cores):
            with threadpool_limits(threads, user_api="blas"):
                figures.append(gflops(lambda: np.matmul(a, b, out=out), m, k, n))
        figures.append(gflops(lambda: gemm_cpu.gemm(a, b, out, False), m, k, n))
        print(f"{name:48s} " + " ".join(f"{g:11.1f}" for g in figures))

    peak = fma_peak_gflops()
    rows = chunk_rows()[1]
    layer, gemms = inference_split(rows)
    flop = 2 * rows * 4 * H * (I + (T - 1) * (I + H))
    print(f"\none core's peak on fused multiply-adds alone: {peak:.1f} GFLOP/s")
    print(f"inference, one chunk of {rows} rows x {T} steps on one core: {layer * 1e3:.2f} ms, "
          f"{rows / layer:,.0f} samples/s;\n  its step GEMMs alone {gemms * 1e3:.2f} ms "
          f"({flop / gemms / 1e9:.1f} GFLOP/s, {flop / gemms / 1e9 / peak:.0%} of the peak), "
          f"the gate math and copies {(layer - gemms) * 1e3:.2f} ms "
          f"({(layer - gemms) / layer:.0%});\n  with free gate math: {rows / gemms:,.0f} samples/s"
          f" per core, at the peak {rows * peak * 1e9 / flop:,.0f}")


if __name__ == "__main__":
    main()
