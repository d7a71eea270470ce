"""The floor under every CPU figure: what BLAS's sgemm reaches on this machine.

Times a large square sgemm (the machine's practical peak) and the GEMM shapes of
one training step of the CPU backend at B=128, T=28, I=28, H=128 (a chunk of 64
rows per thread, single-threaded BLAS), on one thread and on all cores.

    python benchmarks/blas_peak.py [--size 2048]
"""

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from _common import machine_description, summarize, time_call

STEP_SHAPES = {  # (m, k, n) of one chunk of 64 rows, H=128, K=I+H=156
    "forward step [x,h] @ [W_ih,W_hh]^T": (64, 156, 512),
    "backward step dz @ W_hh": (64, 512, 128),
    "weight gradient dz^T @ [x,h] (28 steps)": (512, 1792, 156),
}


def gflops(m, k, n, threads, repeat=7):
    rng = np.random.default_rng(0)
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((k, n), dtype=np.float32)
    out = np.empty((m, n), np.float32)
    with threadpool_limits(threads, user_api="blas"):
        median, _ = summarize(time_call(lambda: np.matmul(a, b, out=out), repeat, min_time=0.05))
    return 2 * m * k * n / median / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square sgemm")
    args = parser.parse_args()
    print(machine_description())
    cores = threadpool_limits(user_api="blas").get_original_num_threads()["blas"]
    shapes = {f"square sgemm {args.size}": (args.size,) * 3, **STEP_SHAPES}
    print(f"{'GEMM':42s} {'1 thread':>12s} {f'{cores} threads':>12s}   GFLOP/s")
    for name, (m, k, n) in shapes.items():
        print(f"{name:42s} {gflops(m, k, n, 1):12.1f} {gflops(m, k, n, cores):12.1f}")


if __name__ == "__main__":
    main()
