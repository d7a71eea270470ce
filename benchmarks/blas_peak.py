"""The floor under every CPU figure: what BLAS's sgemm and fastlstm's own GEMM reach here.

Times a large square sgemm (the machine's practical BLAS peak) and the GEMM
shapes of one training step of the CPU backend at B=128, T=28, I=28, H=128 (a
chunk of 64 rows per thread), with BLAS on one thread and on all cores, and
with the register-blocked kernel of ``fastlstm.kernels.gemm_cpu`` (one thread;
the backend runs it per thread).  The weight gradient is timed in the layout
the backend uses: ``[x, h]^T`` is a transposed view.

    python benchmarks/blas_peak.py [--size 2048]
"""

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from _common import machine_description, summarize, time_call

STEP_SHAPES = {  # (m, k, n, A transposed) of one chunk of 64 rows, H=128, K=I+H=156
    "forward step [x,h] @ [W_ih,W_hh]^T": (64, 156, 512, False),
    "backward step dz @ W_hh": (64, 512, 128, False),
    "weight gradient [x,h]^T @ dz (28 steps)": (156, 1792, 512, True),
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
    shapes = {f"square sgemm {args.size}": (args.size,) * 3 + (False,), **STEP_SHAPES}
    print(f"{'GEMM':42s} {'BLAS 1 thr':>11s} {f'BLAS {cores} thr':>11s} {'ours 1 thr':>11s}"
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
        print(f"{name:42s} " + " ".join(f"{g:11.1f}" for g in figures))


if __name__ == "__main__":
    main()
