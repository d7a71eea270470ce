"""End-to-end: one training epoch and inference throughput, fastlstm vs PyTorch, same run.

Training: one epoch of Adam (lr 1e-3) over 60,000 x 28 x 28 float32 samples in
shuffled minibatches of 128, an LSTM with H=128 and a linear head of 10 classes,
with the loop the estimators use (a permutation per epoch, batches taken by
indexing, ``backend.train_step`` per batch).  The same epoch with PyTorch's
``nn.LSTM`` + ``nn.Linear`` + ``torch.optim.Adam`` and cross-entropy, with
``torch.set_num_threads`` set to the number of threads fastlstm uses.  Then
inference throughput (forward of the model, no gradients) over 10,000 samples in
batches of 1000.  The two run in alternating rounds (``--repeat``, default 3),
and the medians are compared: on a shared machine a single epoch of either
varies from round to round by more than the gaps worth measuring (every round
is printed, so the spread shows).  CPU time (all threads) is shown beside
the wall time: on a busy machine the wall time also counts the time other
processes held the cores.
Each median is also printed as a fraction of this machine's floor (``floor.py``):
the epoch against the least time its GEMMs take at the best one-thread GEMM rate of
the step's shapes (or the peak probe, if higher) on every thread, times the share of
that the threads reach together (the probe on all of them at once), inference against
the throughput that rate allows.
Last, in a fresh process (warm Numba cache): one epoch of
``LSTMClassifier.fit``, the time until its first minibatch is done, and the
peak resident memory of the fit next to the size of the training data.  The
data are Fashion-MNIST (``fastlstm.datasets``, never downloaded here), else
random pixels: the timing does not depend on the values.

    python benchmarks/epoch.py [--samples 60000] [--repeat 3] [--no-torch] [--json out.json]
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def load_images(data_home, samples, rng):
    """``samples`` x 28 x 28 float32 in [0, 1] and their labels: Fashion-MNIST if found, else random."""
    from fastlstm.datasets import DatasetUnavailable, load_fashion_mnist
    try:
        data = load_fashion_mnist(data_home, download=False)
    except DatasetUnavailable:
        X = rng.integers(0, 256, size=(samples, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=samples)
        source = "random pixels (Fashion-MNIST not found)"
    else:
        reps = -(-samples // len(data.X_train))
        X = np.tile(data.X_train, (reps, 1, 1))[:samples]
        y = np.tile(data.y_train, reps)[:samples]
        source = "Fashion-MNIST training set"
    X = X.astype(np.float32)
    X *= np.float32(1 / 255)
    return X, y, source


def rss_mb():
    """Resident memory of this process now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def estimator_child(args):
    """In a fresh process: one epoch of ``LSTMClassifier.fit``; start-up, peak memory; JSON out."""
    import_start = time.perf_counter()
    from fastlstm import LSTMClassifier
    from fastlstm.backends import get_backend
    backend = get_backend("cpu")
    imported = time.perf_counter()
    X, y, _ = load_images(args.data, args.samples, np.random.default_rng(0))
    marks = {}
    step = type(backend).train_step

    def timed_step(self, *a, **k):
        marks.setdefault("first_step_start", time.perf_counter())
        out = step(self, *a, **k)
        marks.setdefault("first_step_end", time.perf_counter())
        return out

    type(backend).train_step = timed_step
    clf = LSTMClassifier(hidden_size=args.hidden, batch_size=args.batch, max_iter=1,
                         random_state=0, device="cpu")
    rss_before = rss_mb()
    # ru_maxrss cannot be reset after loading the data: sample the fit's own peak instead
    samples, done = [rss_before], threading.Event()

    def watch():
        while not done.wait(0.005):
            samples.append(rss_mb())

    watcher = threading.Thread(target=watch)
    watcher.start()
    fit_start = time.perf_counter()
    clf.fit(X, y)
    fit_end = time.perf_counter()
    done.set()
    watcher.join()
    peak = max(samples)
    print(json.dumps(dict(
        import_s=imported - import_start, process_to_import_s=import_start - PROCESS_START,
        fit_to_first_step_s=marks["first_step_start"] - fit_start,
        fit_to_first_step_done_s=marks["first_step_end"] - fit_start,
        process_to_first_step_done_s=marks["first_step_end"] - PROCESS_START
        - (fit_start - imported),
        fit_s=fit_end - fit_start, data_mb=X.nbytes / 1e6, rss_before_fit_mb=rss_before,
        peak_mb=peak, process_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
        fit_overhead_mb=peak - rss_before)))


