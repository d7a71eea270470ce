"""The CPU backend's choices of GEMM and chunk size, measured on the CPU that runs them.

A kernel or a chunk size tuned on one machine need not be the fastest on another, so
the choices that only speed depends on are made by timing them on the CPU at hand,
once (``benchmarks/RESULTS.md`` has what they chose where):

``step_gemm``
    ``"own"`` (:func:`..kernels.gemm_cpu.gemm_panels`, register-blocked, on the weights
    packed once per call) or ``"blas"``, for the GEMMs inside the time loop: a chunk's rows
    times the weights, at every step.
``grad_gemm``
    the same for the weight gradient: one GEMM over all the steps of a chunk
    (:func:`..kernels.gemm_cpu.gemm`, on ``dz`` as it lies).
``train_chunk_bytes``
    the saved state one training chunk may hold, so that what backward reads is still
    in cache (0: training chunks as large as inference's).  Only while the weights
    fit in half the core's L2 (:func:`.cpu._small_chunks_pay_off`): past that, every
    small chunk streams the weights at every step.
``max_chunk_rows``
    the most rows of a chunk, in inference and training.

Every choice computes the same function and passes the parity tests against the
reference (``tests/test_cpu_choices.py`` runs each), but not bit for bit: BLAS sums in
another order than our GEMM (and a row's result may then depend on its place in the
batch), and the chunk sizes decide the order in which the weight gradient is summed over
the rows.  So the choices are part of what a fit computes, as the thread count is: a fixed
choice gives bit-identical results run to run, and processes that share a cache folder
share the choices.

:func:`cpu_choices` gives the choices of this process:

1. ``FASTLSTM_CPU_CHOICES`` where set: ``"builtin"`` (the rule of :func:`builtin_choices`,
   no calibration), or a JSON object fixing some fields, the others builtin
   (``'{"step_gemm": "blas"}'``);
2. else those cached for this CPU (:func:`cache_path`: keyed on the CPU model, the
   instruction sets Numba compiles for, the BLAS library and the kernels' source);
3. else a calibration (:func:`calibrate`: about 5 s on one thread, once the kernels
   are compiled), written to that cache for every later process.  Where no
   cache folder is writable, the builtin rule: choices that a later process could make
   differently would make its results differ in the last bits.

``python -m fastlstm.backends.cpu_choices`` prints them, calibrating anew with
``--recalibrate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from ..kernels import _cpu_features, _numba_cache, gemm_cpu

#: the environment variable that fixes the choices (see the module's docstring)
ENV = "FASTLSTM_CPU_CHOICES"
#: bumped when the calibration measures differently: the caches of older ones are ignored
FORMAT = 1
#: the workload timed, one thread: a 1-layer LSTM over the rows of MNIST (28 steps of
#: 28), H=128, a training step of 64 rows (a 2-thread batch of 128) and inference over 512
#: (a 2-thread batch of 1,000)
WORKLOAD = dict(input_size=28, hidden_size=128, steps=28, train_rows=64, infer_rows=512)
#: a candidate replaces the current choice only if faster by more than this fraction:
#: timings on a shared machine vary by several percent, and a coin toss between two
#: equal choices would make two machines of one model differ for nothing
MARGIN = 0.05
#: timed rounds per choice: each round runs every candidate once, and a candidate's
#: figure is the median over the rounds of its time over the current choice's in the same
#: round (a shared host's speed drifts within seconds; within a round it barely does).
#: With 7, chunk sizes that longer runs measured as equal came out further apart than
#: MARGIN on the project's Intel machine (``benchmarks/RESULTS.md``); 15 keep such noise
#: under it (``python -m fastlstm.backends.cpu_choices --recalibrate`` prints the ratios)
ROUNDS = 15


@dataclasses.dataclass(frozen=True)
class Choices:
    """The CPU backend's choices (see the module's docstring)."""

    step_gemm: str
    grad_gemm: str
    train_chunk_bytes: int
    max_chunk_rows: int

    def __post_init__(self):
        for field in ("step_gemm", "grad_gemm"):
            if getattr(self, field) not in ("own", "blas"):
                raise ValueError(f"CPU choice {field} must be 'own' or 'blas', got "
                                 f"{getattr(self, field)!r}")
        for field, least in (("train_chunk_bytes", 0), ("max_chunk_rows", gemm_cpu.MR)):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                    or value < least:
                raise ValueError(f"CPU choice {field} must be a whole number >= {least}, "
                                 f"got {value!r}")

    @property
    def own_step_gemm(self):
        return self.step_gemm == "own"

    @property
    def own_grad_gemm(self):
        return self.grad_gemm == "own"


#: the values the calibration tries, per choice (the builtin one among them).  BLAS in the
#: time loop is tried with training chunks as large as inference's (``train_chunk_bytes``
#: 0): small chunks were slow with it (``benchmarks/RESULTS.md``, "Kernel choices")
CANDIDATES = dict(step_gemm=("own", "blas"), grad_gemm=("own", "blas"),
                  train_chunk_bytes=(0, 5 << 18, 5 << 19, 5 << 20),
                  max_chunk_rows=(64, 128, 256))


def builtin_choices():
    """The choices of the rule the backend had before it measured: our GEMM with SIMD of
    256 bits or more and FMA (``gemm_cpu.PAYS_OFF``), BLAS else; training chunks of
    2.5 MiB of state with our GEMM (the best at H = 64 and 128 on the project's AMD
    machine: ``benchmarks/RESULTS.md``, "Kernel choices"), none with BLAS; chunks of at
    most 128 rows."""
    gemm = "own" if gemm_cpu.PAYS_OFF else "blas"
    return Choices(step_gemm=gemm, grad_gemm=gemm, train_chunk_bytes=_chunk_bytes_for(gemm),
                   max_chunk_rows=128)


def _chunk_bytes_for(step_gemm):
    """The builtin ``train_chunk_bytes`` for a time-loop GEMM: small chunks with ours only."""
    return (5 << 19) if step_gemm == "own" else 0


def parse_override(text):
    """The choices that ``FASTLSTM_CPU_CHOICES``'s value ``text`` names."""
    if text.strip() == "builtin":
        return builtin_choices()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        fields = None
    if not isinstance(fields, dict):
        raise ValueError(f"{ENV} must be 'builtin' or a JSON object of choices, e.g. "
                         f"'{{\"step_gemm\": \"blas\"}}', got {text!r}; unset it to use the "
                         "choices measured on this CPU")
    unknown = sorted(set(fields) - set(CANDIDATES))
    if unknown:
        raise ValueError(f"{ENV} names unknown choices {unknown}; the choices are "
                         f"{sorted(CANDIDATES)}")
    if "step_gemm" in fields and "train_chunk_bytes" not in fields:
        fields["train_chunk_bytes"] = _chunk_bytes_for(fields["step_gemm"])
    return dataclasses.replace(builtin_choices(), **fields)


