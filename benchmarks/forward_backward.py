"""Wall time of one training forward + backward, reference vs Numba, and start-up costs.

Times, for one minibatch (default B=128, T=28, I=28, H=128, float32): the NumPy
reference's forward + loss + backward, the Numba CPU backend's, and the Numba
backend's inference forward.  Then, in child processes: the import time of
``fastlstm`` and of the CPU backend, and the latency of the first forward +
backward call, cold (a fresh, empty Numba cache: everything compiles) and warm
(a second process reusing that cache).

    python benchmarks/forward_backward.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def fit_step(backend, spec, params, x, y):
    outputs, cache = backend.forward(spec, params, x, train=True)
    _, doutputs = backend.loss(outputs, y, "cross_entropy")
    return backend.backward(spec, params, cache, doutputs)


def startup(args):
    """Child process: import times and the first call's latency, as JSON on stdout."""
    t0 = time.perf_counter()
    import fastlstm  # noqa: F401
    t1 = time.perf_counter()
    from fastlstm.backends import get_backend
    backend = get_backend("cpu")
    t2 = time.perf_counter()
    from _common import lstm_problem
    spec, params, x, y = lstm_problem(args.batch, args.steps, args.inputs, args.hidden)
    t3 = time.perf_counter()
    fit_step(backend, spec, params, x, y)
    backend.forward(spec, params, x, train=False)
    t4 = time.perf_counter()
    print(json.dumps(dict(import_fastlstm=t1 - t0, import_cpu_backend=t2 - t1,
                          first_call=t4 - t3)))


def run_child(args, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    cmd = [sys.executable, __file__, "--startup", "--batch", str(args.batch), "--steps",
           str(args.steps), "--inputs", str(args.inputs), "--hidden", str(args.hidden)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--inputs", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup:
        return startup(args)

    from _common import lstm_problem, machine_description, summarize, time_call
    from fastlstm.backends import get_backend
    print(machine_description())
    print(f"B={args.batch} T={args.steps} I={args.inputs} H={args.hidden} float32, "
          f"median of {args.repeat} calls after a warm-up (spread = (max-min)/median)\n")
    spec, params, x, y = lstm_problem(args.batch, args.steps, args.inputs, args.hidden)
    rows = []
    for name in ("reference", "cpu"):
        backend = get_backend(name)
        repeat = max(3, args.repeat // 4) if name == "reference" else args.repeat
        rows.append((f"{name}: forward + loss + backward",
                     summarize(time_call(lambda: fit_step(backend, spec, params, x, y), repeat))))
    cpu = get_backend("cpu")
    rows.append(("cpu: inference forward",
                 summarize(time_call(lambda: cpu.forward(spec, params, x), args.repeat))))
    for label, (med, spread) in rows:
        print(f"  {label:<38} {med * 1e3:9.2f} ms  (spread {spread:5.1%})")
    print(f"  speed-up of cpu over reference (forward + backward): {rows[0][1][0] / rows[1][1][0]:.1f}x\n")

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_child(args, cache_dir)
        warm = run_child(args, cache_dir)
    print("  start-up, in child processes (empty Numba cache = cold, then a second process = warm)")
    print(f"  {'':<38} {'cold':>9}    {'warm':>9}")
    for key, label in (("import_fastlstm", "import fastlstm"),
                       ("import_cpu_backend", "get_backend('cpu') (imports Numba)"),
                       ("first_call", "first forward+backward+inference"),
                       ("process", "whole process (interpreter included)")):
        print(f"  {label:<38} {cold[key]:8.2f} s   {warm[key]:8.2f} s")


if __name__ == "__main__":
    main()
