"""bfloat16 against float32: a training epoch and inference, fastlstm and PyTorch, one run.

The workload of ``epoch.py`` (one epoch of Adam over 60,000 x 28 x 28 samples in
shuffled minibatches of 128, H=128, 10 classes; then inference over 10,000 samples in
batches of 1000), run by four contenders in alternating rounds (``--repeat``, default 3):
fastlstm in float32, fastlstm with ``precision="bfloat16"`` (the CPU backend's
``vdpbf16ps`` GEMMs, :mod:`fastlstm.precision`), PyTorch in float32 and PyTorch under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (forward and loss autocast, backward
after it), PyTorch on as many threads as fastlstm.  The medians are compared: fastlstm's
bfloat16 against PyTorch's autocast (the issue's target: at least 1.3x its speed, in the
epoch and in inference) and against fastlstm's float32.  Every round is printed, with CPU
time beside wall time, and the load average before and after the run: on a shared
machine the wall time also counts the time other processes held the cores.

Needs a CPU with AVX512-BF16 (``avx512_bf16`` in ``/proc/cpuinfo``); elsewhere it says so
and exits with status 1.

    python benchmarks/bf16.py [--samples 60000] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import cpu_choices_description, machine_description  # noqa: E402
from epoch import (add_workload_arguments, fastlstm_epoch, fastlstm_inference,  # noqa: E402
                   load_images, paired_round, torch_epoch, torch_inference)

#: the contenders: name, and what runs them (fastlstm's precision, or PyTorch's autocast)
CONTENDERS = (("fastlstm float32", ("fastlstm", "float32")),
              ("fastlstm bfloat16", ("fastlstm", "bfloat16")),
              ("PyTorch float32", ("torch", False)),
              ("PyTorch autocast bf16", ("torch", True)))


def one_round(kind, setting, X, y, Xi, args, rng):
    """One epoch and one inference pass of a contender: its figures."""
    if kind == "fastlstm":
        secs, cpu, loss, model = fastlstm_epoch(X, y, args.batch, args.hidden, rng, 1e-3, setting)
        throughput = fastlstm_inference(model, Xi, args.infer_batch)
    else:
        secs, cpu, loss, net = torch_epoch(X, y, args.batch, args.hidden, rng, 1e-3, setting)
        throughput = torch_inference(net, Xi, args.infer_batch, setting)
    return dict(epoch_s=secs, epoch_cpu_s=cpu, mean_loss=loss,
                inference_samples_per_s=throughput)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the four contenders, "
                        "alternating; medians are compared (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    if args.threads:
        os.environ["FASTLSTM_NUM_THREADS"] = str(args.threads)
    import torch
    from fastlstm.backends import get_backend
    from fastlstm.kernels import gemm_bf16_cpu
    if not gemm_bf16_cpu.available():
        print("this CPU lacks AVX512-BF16 (vdpbf16ps): fastlstm has no bfloat16 here")
        sys.exit(1)
    threads = get_backend("cpu").num_threads
    torch.set_num_threads(threads)
    machine = machine_description()
    print(machine)
    print(cpu_choices_description())
    from floor import bf16_peak_gflops, fma_peak_gflops
    peaks = dict(float32=fma_peak_gflops(), bfloat16=bf16_peak_gflops())
    print(f"one core's peaks: float32 multiply-adds {peaks['float32']:.1f} GFLOP/s, vdpbf16ps "
          f"{peaks['bfloat16']:.1f} ({peaks['bfloat16'] / peaks['float32']:.2f}x): bfloat16's "
          "GEMMs can be at most that much faster")
    rng = np.random.default_rng(0)
    X, y, source = load_images(args.data, args.samples, rng)
    Xi = X[:args.infer_samples]
    print(f"data: {source}; {len(X)} samples, batch {args.batch}, H={args.hidden}, "
          f"{threads} threads\n")
    load_before = os.getloadavg()
    runs = {name: [] for name, _ in CONTENDERS}
    for round_ in range(args.repeat):
        for name, (kind, setting) in CONTENDERS:
            r = one_round(kind, setting, X, y, Xi, args, rng)
            runs[name].append(r)
            print(f"  round {round_ + 1}  {name:22s} epoch {r['epoch_s']:6.2f} s  (CPU time "
                  f"{r['epoch_cpu_s']:6.2f} s, mean loss {r['mean_loss']:.3f})   inference "
                  f"{r['inference_samples_per_s']:8,.0f} samples/s", flush=True)
    load_after = os.getloadavg()
    medians = {name: {key: statistics.median(r[key] for r in rs)
                      for key in ("epoch_s", "epoch_cpu_s", "inference_samples_per_s")}
               for name, rs in runs.items()}
    print(f"\n  medians of {args.repeat} rounds:")
    for name, m in medians.items():
        print(f"  {name:22s} epoch {m['epoch_s']:6.2f} s (CPU {m['epoch_cpu_s']:6.2f} s)   "
              f"inference {m['inference_samples_per_s']:8,.0f} samples/s")

    def speedup(fast, slow):
        """How many times faster ``fast`` is than ``slow``: epoch (wall, CPU), inference."""
        f, s = medians[fast], medians[slow]
        return dict(epoch=s["epoch_s"] / f["epoch_s"],
                    epoch_cpu=s["epoch_cpu_s"] / f["epoch_cpu_s"],
                    inference=f["inference_samples_per_s"] / s["inference_samples_per_s"])

    pairs = (("fastlstm bfloat16", "PyTorch autocast bf16"), ("fastlstm bfloat16", "fastlstm float32"),
             ("fastlstm float32", "PyTorch float32"), ("PyTorch autocast bf16", "PyTorch float32"))
    ratios = {f"{fast} over {slow}": speedup(fast, slow) for fast, slow in pairs}
    print()
    for label, r in ratios.items():
        print(f"  {label:46s} speed-up: epoch {r['epoch']:.2f}x (CPU time {r['epoch_cpu']:.2f}x), "
              f"inference {r['inference']:.2f}x")
    # one more epoch and inference pass of each, every minibatch run by all four in turn
    paired = paired_round(dict(CONTENDERS), X, y, Xi, args, rng)
    paired_ratios = {f"{fast} over {slow}": dict(
        epoch=paired[slow]["epoch_s"] / paired[fast]["epoch_s"],
        inference=paired[fast]["inference_samples_per_s"] / paired[slow]["inference_samples_per_s"])
        for fast, slow in pairs}
    print("\n  minibatch by minibatch (one more epoch and inference pass each, every minibatch run "
          "by all four in turn):")
    for name, r in paired.items():
        print(f"  {name:22s} epoch {r['epoch_s']:6.2f} s   inference "
              f"{r['inference_samples_per_s']:8,.0f} samples/s")
    for label, r in paired_ratios.items():
        print(f"  {label:46s} speed-up: epoch {r['epoch']:.2f}x, inference {r['inference']:.2f}x")
    print("  (target: fastlstm bfloat16 >= 1.3x PyTorch autocast bf16 in both)")
    print(f"  load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' '.join(f'{v:.2f}' for v in load_after)} after")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine, command=" ".join(sys.argv), threads=threads, samples=len(X),
            batch=args.batch, hidden=args.hidden, repeat=args.repeat, data=source,
            torch_version=torch.__version__, load_average_before=load_before,
            load_average_after=load_after, runs=runs, medians=medians, ratios=ratios,
            choices=cpu_choices_description(), peaks_gflops=peaks, paired=paired,
            paired_ratios=paired_ratios),
            indent=2))


if __name__ == "__main__":
    main()