def cpu_identity():
    """What the choices depend on: the CPU model, the instruction sets Numba compiles for,
    the BLAS library, the source of the kernels and of the backend's chunking (and this
    calibration's format)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from threadpoolctl import threadpool_info
    blas = sorted(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                  for i in threadpool_info() if i.get("user_api") == "blas")
    here = Path(__file__).resolve().parent  # the chunk logic and this calibration
    return dict(model=model, features=sorted(_cpu_features.target_features()), blas=blas,
                kernels=_numba_cache.kernels_stamp(),
                backend=_numba_cache.sources_stamp([here / "cpu.py", here / "cpu_choices.py"]),
                format=FORMAT)


def _cache_folders():
    """Where the cache may go, in order: beside Numba's cache (``NUMBA_CACHE_DIR``, else the
    kernels' ``__pycache__``), else the user's cache folder."""
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    if numba_dir:
        yield Path(numba_dir)
    yield _numba_cache.KERNELS_DIR / "__pycache__"
    yield Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlstm"


def cache_path(identity=None):
    """The file of this CPU's cached choices, in the first writable folder; ``None`` where
    none is."""
    identity = cpu_identity() if identity is None else identity
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    for folder in _cache_folders():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder / f"fastlstm-cpu-choices-{key}.json"
    return None


def _read(path):
    """The choices cached in ``path``, or ``None`` (missing, unreadable or not valid)."""
    try:
        return Choices(**json.loads(path.read_text())["choices"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path):
    """An exclusive lock beside ``path``, so that processes starting together (a search's
    workers) calibrate one at a time, not against each other, and the later ones read
    the first one's result."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def cpu_choices():
    """The choices of this process (see the module's docstring), fixed once made.

    Raises
    ------
    ValueError
        ``FASTLSTM_CPU_CHOICES`` is set to something else than its documented forms.
    """
    text = os.environ.get(ENV)
    if text:
        return parse_override(text)
    identity = cpu_identity()
    path = cache_path(identity)
    if path is None:
        return builtin_choices()
    choices = _read(path)
    if choices is not None:
        return choices
    try:
        with _locked(path):
            choices = _read(path)  # another process may have calibrated meanwhile
            if choices is None:
                choices, timings = calibrate()
                write(path, identity, choices, timings)
    except Exception as exc:  # a fit must not fail for want of a speed-up (a lock or a
        # cache that cannot be written, a calibration that failed): nothing is cached
        warnings.warn(f"fastlstm could not measure or cache its CPU choices ({exc!r}); it "
                      f"uses the builtin ones (see {__name__})", RuntimeWarning, stacklevel=2)
        return builtin_choices()
    return choices


def write(path, identity, choices, timings):
    """Write the cache file whole or not at all (a reader never sees half of one)."""
    record = dict(identity=identity, choices=dataclasses.asdict(choices), timings=timings,
                  measured=time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=int))
    os.replace(tmp, path)