def estimator_report(args):
    """Run :func:`estimator_child` in a fresh process (the Numba cache is warm by now)."""
    cmd = [sys.executable, __file__, "--estimator-child", "--samples", str(args.samples),
           "--batch", str(args.batch), "--hidden", str(args.hidden), "--data", args.data]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        if "cannot import name 'LSTMClassifier'" in done.stderr:
            print("  LSTMClassifier is not in this fastlstm: no estimator figures")
            return None
        raise RuntimeError(done.stderr)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  LSTMClassifier.fit, 1 epoch, fresh process: {r['fit_s']:.2f} s; first batch done "
          f"{r['fit_to_first_step_done_s']:.2f} s after fit() was called "
          f"({r['process_to_first_step_done_s']:.2f} s after the process started, "
          f"data loading excluded)")
    print(f"  resident memory: {r['rss_before_fit_mb']:.0f} MB before fit (training data "
          f"{r['data_mb']:.0f} MB, interpreter, libraries), peak during fit "
          f"{r['peak_mb']:.0f} MB: the fit added {r['fit_overhead_mb']:.0f} MB "
          f"(sampled every 5 ms)")
    return r


def fastlstm_ready(X, y, batch, hidden, rng, lr, precision="float32"):
    """``(backend, spec, params, state)`` of a fresh model, after one untimed step (the
    Numba kernels compiled or loaded, the workspaces made)."""
    from fastlstm.backends import AdamConfig, get_backend
    from fastlstm.model import ModelSpec
    backend = get_backend("cpu", precision)
    spec = ModelSpec(X.shape[2], hidden, 1, 10)
    params = spec.layout.init(rng, np.float32)
    backend.train_step(spec, params.copy(), backend.adam_state(params), X[:batch], y[:batch],
                       "cross_entropy", AdamConfig(lr))
    return backend, spec, params, backend.adam_state(params)


