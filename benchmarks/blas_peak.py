"""The floor under every CPU figure: what BLAS's sgemm and fastlstm's own GEMM reach here.

Times a large square sgemm (the machine's practical BLAS peak) and the GEMM
shapes of the CPU backend at B=128, T=28, I=28, H=128: those of one chunk of
a training step (its rows as the backend cuts them) and of inference (batches
of 1,000), with BLAS on one thread and on all cores, and with the
register-blocked kernel of ``fastlstm.kernels.gemm_cpu`` (one thread; the
backend runs it per thread), on ``B`` as it is and packed into panels (as the
backend packs the weights of the step GEMMs once per batch), and the packed
one's time over the other's, the two timed in turn round by round.  The weight
gradient is timed in the layout the backend uses: ``[x, h]^T`` is a transposed
view, ``dz`` not packed.

Every rate is also given as a fraction of this machine's floor (``floor.py``):
the larger of one core's arithmetic peak (independent fused multiply-adds in
registers of the target's full width) and the best one-thread rate at the
training step's shapes; on all cores, that times what the probe reaches on all
of them at once.  Then one inference chunk of the backend's shape (its
rows, 28 steps) through ``lstm_cpu.forward_layer`` next to its step GEMMs alone:
the samples/s of one core if the gate math cost nothing, and at the floor.

With ``--rows``, also the forward step's product ``[x_t, h] @ W^T`` for every row count
from 1 to ``2 MR + 1`` on one thread, our GEMM beside BLAS: a variable-length batch runs
each step on the rows still active, so every count occurs, and its cost per row shows what
a block of rows past the last full one costs.

    python benchmarks/blas_peak.py [--size 2048] [--rows]
"""

import argparse

import numpy as np
from threadpoolctl import threadpool_limits

from _common import cpu_choices_description, machine_description, summarize, time_call
from floor import (bf16_peak_gflops, chunk_rows, fma_peak_gflops, gemm_rates,
                   packed_over_unpacked, step_shapes, thread_scaling)

T, I, H = 28, 28, 128


def inference_split(rows):
    """Seconds of one inference chunk of ``rows`` rows through ``forward_layer``, and of its
    step GEMMs alone (the same calls), on one thread."""
    from fastlstm.kernels import gemm_bf16_cpu, gemm_cpu, lstm_cpu

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

    float32 = gemm_bf16_cpu.FLOAT32  # no bfloat16 operands
    panels = np.empty((gemm_cpu.panel_count(G), K, gemm_cpu.NR), np.float32)
    gemm_cpu.pack_panels(w, panels)  # as the backend packs the weights, once per batch

    forward_layer = lstm_cpu.layer_kernels(H)[0]  # the kernel the backend runs at this H

    def layer():
        forward_layer(x, w, bias, xh, c, None, hseq, h_last, z, zeros, zeros, active, slot, slot,
                      True, False, panels, *no_dropout, *float32)

    def gemms():  # what forward_layer multiplies: the input part first (h0 = 0), then [x, h]
        gemm_cpu.gemm_panels(first, panels[:, :I], z, False)
        for _ in range(T - 1):
            gemm_cpu.gemm_panels(xh[rows:], panels, z, False)

    with threadpool_limits(1, user_api="blas"):
        return tuple(summarize(time_call(fn, 9, min_time=0.05))[0] for fn in (layer, gemms))


def row_counts(most):
    """Seconds of the forward step's product for each row count 1..``most``, by our GEMM and
    by BLAS, one thread: ``{rows: (ours, blas)}``."""
    from fastlstm.kernels import gemm_cpu

    rng = np.random.default_rng(0)
    K, G = I + H, 4 * H
    a = rng.standard_normal((most, K)).astype(np.float32)
    w = rng.standard_normal((K, G)).astype(np.float32)
    out = np.empty((most, G), np.float32)
    seconds = {}
    with threadpool_limits(1, user_api="blas"):
        for m in range(1, most + 1):
            seconds[m] = tuple(
                summarize(time_call(fn, 9, min_time=0.02))[0]
                for fn in (lambda: gemm_cpu.gemm(a[:m], w, out[:m], False),
                           lambda: np.dot(a[:m], w, out[:m])))
    return seconds


