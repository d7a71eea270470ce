"""The floor under every CPU figure: what BLAS's sgemm and fastlstm's own GEMM reach here.

Times a large square sgemm (the machine's practical BLAS peak) and the GEMM
shapes of the CPU backend at B=128, T=28, I=28, H=128: those of one chunk of
a training step (its rows as the backend cuts them) and of inference (batches
of 1,000), with BLAS on one thread and on all cores, and with the
register-blocked kernel of ``fastlstm.kernels.gemm_cpu`` (one thread; the
backend runs it per thread).  The weight gradient is timed in the layout the
backend uses: ``[x, h]^T`` is a transposed view.

    python benchmarks/blas_peak.py [--size 2048]
"""

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from _common import machine_description, summarize, time_call

T, I, H = 28, 28, 128


def step_shapes():
    """``{name: (m, k, n, A transposed)}`` of the GEMMs of one chunk, in training and inference."""
    from fastlstm import ParamLayout
    from fastlstm.backends.cpu import CPUBackend

    layout, backend = ParamLayout(I, H, 1, 10), CPUBackend()
    train, infer = (backend._workspace(layout, batch, T, np.float32, mode).rows[0]
                    for batch, mode in ((128, "step"), (1000, "inference")))
    R, Ri = train[1] - train[0], infer[1] - infer[0]
    return {
        f"forward step [x,h] @ [W_ih,W_hh]^T, {R} rows": (R, I + H, 4 * H, False),
        f"backward step dz @ W_hh, {R} rows": (R, 4 * H, H, False),
        f"weight gradient [x,h]^T @ dz, {T} x {R} rows": (I + H, T * R, 4 * H, True),
        f"inference step, {Ri} rows": (Ri, I + H, 4 * H, False),
    }


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


if __name__ == "__main__":
    main()