def fastlstm_epoch(X, y, batch, hidden, rng, lr, precision="float32"):
    from _common import train_epoch
    backend, spec, params, state = fastlstm_ready(X, y, batch, hidden, rng, lr, precision)
    start, cpu_start = time.perf_counter(), time.process_time()
    total = train_epoch(backend, spec, params, state, X, y, rng.permutation(len(X)), batch, lr)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, float(total) / -(-len(X) // batch), (backend, spec, params)


def fastlstm_inference(model, X, batch):
    backend, spec, params = model
    backend.forward(spec, params, X[:batch])
    start = time.perf_counter()
    with backend.session():  # as the estimators' predict
        for b in range(0, len(X), batch):
            backend.forward(spec, params, X[b:b + batch])
    return len(X) / (time.perf_counter() - start)


def torch_ready(X, y, batch, hidden, lr, autocast=False):
    """``(net, optimizer, X, y)`` (the data as tensors) of a fresh PyTorch model, after one
    untimed step."""
    import torch
    from _common import torch_model, torch_train_epoch
    torch.manual_seed(0)
    net = torch_model(X.shape[2], hidden, 10)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    torch_train_epoch(net, opt, Xt, yt, torch.arange(batch), batch, autocast)
    return net, opt, Xt, yt


def torch_epoch(X, y, batch, hidden, rng, lr, autocast=False):
    """``autocast``: in ``torch.autocast("cpu", dtype=torch.bfloat16)`` (see
    :func:`_common.torch_train_epoch`)."""
    import torch
    from _common import torch_train_epoch
    net, opt, Xt, yt = torch_ready(X, y, batch, hidden, lr, autocast)
    start, cpu_start = time.perf_counter(), time.process_time()
    total = torch_train_epoch(net, opt, Xt, yt, torch.from_numpy(rng.permutation(len(X))), batch,
                              autocast)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, float(total) / -(-len(X) // batch), net


def torch_inference(net, X, batch, autocast=False):
    import torch
    Xt = torch.from_numpy(X)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        net(Xt[:batch])
        start = time.perf_counter()
        for b in range(0, len(X), batch):
            net(Xt[b:b + batch])
    return len(X) / (time.perf_counter() - start)


def paired_round(contenders, X, y, Xi, args, rng, lr=1e-3):
    """An epoch and an inference pass of every contender, minibatch by minibatch
    (:func:`_common.paired_epoch`): name: ``dict(epoch_s=..., inference_samples_per_s=...)``,
    each the sum over its own steps.  ``contenders``: name: ``("fastlstm", precision)`` or
    ``("torch", autocast)``.

    fastlstm's sessions (BLAS on one thread) stay open through PyTorch's steps too: PyTorch's
    wheels link MKL statically, out of threadpoolctl's reach, so its threads are not held; a
    PyTorch on a shared BLAS would be, in this pass only."""
    from _common import paired_epoch, paired_inference, torch_train_step, train_step
    steps, forwards, sessions = {}, {}, []
    for name, (kind, setting) in contenders.items():
        if kind == "fastlstm":
            backend, spec, params, state = fastlstm_ready(X, y, args.batch, args.hidden, rng, lr,
                                                          setting)
            steps[name] = train_step(backend, spec, params, state, X, y, lr)

            def forward(rows, backend=backend, spec=spec, params=params):
                return backend.forward(spec, params, Xi[rows])
            sessions.append(backend.session())
        else:
            import torch
            net, opt, Xt, yt = torch_ready(X, y, args.batch, args.hidden, lr, setting)

            def step(start, idx, torch_step=torch_train_step(net, opt, Xt, yt, setting)):
                return torch_step(start, torch.from_numpy(idx))
            steps[name] = step

            def forward(rows, net=net, autocast=setting, Xti=torch.from_numpy(Xi)):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                            enabled=autocast):
                    return net(Xti[rows])
        forwards[name] = forward
    with contextlib.ExitStack() as stack:
        for session in sessions:
            stack.enter_context(session)
        for forward in forwards.values():  # untimed: the inference workspaces
            forward(slice(0, args.infer_batch))
        epoch = paired_epoch(steps, rng.permutation(len(X)), args.batch)
        inference = paired_inference(forwards, len(Xi), args.infer_batch)
    return {name: dict(epoch_s=epoch[name], inference_samples_per_s=inference[name])
            for name in contenders}


def report_floor(results, medians, args, threads):
    """Each median as a fraction of this machine's floor (``benchmarks/floor.py``): the least
    time the epoch's GEMMs can take, and the most samples/s inference's allow, at the best
    one-thread GEMM rate (or the peak probe) on every thread, times what the threads give
    together (the probe on all of them at once)."""
    from floor import floor_gflops, inference_flop, training_flop
    rate = floor_gflops(args.hidden, args.batch, threads)
    per_s = rate["floor_all"] * 1e9
    floor_epoch = args.samples * training_flop(args.hidden) / per_s
    floor_throughput = per_s / inference_flop(args.hidden)
    results["floor"] = dict(rate, threads=threads, epoch_s=floor_epoch,
                            inference_samples_per_s=floor_throughput)
    print(f"\n  the floor here: {rate['floor']:.1f} GFLOP/s per thread (peak probe "
          f"{rate['probe']:.1f}, best one-thread GEMM at the step's shapes "
          f"{rate['best_gemm']:.1f}) x {threads} threads x {rate['scaling']:.2f} (the probe on "
          f"{threads} threads at once): the epoch's GEMMs take at least {floor_epoch:.2f} s, "
          f"inference's allow at most {floor_throughput:,.0f} samples/s")
    for name, m in medians.items():
        m["epoch_floor_fraction"] = floor_epoch / m["epoch_s"]
        m["inference_floor_fraction"] = m["inference_samples_per_s"] / floor_throughput
        print(f"  {name:8s}  epoch at {m['epoch_floor_fraction']:.0%} of the floor, inference "
              f"at {m['inference_floor_fraction']:.0%}")


def add_workload_arguments(parser):
    """The options of this workload (data, sizes, threads), which bf16.py shares."""
    parser.add_argument("--samples", type=int, default=60000, help="training samples (60000)")
    parser.add_argument("--batch", type=int, default=128, help="training minibatch (128)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units H (128)")
    parser.add_argument("--infer-samples", type=int, default=10000,
                        help="inference samples (10000)")
    parser.add_argument("--infer-batch", type=int, default=1000, help="inference batch (1000)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="data_home of fastlstm.datasets "
                        "(holding fashion-mnist/; default %(default)s, then the usual places)")
    parser.add_argument("--threads", type=int, help="threads for both fastlstm and PyTorch "
                        "(default: the cores fastlstm would use)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--no-estimator", action="store_true",
                        help="skip the LSTMClassifier.fit run (fresh process, peak memory)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of (fastlstm epoch + inference, PyTorch epoch + inference), "
                             "alternating; medians are compared (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--estimator-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.estimator_child:
        return estimator_child(args)

    from _common import cpu_choices_description, machine_description
    if args.threads:
        os.environ["FASTLSTM_NUM_THREADS"] = str(args.threads)
    from fastlstm.backends import get_backend
    threads = get_backend("cpu").num_threads
    print(machine_description())
    print(cpu_choices_description())
    rng = np.random.default_rng(0)
    X, y, source = load_images(args.data, args.samples, rng)
    Xi = X[:args.infer_samples]
    print(f"data: {source}; {len(X)} samples, batch {args.batch}, H={args.hidden}, "
          f"{threads} threads\n")
    results = dict(machine=machine_description(), choices=cpu_choices_description(),
                   threads=threads, samples=len(X),
                   batch=args.batch, hidden=args.hidden, repeat=args.repeat)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("  PyTorch is not installed: no baseline")
        else:
            torch.set_num_threads(threads)
            results["torch_version"] = torch.__version__
    runs = {"fastlstm": [], "PyTorch": []}
    for round_ in range(args.repeat):
        secs, cpu, loss, model = fastlstm_epoch(X, y, args.batch, args.hidden, rng, 1e-3)
        runs["fastlstm"].append(dict(epoch_s=secs, epoch_cpu_s=cpu, mean_loss=loss,
                                     inference_samples_per_s=fastlstm_inference(
                                         model, Xi, args.infer_batch)))
        if torch is not None:
            secs, cpu, loss, net = torch_epoch(X, y, args.batch, args.hidden, rng, 1e-3)
            runs["PyTorch"].append(dict(epoch_s=secs, epoch_cpu_s=cpu, mean_loss=loss,
                                        inference_samples_per_s=torch_inference(
                                            net, Xi, args.infer_batch)))
        for name, rs in runs.items():
            if rs:
                r = rs[-1]
                print(f"  round {round_ + 1}  {name:8s} epoch {r['epoch_s']:6.2f} s  (CPU time "
                      f"{r['epoch_cpu_s']:6.2f} s, mean loss {r['mean_loss']:.3f})   inference "
                      f"{r['inference_samples_per_s']:8,.0f} samples/s")
    medians = {name: dict(epoch_s=statistics.median(r["epoch_s"] for r in rs),
                          inference_samples_per_s=statistics.median(
                              r["inference_samples_per_s"] for r in rs))
               for name, rs in runs.items() if rs}
    results["runs"], results["medians"] = runs, medians
    print(f"\n  medians of {args.repeat} rounds:")
    for name, m in medians.items():
        print(f"  {name:8s}  epoch {m['epoch_s']:6.2f} s   inference "
              f"{m['inference_samples_per_s']:8,.0f} samples/s")
    report_floor(results, medians, args, threads)
    if "PyTorch" in medians:
        f, t = medians["fastlstm"], medians["PyTorch"]
        results["epoch_time_ratio"] = f["epoch_s"] / t["epoch_s"]
        results["inference_throughput_ratio"] = (f["inference_samples_per_s"]
                                                 / t["inference_samples_per_s"])
        print(f"\n  fastlstm / PyTorch: epoch time {results['epoch_time_ratio']:.2f}x, "
              f"inference throughput {results['inference_throughput_ratio']:.2f}x")
        paired = paired_round({"fastlstm": ("fastlstm", "float32"), "PyTorch": ("torch", False)},
                              X, y, Xi, args, rng)
        f, t = paired["fastlstm"], paired["PyTorch"]
        results["paired"] = dict(paired, epoch_time_ratio=f["epoch_s"] / t["epoch_s"],
                                 inference_throughput_ratio=f["inference_samples_per_s"]
                                 / t["inference_samples_per_s"])
        print(f"  minibatch by minibatch (one more epoch and inference pass each, every "
              f"minibatch's steps back to back):\n    fastlstm epoch {f['epoch_s']:.2f} s, "
              f"inference {f['inference_samples_per_s']:,.0f} samples/s; PyTorch "
              f"{t['epoch_s']:.2f} s, {t['inference_samples_per_s']:,.0f} samples/s: epoch time "
              f"{results['paired']['epoch_time_ratio']:.2f}x, inference throughput "
              f"{results['paired']['inference_throughput_ratio']:.2f}x")
    if not args.no_estimator:
        results["estimator"] = estimator_report(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