def print_row_counts():
    from fastlstm.kernels import gemm_cpu
    seconds = row_counts(2 * gemm_cpu.MR + 1)
    full = seconds[gemm_cpu.MR][0] / gemm_cpu.MR
    print(f"\nthe forward step's product ({I + H} x {4 * H} weights) by rows, one thread "
          f"(per row: against a full block of {gemm_cpu.MR} rows)")
    print(f"{'rows':>5s} {'ours (us)':>10s} {'per row':>8s} {'BLAS (us)':>10s}")
    for m, (ours, blas) in seconds.items():
        print(f"{m:5d} {ours * 1e6:10.2f} {ours / m / full:7.2f}x {blas * 1e6:10.2f}")


def main():
    from fastlstm.kernels import gemm_cpu
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square sgemm")
    parser.add_argument("--rows", action="store_true",
                        help="also time the forward step's product for every row count")
    args = parser.parse_args()
    print(machine_description())
    cores = threadpool_limits(user_api="blas").get_original_num_threads()["blas"]
    print(f"fastlstm gemm: blocks of {gemm_cpu.MR} x {gemm_cpu.NR}")
    print(cpu_choices_description())
    shapes = {f"square sgemm {args.size}": (args.size,) * 3 + (False,), **step_shapes()}
    rates = gemm_rates(shapes, threads=sorted({1, cores}))
    peak = fma_peak_gflops()
    # the floor: the best one-thread rate at the training step's shapes, or the probe's
    best = max(rate for name, r in rates.items() if not name.startswith(("square", "inference"))
               for key, rate in r.items() if "1 thr" in key and rate)
    floor = max(peak, best)
    scaling = thread_scaling(cores, peak)
    floor_all = cores * floor * scaling
    print(f"one core's peak on fused multiply-adds alone: {peak:.1f} GFLOP/s; best one-thread "
          f"GEMM at the training step's shapes {best:.1f};\n  the floor of this machine: "
          f"{floor:.1f} GFLOP/s per thread (each figure below: GFLOP/s, and its fraction of it),"
          f"\n  on {cores} threads at once {floor_all:.1f} ({scaling:.2f} of {cores} times one: "
          f"the probe on {cores} threads together)")
    bf16_peak = bf16_peak_gflops()
    if bf16_peak is not None:
        print(f"  bfloat16's peak, vdpbf16ps alone: {bf16_peak:.1f} GFLOP/s, "
              f"{bf16_peak / peak:.2f}x float32's multiply-adds")
    print(f"{'GEMM':48s} " + " ".join(f"{key:>13s}" for key in next(iter(rates.values()))))
    for name, r in rates.items():
        # BLAS on all cores: its fraction of the floor of as many threads
        cells = ["-" if g is None else
                 f"{g:6.1f} ({g / (floor if '1 thr' in key else floor_all):4.0%})"
                 for key, g in r.items()]
        print(f"{name:48s} " + " ".join(f"{c:>13s}" for c in cells))

    print("our GEMM on B packed, over on B as it is, timed in turn (paired median of 25 rounds):")
    for name, ratio in packed_over_unpacked(shapes).items():
        print(f"  {name:46s} {ratio:.2f}x the time")

    rows = chunk_rows()[1]
    layer, gemms = inference_split(rows)
    flop = 2 * rows * 4 * H * (I + (T - 1) * (I + H))
    print(f"\ninference, one chunk of {rows} rows x {T} steps on one core: {layer * 1e3:.2f} ms, "
          f"{rows / layer:,.0f} samples/s ({rows / layer * flop / rows / 1e9 / floor:.0%} of the "
          f"floor);\n  its step GEMMs alone {gemms * 1e3:.2f} ms "
          f"({flop / gemms / 1e9:.1f} GFLOP/s, {flop / gemms / 1e9 / floor:.0%} of the floor), "
          f"the gate math and copies {(layer - gemms) * 1e3:.2f} ms "
          f"({(layer - gemms) / layer:.0%});\n  with free gate math: {rows / gemms:,.0f} samples/s"
          f" per core, at the floor {rows * floor * 1e9 / flop:,.0f}")
    if args.rows:
        print_row_counts()

if __name__ == "__main__":
    main()