def _workload():
    """The timed workload: ``(train(backend), infer(backend))``, each one call."""
    from ..model import ModelSpec
    from .base import AdamConfig
    w = WORKLOAD
    rng = np.random.default_rng(0)
    spec = ModelSpec(w["input_size"], w["hidden_size"], 1, 10)
    params = spec.layout.init(rng, np.float32)
    x_train = rng.random((w["train_rows"], w["steps"], w["input_size"]), dtype=np.float32)
    y_train = rng.integers(0, 10, size=w["train_rows"])
    x_infer = rng.random((w["infer_rows"], w["steps"], w["input_size"]), dtype=np.float32)
    config = AdamConfig(1e-9)  # the weights barely move: every round times the same work

    states = {}

    def train(backend):
        if backend not in states:
            states[backend] = backend.adam_state(params)
        backend.train_step(spec, params, states[backend], x_train, y_train, "cross_entropy",
                           config)

    def infer(backend):
        backend.forward(spec, params, x_infer)
    return train, infer


def calibrate(rounds=ROUNDS):
    """Time the candidates of :data:`CANDIDATES` on :data:`WORKLOAD`, one thread.

    One choice at a time, in the order of :data:`CANDIDATES`, the others at the best so
    far (starting from :func:`builtin_choices`): each round runs a training step and an
    inference with every candidate (in turn, the order reversed every other round), and
    each candidate's figure is the median over the rounds of its time over the current
    choice's in the same round.  The fastest candidate replaces the current choice only
    if that figure is below ``1 - MARGIN``.

    Returns
    -------
    choices : Choices
    timings : dict
        Per choice, per candidate: the median time over the current choice's
        (``"ratio"``) and the median seconds of a round (``"seconds"``).
    """
    from .cpu import CPUBackend
    train, infer = _workload()
    best = builtin_choices()
    timings = {}
    backends = {}

    def backend_for(choices):
        if choices not in backends:
            backends[choices] = CPUBackend(num_threads=1, choices=choices)
        return backends[choices]

    def timed(choices):
        backend = backend_for(choices)
        with backend.session():
            start = time.perf_counter()
            train(backend)
            infer(backend)
            return time.perf_counter() - start

    for field, values in CANDIDATES.items():
        candidates = [dataclasses.replace(best, **{field: v}) for v in values]
        if field == "step_gemm":
            candidates = [dataclasses.replace(c, train_chunk_bytes=_chunk_bytes_for(c.step_gemm))
                          for c in candidates]
        for c in candidates:  # compile and allocate first, untimed
            timed(c)
        rows = []
        for r in range(rounds):
            order = candidates if r % 2 == 0 else candidates[::-1]
            seconds = {c: timed(c) for c in order}
            rows.append([seconds[c] for c in candidates])
        rows = np.array(rows)
        ratios = np.median(rows / rows[:, [candidates.index(best)]], axis=0)
        fastest = int(np.argmin(ratios))
        timings[field] = {str(v): dict(ratio=float(q), seconds=float(t))
                          for v, q, t in zip(values, ratios, np.median(rows, axis=0))}
        if ratios[fastest] < 1 - MARGIN:
            best = candidates[fastest]
    return best, timings


def source():
    """Where :func:`cpu_choices` has its choices from, in words."""
    if os.environ.get(ENV):
        return f"{ENV}={os.environ[ENV]!r}"
    choices, path = cpu_choices(), cache_path()
    if path is None:
        return "builtin: no writable cache folder to keep a measurement in"
    if _read(path) == choices:
        return f"measured on this CPU, cached in {path}"
    return "builtin: measuring them failed (see the warning)"


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(
        description="The CPU backend's choices on this CPU (see fastlstm.backends.cpu_choices).")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure them anew and rewrite the cache")
    args = parser.parse_args(argv)
    identity = cpu_identity()
    path = cache_path(identity)
    print(f"CPU: {identity['model']}; Numba's target: {_cpu_features.vector_bits()}-bit SIMD"
          f"{', FMA' if _cpu_features.has_fma() else ''}; BLAS: {', '.join(identity['blas'])}")
    if args.recalibrate:
        if os.environ.get(ENV):
            parser.error(f"{ENV} is set: unset it to recalibrate")
        if path is None:
            parser.error("no cache folder is writable (NUMBA_CACHE_DIR, the kernels' "
                         "__pycache__, ~/.cache/fastlstm): a measurement could not be kept")
        choices, timings = calibrate()
        write(path, identity, choices, timings)
        cpu_choices.cache_clear()
        print("  each candidate's time over the current choice's (median of rounds), and a "
              "round's median time:")
        for field, by_value in timings.items():
            print(f"  {field:18s} " + "  ".join(
                f"{v}: {t['ratio']:.3f} ({t['seconds'] * 1e3:.1f} ms)" for v, t in by_value.items()))
    choices = cpu_choices()
    print(f"choices ({source()}): {dataclasses.asdict(choices)}")


if __name__ == "__main__":
    main()
