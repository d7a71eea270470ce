"""CPU backend: the Numba kernels of :mod:`fastlstm.kernels` and BLAS, on a few threads.

The rows of a batch never interact inside an LSTM, so a batch is cut into
chunks of rows and each thread runs whole chunks (every layer, every time step)
with single-threaded BLAS: no thread waits for another inside the time loop,
and Numba's threads and OpenBLAS's threads never compete for the cores.  The
head and the gradient of the loss are per row as well, so in a training step
each thread runs forward, head, loss gradient and backward of its chunks, and
the threads meet once, at the end, where their partial weight gradients are
summed (``forward`` and ``backward`` called separately meet once each).

Each chunk runs the network program of :mod:`fastlstm.model` over the
primitives of :class:`_ChunkOps`.  Per chunk, layer and direction, forward: one
GEMM per step ``[x_t, h_{t-1}] @ [W_ih, W_hh]^T`` and one fused pass for the
gates (:func:`lstm_cpu.forward_layer`); backward: one fused pass per step and
``dz_t @ W_hh``, then the weight gradients (transposed) as ONE GEMM over all
steps, ``[x, h_prev]^T @ dz``.  The GEMMs of the time loop and the weight gradients
run on our own register-blocked kernel (:mod:`..kernels.gemm_cpu`) or on BLAS, and
chunks have the size, that :mod:`.cpu_choices` measured to be the fastest on this CPU
(``python benchmarks/blas_peak.py`` times both GEMMs at these shapes).  Our kernel reads
the weights of the time loop packed into panels (:func:`..kernels.gemm_cpu.pack_panels`),
once per call of the backend (:meth:`CPUBackend._prepare`, and backward's own).

``precision="bfloat16"`` (on CPUs with AVX512-BF16) runs the GEMMs that
:mod:`fastlstm.precision` names on :mod:`..kernels.gemm_bf16_cpu` instead, through the
same kernels and call sites: each call packs the weights for it once
(:meth:`CPUBackend._prepare`), and each GEMM packs its other operand into the chunk's
scratch (``bf16`` of :class:`_Workspace`) right before it.  ``python benchmarks/bf16.py``
times both precisions beside PyTorch's.

Variable-length batches: the rows are dealt to the workers longest first
(:meth:`_Workspace.order`), so each chunk's rows are sorted by length and the
rows still active at a step are a prefix; each step computes only those, and the
steps are stored packed, so the weight-gradient GEMM too runs over valid steps
only.  ``python benchmarks/ragged.py`` measures what that saves against padding.

In training, chunks are small (``train_chunk_bytes`` of saved state), and in
a training step the chunks of one thread run forward and backward one after
another on the same buffers, so what backward reads is still in cache.  Buffers
are reused across calls (per thread and shape) once no result refers to them any
more: inference, training steps, and a forward + backward whose cache has been
dropped.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls: loaded before limiting it)
from threadpoolctl import ThreadpoolController

from .. import dropout as masks, model
from ..kernels import (adam_cpu, dropout_cpu, gemm_bf16_cpu, gemm_cpu, head_cpu, lstm_cpu,
                       peak_cpu, reduce_cpu)
from ..precision import check_precision
from .base import (Backend, BackendUnavailable, Gradients, check_lengths, check_sample_weight,
                   get_loss)
from .cpu_choices import cpu_choices

#: workspaces kept per thread (a full batch and an epoch's last, smaller one, ...)
MAX_WORKSPACES = 4


def _env_threads(name):
    """The thread count that environment variable ``name`` gives (``"4"``, or OpenMP's
    nested ``"4,2"``: its first level), else ``None`` (unset or not a number)."""
    try:
        return max(1, int(os.environ.get(name, "").split(",")[0]))
    except ValueError:
        return None


def default_num_threads():
    """The threads a CPU-backend call made from the calling thread may use: its budget.

    ``FASTLSTM_NUM_THREADS`` where set.  Else the cores this process may run on
    (``os.sched_getaffinity``), cut down to

    * ``OMP_NUM_THREADS`` where set: joblib's process workers (loky: ``GridSearchCV(...,
      n_jobs=...)``) get ``cores // n_jobs`` there, and a Dask nanny starts its worker
      with 1 (``distributed.nanny.pre-spawn-environ``), its ``nthreads`` tasks running
      side by side;
    * inside a task of a Dask worker (``distributed.get_worker()``; ``distributed`` is not
      imported for this), the share of one of its ``nthreads`` task threads.

    Read at every :func:`fastlstm.backends.get_backend` call, which shares one CPU backend
    per thread count.  The count is part of what a fit computes: a batch's weight
    gradient is summed over the threads' rows, so fits on different counts differ in
    the last bits.
    """
    value = os.environ.get("FASTLSTM_NUM_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"FASTLSTM_NUM_THREADS must be a whole number of threads, got "
                             f"{value!r}; unset it to use the cores this process may run "
                             "on") from None
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:
        threads = os.cpu_count() or 1
    threads = min(threads, _env_threads("OMP_NUM_THREADS") or threads)
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            tasks = distributed.get_worker().state.nthreads
        except (ValueError, AttributeError):  # not in a worker's task
            pass
        else:
            threads = max(1, threads // max(1, tasks))
    return threads


@functools.lru_cache(maxsize=None)
def l2_cache_bytes():
    """The L2 cache of one core, as Linux reports it, else 1 MiB (the project's machine's)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 1 << 20


def _small_chunks_pay_off(weight_bytes):
    """Whether training in chunks of ``train_chunk_bytes`` (:mod:`.cpu_choices`) can beat
    chunks of up to ``max_chunk_rows`` rows, for step GEMMs on ``weight_bytes`` of weights.

    Small chunks win while the weights stay in L2; past that, each small chunk streams
    the weights from L3 at every step (measured by hidden size: ``benchmarks/RESULTS.md``,
    "Kernel choices").
    """
    return weight_bytes <= l2_cache_bytes() // 2


def _say_if_bf16_cannot_pay():
    """Warn where ``vdpbf16ps`` is no faster than float32's multiply-adds on this core
    (:func:`..kernels.peak_cpu.bf16_over_float32`): bfloat16's GEMMs are then slower than
    float32's, operands packed on top, as on an Intel Xeon of the Emerald Rapids
    generation without AMX (``benchmarks/RESULTS.md``; ``python benchmarks/bf16.py``
    prints both peaks beside the epochs)."""
    try:
        ratio = peak_cpu.bf16_over_float32()
    except Exception:  # noqa: BLE001  (advice only: nothing to say if it cannot be measured)
        return
    if ratio is not None and ratio < 1:
        warnings.warn(
            f"precision='bfloat16' is not faster than float32 on this CPU: its vdpbf16ps "
            f"peak measured {ratio:.2f}x its float32 multiply-adds' (AMX is not used), so "
            "bfloat16's GEMMs are the slower; precision='float32' is faster here, and "
            "rounds nothing", UserWarning, stacklevel=2)


def _chunk_plan(rows, threads, max_rows, align):
    """Row bounds ``(lo, hi)`` of the chunks of a batch, and the chunk numbers each worker runs.

    The rows are shared evenly by the workers, and each worker's rows cut into as
    few chunks of about ``max_rows`` as will do.  Where there are enough rows,
    every chunk but a worker's last is a multiple of ``align`` rows: the step
    GEMMs work on blocks of ``align`` rows, and the rows past the last whole
    block run in smaller, slower blocks.
    """
    workers = max(1, min(threads, rows))
    bounds, groups = [], []
    for w in range(workers):
        lo, hi = rows * w // workers, rows * (w + 1) // workers
        n = -(-(hi - lo) // max_rows)
        if hi - lo >= n * align:  # cuts at multiples of align, rounded half up
            cuts = [lo + align * ((2 * (hi - lo) * i + n * align) // (2 * n * align))
                    for i in range(n)] + [hi]
        else:
            cuts = [lo + (hi - lo) * i // n for i in range(n + 1)]
        groups.append(range(len(bounds), len(bounds) + n))
        bounds += zip(cuts[:-1], cuts[1:])
    return bounds, groups


#: holders of the process-wide one-thread limit of BLAS, and the limiter that restores it
_blas_lock = threading.Lock()
_blas_holders = 0
_blas_limiter = None

#: the size of a transparent huge page on x86-64
HUGE_PAGE = 2 << 20
#: elements added to the rows of a buffer whose columns are walked: rows of a power of
#: two in length would put a whole column into a few sets of the cache
_ROW_PAD = 16


class _Overlay(list):
    """Alternative buffers laid over the same memory, for work that uses them one after another."""


def _carve(shapes, dtype):
    """Arrays of ``shapes`` (nested lists and dicts of shape tuples), all views of one allocation.

    The items of an :class:`_Overlay` start at the same place and share their memory.

    From one huge page of buffers on, the allocation starts on a huge-page boundary
    and is large enough (4 MiB) for NumPy to ask the kernel for huge pages (where
    ``transparent_hugepage`` is ``madvise`` or ``always``): the GEMMs walk ``xh``
    and ``dz`` with strides of kilobytes, and with 4 KiB pages nearly every step of
    that walk missed the TLB.
    Each array starts on a cache line.
    """
    itemsize = np.dtype(dtype).itemsize
    total = 0

    def plan(node):
        nonlocal total
        if isinstance(node, dict):
            return {key: plan(value) for key, value in node.items()}
        if isinstance(node, _Overlay):
            start = end = total
            planned = []
            for value in node:
                total = start
                planned.append(plan(value))
                end = max(end, total)
            total = end
            return planned
        if isinstance(node, list):
            return [plan(value) for value in node]
        offset = total
        total += -(-math.prod(node) * itemsize // 64) * 64  # whole cache lines
        return offset, node

    planned = plan(shapes)
    align = HUGE_PAGE if total >= HUGE_PAGE else 64
    raw = np.empty(total + align, np.uint8)
    start = -raw.ctypes.data % align

    def build(node):
        if isinstance(node, dict):
            return {key: build(value) for key, value in node.items()}
        if isinstance(node, list):
            return [build(value) for value in node]
        offset, shape = node
        begin = start + offset
        return raw[begin:begin + math.prod(shape) * itemsize].view(dtype).reshape(shape)

    return build(planned)


def _nbytes(shapes, dtype):
    """Bytes of the arrays of ``shapes`` (nested lists and dicts of shape tuples)."""
    if isinstance(shapes, dict):
        shapes = list(shapes.values())
    if isinstance(shapes, list):
        return sum(_nbytes(value, dtype) for value in shapes)
    return math.prod(shapes) * np.dtype(dtype).itemsize


class _Workspace:
    """Every buffer one forward (+ backward) of a given shape needs, per chunk and layer.

    ``mode`` is ``"inference"``, ``"train"`` (a forward whose buffers a later
    backward reads: each chunk has its own) or ``"step"`` (a training step: the
    chunks of one worker run forward and backward one after another, on the same
    buffers).  Chunks have at most ``choices.max_chunk_rows`` rows (a
    :class:`.cpu_choices.Choices`); training chunks hold at most
    ``choices.train_chunk_bytes`` of state where the weights stay in L2.
    """

    def __init__(self, spec, batch, steps, dtype, mode, threads, choices, bf16=False):
        H, G, L, D = spec.hidden_size, 4 * spec.hidden_size, spec.num_layers, spec.num_directions
        train = mode != "inference"
        self.steps = steps
        # per layer: the width of [input, h]
        widths = [spec.layer_input_size(k) + H for k in range(L)]
        # rows of the step buffers: every step kept (packed) in training, two in turn else
        slots = steps if train else 2

        def chunk_shapes(R, bf16=bf16, gathered=True):
            layers = [[dict(xh=(slots * R, K), c=(slots * R, H), z=(R, G), h_last=(R, H))
                       for _ in range(D)] for K in widths]
            if train:
                for layer in layers:
                    for run in layer:
                        run["gates"] = (steps * R, G)
            shapes = dict(layers=layers, hseq=[(R, steps, D * H)] * (L - 1))
            if gathered:  # the chunk's rows of the input where the batch is reordered (a
                # fresh array each time cost more than the copy: its pages were new)
                shapes["x"] = (R, steps, spec.input_size)
            if train:
                shapes.update(dz=(steps * R, G), dh=(R, H), dc=(R, H), dlast=(R, D * H))
            if bf16:  # packed operands (uint32 pairs, carved as float32 of the same size)
                g = gemm_bf16_cpu
                scratch = dict(step=(R, g.pairs(max(max(widths), G))))
                if train:
                    P = steps * R  # the packed steps the weight gradient and dx run over
                    scratch.update(grad_a=(g.pairs(P) * g.panel_columns(max(widths)),),
                                   grad_b=(g.pairs(P) * g.panel_columns(G),), dx=(P, g.pairs(G)))
                shapes["bf16"] = scratch
            return shapes

        max_rows = choices.max_chunk_rows
        weight_bytes = max(widths) * G * np.dtype(dtype).itemsize
        if train and choices.train_chunk_bytes and _small_chunks_pay_off(weight_bytes):
            # every buffer of a chunk has a length proportional to its rows (the float32
            # state only: bfloat16's scratch is read by one GEMM at a time, and the gathered
            # input as the caller's would be, a step at a time)
            row_bytes = _nbytes(chunk_shapes(1, bf16=False, gathered=False), dtype)
            max_rows = min(max_rows, max(gemm_cpu.MR, choices.train_chunk_bytes // row_bytes))
        self.rows, self.groups = _chunk_plan(batch, threads, max_rows, gemm_cpu.MR)
        if mode == "step":
            chunks = [_Overlay(chunk_shapes(hi - lo) for lo, hi in (self.rows[i] for i in group))
                      for group in self.groups]
        else:
            chunks = [chunk_shapes(hi - lo) for lo, hi in self.rows]
        runs = L * D  # one recurrence per layer and direction
        shapes = dict(chunks=chunks, h_last=(batch, D * H), w_cat_t=[(K, G) for K in widths
                                                                   for _ in range(D)],
                      bias=[(G,)] * runs, zeros=(max(hi - lo for lo, hi in self.rows), H))
        if bf16:  # the weights packed for gemm_bf16_cpu, by CPUBackend._prepare
            g = gemm_bf16_cpu
            shapes["w16"] = [(g.pairs(K), g.panel_columns(G)) for K in widths for _ in range(D)]
            if train:
                shapes["w_hh16"] = [(g.pairs(G), g.panel_columns(H))] * runs
                shapes["w_ih16"] = [(g.pairs(G), g.panel_columns(K - H)) for K in widths
                                    for _ in range(D)]
        elif choices.own_step_gemm:  # the weights packed for gemm_cpu, by CPUBackend._prepare
            g = gemm_cpu
            shapes["w_panels"] = [(g.panel_count(G), K, g.NR) for K in widths for _ in range(D)]
            if train:
                shapes["w_hh_panels"] = [(g.panel_count(H), G, g.NR)] * runs
        if train:
            # per layer and direction, for each worker: the weight gradient of its rows
            # (transposed, as ``w_cat_t``) and their bias gradient.  The rows of the
            # weight gradient are padded: 4H floats are a power of two, and the
            # transposed sum into the gradient, which walks its columns, then hit a
            # few sets of the cache only.
            workers = len(self.groups)
            shapes["dw"] = [(workers, K, G + _ROW_PAD) for K in widths for _ in range(D)]
            shapes["db"] = [(workers, G)] * runs
            # the head's outputs and their gradient, in train_step
            shapes["outputs"] = shapes["doutputs"] = (batch, spec.output_size)
            # the recurrent dropout masks of each chunk's runs, kept from forward to backward
            shapes["h_mask"] = [(runs, hi - lo, H) for lo, hi in self.rows]
        self.__dict__.update(_carve(shapes, dtype))
        self.zeros[...] = 0  # the initial states of rows that start from zero
        if bf16:
            for name in ("w16", "w_hh16", "w_ih16"):
                if name in self.__dict__:
                    setattr(self, name, [w.view(np.uint32) for w in getattr(self, name)])
        if mode == "step":
            self.chunks = [chunk for group in self.chunks for chunk in group]
        for chunk in self.chunks if bf16 else ():
            chunk["bf16"] = {name: a.view(np.uint32) for name, a in chunk["bf16"].items()}
        if train:
            self.dw = [dw[:, :, :G] for dw in self.dw]

    def order(self, lengths):
        """The order of the batch's rows for ``lengths`` (or ``None``: as they are).

        Rows are dealt in turn to the workers, longest first, so each worker gets an
        even share of the steps and each chunk's rows are sorted longest first (the
        rows still active at a step are then a prefix of the chunk).
        """
        if lengths is None:
            return None
        sizes = [sum(self.rows[i][1] - self.rows[i][0] for i in group) for group in self.groups]
        # the workers' shares differ by one row at most (_chunk_plan): a round of every
        # worker, as many times as the smallest share, then one more row each for those
        # with one more
        workers, rounds = len(sizes), min(sizes)
        ranked = np.argsort(-lengths, kind="stable")
        dealt = list(ranked[:rounds * workers].reshape(rounds, workers).T)
        extra = iter(ranked[rounds * workers:])
        dealt = [np.append(rows, next(extra)) if size > rounds else rows
                 for rows, size in zip(dealt, sizes)]
        return np.concatenate(dealt)


class CPUBackend(Backend):
    """Numba kernels + BLAS, float32 or float64 (or bfloat16 GEMMs), on ``num_threads`` threads.

    Parameters
    ----------
    num_threads : int, optional
        Threads to use; default :func:`default_num_threads`.
    precision : {"float32", "bfloat16", "auto"}, default="float32"
        ``"bfloat16"``: the LSTM's GEMMs (those :mod:`fastlstm.precision` names) round their
        operands to bfloat16 and sum in float32, on AVX512-BF16 (``vdpbf16ps``); the
        parameters are then float32.  ``"auto"`` is float32 (never a lower precision
        than asked for).  AMX (``tdpbf16ps``) is not used.
    choices : fastlstm.backends.cpu_choices.Choices, optional
        Which GEMM (ours or BLAS) the time loop and the weight gradients run on, and the
        chunk sizes.  Default: :func:`.cpu_choices.cpu_choices`, measured on this CPU
        (or fixed by ``FASTLSTM_CPU_CHOICES``).  With our GEMM, a row's results do not
        depend on its place in the batch; with BLAS they may differ in the last bits.

    Raises
    ------
    BackendUnavailable
        ``precision="bfloat16"`` on a CPU without AVX512-BF16.
    """

    name = "cpu"

    def __init__(self, num_threads=None, precision="float32", choices=None):
        self.precision = check_precision(precision)
        if self.precision == "bfloat16" and not gemm_bf16_cpu.available():
            raise BackendUnavailable(
                "precision='bfloat16' needs a CPU with the AVX512-BF16 instruction set "
                f"(vdpbf16ps; Linux flag {gemm_bf16_cpu.CPUINFO_FLAG!r}), and this one lacks "
                "it (AMX is not used); use precision='float32'")
        if self.precision == "bfloat16":
            _say_if_bf16_cannot_pay()
        self.num_threads = int(num_threads) if num_threads else default_num_threads()
        self.choices = cpu_choices() if choices is None else choices
        self._pool = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._blas = ThreadpoolController().select(user_api="blas")

    # -- threads and buffers -------------------------------------------------------------

    def _run(self, work, groups):
        """Call ``work(worker, groups[worker])`` for every worker, one per thread.

        Callers hold :meth:`_single_threaded_blas`.
        """
        if len(groups) == 1:
            work(0, groups[0])
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="fastlstm")
        futures = [self._pool.submit(work, w, groups[w]) for w in range(1, len(groups))]
        work(0, groups[0])
        for f in futures:
            f.result()

    @contextlib.contextmanager
    def _single_threaded_blas(self):
        """BLAS on one thread while our threads run.

        BLAS has one setting per process: the first holder (of any thread) sets it
        and the last restores it.  Setting and restoring is not free (OpenBLAS wakes
        its threads when given them back); a :meth:`session` pays it once for a
        whole fit.
        """
        global _blas_holders, _blas_limiter
        with _blas_lock:
            if _blas_holders == 0:
                _blas_limiter = self._blas.limit(limits=1)
            _blas_holders += 1
        try:
            yield
        finally:
            with _blas_lock:
                _blas_holders -= 1
                if _blas_holders == 0:
                    _blas_limiter.restore_original_limits()
                    _blas_limiter = None

    def session(self):
        return self._single_threaded_blas()

    def _workspace(self, spec, batch, steps, dtype, mode):
        """A workspace for this shape and mode (see :class:`_Workspace`): the last one,
        unless a forward cache still holds it.

        A training forward returns its workspace inside the cache that backward needs;
        it is reused once the caller has dropped that cache (no reference left but ours),
        so a training loop or a benchmark does not pay for fresh memory on every step.
        """
        cache = self._local.__dict__.setdefault("workspaces", {})
        key = (spec, batch, steps, np.dtype(dtype).str, mode, self.num_threads)
        ws = cache.pop(key, None)
        if ws is None or sys.getrefcount(ws) > 2:  # 2: the name ``ws`` and the call's argument
            ws = _Workspace(spec, batch, steps, dtype, mode, self.num_threads, self.choices,
                            self.precision == "bfloat16")
            while len(cache) >= MAX_WORKSPACES:
                cache.pop(next(iter(cache)))
        cache[key] = ws
        return ws

    # -- the interface -------------------------------------------------------------------

    # Every method that calls BLAS holds _single_threaded_blas, even for the small
    # GEMMs of the head: BLAS's own threads, once woken, spin for a while and take
    # the cores from ours.

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None,
                dropout=None):
        with self._single_threaded_blas():
            return self._forward(spec, params, x, h0, c0, train, lengths,
                                 dropout if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        with self._single_threaded_blas():
            return self._backward(spec, params, cache, doutputs, input_grads)

    def _forward(self, spec, params, x, h0, c0, train, lengths, dropout):
        x = np.ascontiguousarray(x, dtype=params.dtype)
        h0, c0 = self.initial_states(spec, params, x, h0, c0)
        if x.shape[0] == 0:
            return np.empty((0, spec.output_size), params.dtype), None
        views, x, ws, order, lengths = self._prepare(spec, params, x, lengths,
                                                     "train" if train else "inference")
        if order is not None:
            h0, c0 = (None if a is None else a[:, order] for a in (h0, c0))
        outputs = np.empty((x.shape[0], spec.output_size), params.dtype)
        dropout = _DropoutPlan.of(spec, dropout, order, x.shape[0], params.dtype)

        def work(worker, chunk_ids):
            for ci in chunk_ids:
                ops = _ChunkOps(self, spec, views, ws, ci, outputs, order=order, dropout=dropout)
                model.forward(ops, spec, x, h0, c0, _rows(lengths, ws.rows[ci]))

        self._run(work, ws.groups)
        cache = dict(ws=ws, h0_zero=h0 is None, c0=c0, lengths=lengths, order=order,
                     dropout=dropout) if train else None
        return _unordered(outputs, order), cache

    def _backward(self, spec, params, cache, doutputs, input_grads):
        views = self._views(spec.layout, params)
        ws, order, lengths = cache["ws"], cache["order"], cache["lengths"]
        self._pack_backward_weights(spec, views, ws)
        L, H, T = spec.num_layers * spec.num_directions, spec.hidden_size, ws.steps
        doutputs = np.ascontiguousarray(doutputs, dtype=params.dtype)
        if order is not None:
            doutputs = doutputs[order]
        B = doutputs.shape[0]
        dinputs = None
        if input_grads:
            dinputs = (np.zeros((B, T, spec.input_size), params.dtype),
                       np.empty((L, B, H), params.dtype), np.empty((L, B, H), params.dtype))

        def work(worker, chunk_ids):
            for n, ci in enumerate(chunk_ids):
                ops = _ChunkOps(self, spec, views, ws, ci, None, worker, n == 0,
                                cache["h0_zero"], cache["c0"], dinputs, order,
                                cache["dropout"])
                ops.inputs(None, _rows(lengths, ws.rows[ci]))
                dx = model.backward(ops, spec, doutputs, input_grads)
                if input_grads:
                    ops.scatter(dx, dinputs[0])

        self._run(work, ws.groups)
        grads = np.empty_like(params)
        self._sum_gradients(spec, ws, doutputs, grads)
        if dinputs is None:
            return Gradients(grads)
        dx, dh0, dc0 = dinputs
        return Gradients(grads, _unordered(dx, order), _unordered(dh0, order, axis=1),
                         _unordered(dc0, order, axis=1))

    def train_step(self, spec, params, state, x, y, loss, config, lengths=None,
                   sample_weight=None, dropout=None):
        # The step of the base class with ONE meeting of the threads: the head and the
        # gradient of the loss are per row too, so each thread runs forward, head, loss
        # gradient and backward for its chunks; the loss value and the gradient sums
        # come after.  Every piece computes what forward/loss/backward do, in the same
        # order, so the two give identical results (with lengths, the rows are summed in
        # the order of the chunks: the loss value may then differ in its last bit, the
        # update does not).  Each chunk's loss gradient divides by the whole batch's
        # weight sum, taken before the threads start.  Buffers are reused between steps.
        kernel, y_dtype = self._loss_kernel(loss, params.dtype)
        weights, weight_sum = check_sample_weight(sample_weight, len(x))
        if not weight_sum > 0:
            return 0.0  # a batch of no weight: no step (see Backend.train_step)
        with self._single_threaded_blas():
            views, x, ws, order, lengths = self._prepare(spec, params, x, lengths, "step")
            y = np.asarray(y, dtype=y_dtype)
            if order is not None:
                y = y[order]
                weights = None if weights is None else weights[order]
            dropout = _DropoutPlan.of(spec, dropout, order, x.shape[0], params.dtype)
            outputs, doutputs = ws.outputs, ws.doutputs

            def work(worker, chunk_ids):
                # A diverged step reaches backward here with a non-finite loss; it is
                # detected below and the update skipped, so NumPy need not warn (errstate
                # is per thread, hence set in each).
                with np.errstate(over="ignore", invalid="ignore"):
                    for n, ci in enumerate(chunk_ids):
                        ops = _ChunkOps(self, spec, views, ws, ci, outputs, worker, n == 0,
                                        order=order, dropout=dropout)
                        model.forward(ops, spec, x, lengths=_rows(lengths, ws.rows[ci]))
                        lo, hi = ws.rows[ci]
                        kernel(outputs[lo:hi], y[lo:hi], _rows(weights, ws.rows[ci]),
                               doutputs[lo:hi], weight_sum)
                        model.backward(ops, spec, doutputs)

            self._run(work, ws.groups)
            # the batch's loss, summed in order
            value = float(kernel(outputs, y, weights, doutputs, weight_sum))
            if not math.isfinite(value):
                return value
            grads = self._grad_buffer(params)
            self._sum_gradients(spec, ws, doutputs, grads)
            self._apply_gradients(params, grads, state, config)
        return value

    # -- the pieces of a step ------------------------------------------------------------

    def _prepare(self, spec, params, x, lengths, mode):
        """Views of ``params``, ``x`` contiguous in their dtype, a workspace of ``mode``
        whose concatenated transposed weights and summed biases are filled in, and the
        order of the rows with their lengths (``None`` where every row has all steps:
        the rows then keep their order)."""
        if self.precision == "bfloat16" and params.dtype != np.float32:
            raise ValueError(f"precision='bfloat16' computes with float32 parameters, got "
                             f"{params.dtype}")
        layout = spec.layout
        views = self._views(layout, params)
        x = np.ascontiguousarray(x, dtype=params.dtype)
        ws = self._workspace(spec, x.shape[0], x.shape[1], params.dtype, mode)
        for k in range(spec.num_layers):
            for d in range(spec.num_directions):
                w_ih, w_hh, b_ih, b_hh = layout.layer(views, k, reverse=d == 1)
                n, n_in = k * spec.num_directions + d, w_ih.shape[1]
                ws.w_cat_t[n][:n_in] = w_ih.T
                ws.w_cat_t[n][n_in:] = w_hh.T
                np.add(b_ih, b_hh, out=ws.bias[n])
                if self.precision == "bfloat16":
                    gemm_bf16_cpu.pack_panels(ws.w_cat_t[n], ws.w16[n])
                elif self.choices.own_step_gemm:
                    gemm_cpu.pack_panels(ws.w_cat_t[n], ws.w_panels[n])
        if mode == "step":  # train_step's backward (a separate backward packs its own)
            self._pack_backward_weights(spec, views, ws)
        # every row with every step takes the fixed-length path, bit for bit
        lengths = check_lengths(lengths, *x.shape[:2])
        order = ws.order(lengths)
        return views, x, ws, order, None if order is None else lengths[order]

    def _pack_backward_weights(self, spec, views, ws):
        """Pack the weights backward multiplies by (``W_hh``; in bfloat16 ``W_ih`` too) into
        ``ws`` for the GEMM that runs them (nothing for BLAS), from ``views``: backward
        multiplies by the parameters it is given, as BLAS does, even where a forward of
        other parameters filled ``ws``."""
        for k in range(spec.num_layers):
            for d in range(spec.num_directions):
                w_ih, w_hh = spec.layout.layer(views, k, reverse=d == 1)[:2]
                n = k * spec.num_directions + d
                if self.precision == "bfloat16":
                    gemm_bf16_cpu.pack_panels(w_hh, ws.w_hh16[n])
                    gemm_bf16_cpu.pack_panels(w_ih, ws.w_ih16[n])
                elif self.choices.own_step_gemm:
                    gemm_cpu.pack_panels(w_hh, ws.w_hh_panels[n])

    def _sum_gradients(self, spec, ws, doutputs, grads):
        """The head's gradients and the sums of the workers' partial LSTM gradients,
        into ``grads``."""
        layout = spec.layout
        gviews = self._views(layout, grads)
        head_cpu.linear_gradients(doutputs, ws.h_last, gviews["head.weight"], gviews["head.bias"])
        for k in range(spec.num_layers):
            for d in range(spec.num_directions):
                n = k * spec.num_directions + d
                dw, db = ws.dw[n], ws.db[n]
                w_ih, w_hh, b_ih, b_hh = layout.layer(gviews, k, reverse=d == 1)
                n_in = w_ih.shape[1]
                reduce_cpu.sum_transposed(dw[:, :n_in], w_ih)
                reduce_cpu.sum_transposed(dw[:, n_in:], w_hh)
                reduce_cpu.sum_rows(db, b_ih)
                b_hh[...] = b_ih

    def _views(self, layout, flat):
        """``layout.views(flat)``, remembered for the last few buffers: a training loop
        passes the same parameter and gradient buffers at every step.  An entry holds
        ``flat`` itself (views may hold only its base), so no other buffer can take its
        ``id`` while the entry is kept."""
        cache = self._local.__dict__.setdefault("views", {})
        key = (id(flat), layout.key())
        if key not in cache:
            cache[key] = (flat, layout.views(flat))
            while len(cache) > MAX_WORKSPACES:
                cache.pop(next(iter(cache)))
        return cache[key][1]

    def _grad_buffer(self, params):
        """The gradient buffer of :meth:`train_step`, reused from one step to the next."""
        buf = getattr(self._local, "grads", None)
        if buf is None or buf.shape != params.shape or buf.dtype != params.dtype:
            buf = self._local.grads = np.empty_like(params)
        return buf

    @staticmethod
    def _loss_kernel(kind, dtype):
        """The head kernel of loss ``kind`` and the dtype its targets take."""
        loss = get_loss(kind)
        return getattr(head_cpu, loss.name), loss.target_dtype(dtype)

    def loss(self, outputs, y, kind, sample_weight=None):
        kernel, y_dtype = self._loss_kernel(kind, outputs.dtype)
        weights, weight_sum = check_sample_weight(sample_weight, len(outputs))
        if not weight_sum > 0:
            return 0.0, np.zeros_like(outputs)
        doutputs = np.empty_like(outputs)
        value = kernel(outputs, np.asarray(y, dtype=y_dtype), weights, doutputs, weight_sum)
        return float(value), doutputs

    def softmax(self, outputs):
        probs = np.empty_like(outputs)
        head_cpu.softmax(outputs, probs)
        return probs

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        state.step += 1
        adam_cpu.adam_update(params, grads, state.m, state.v, float(config.learning_rate),
                             float(config.beta1), float(config.beta2), float(config.eps),
                             float(config.weight_decay), float(grad_scale), state.step)


def _rows(per_row, bounds):
    """The lengths (or weights) of the rows ``bounds`` (``None`` stays ``None``)."""
    return None if per_row is None else per_row[bounds[0]:bounds[1]]


def _unordered(a, order, axis=0):
    """``a``, whose rows along ``axis`` are in ``order``, back in the caller's order."""
    if order is None:
        return a
    out = np.empty_like(a)
    index = [slice(None)] * a.ndim
    index[axis] = order
    out[tuple(index)] = a
    return out


@functools.lru_cache(maxsize=64)
def _full_steps(rows, steps, ring):
    """:func:`lstm_cpu.packed_steps` of a chunk whose rows have every step (either direction)."""
    return lstm_cpu.packed_steps(np.full(rows, steps, np.int64), rows, ring, False)


class _DropoutPlan:
    """The dropout of one batch (:mod:`fastlstm.dropout`), made once per call for all chunks.

    ``keys[i, r]``: the key of mask ``i`` for row ``r`` of the chunks' order (the rows
    numbered as the caller's batch: ``order``); ``recurrent_keys[n]`` and
    ``between_keys[k]``: the mask of recurrence ``n`` and of layer ``k``'s output;
    ``recurrent`` and ``between``: their ``(threshold, scale)``.
    """

    def __init__(self, spec, dropout, order, batch, dtype):
        D, L = spec.num_directions, spec.num_layers
        streams = []
        self.recurrent_keys, self.between_keys = {}, {}
        between, recurrent = masks.kinds(dropout, spec)
        if recurrent:
            for n in range(L * D):
                self.recurrent_keys[n] = len(streams)
                streams.append(masks.recurrent_stream(n // D, n % D))
        if between:
            for k in range(L - 1):
                self.between_keys[k] = len(streams)
                streams.append(masks.between_stream(k))
        rows = np.arange(batch) if order is None else order
        self.keys = masks.row_keys(dropout.seed, np.array(streams, np.uint64), rows)
        self.recurrent, self.between = ((np.uint64(masks.threshold(p)), dtype.type(1 / (1 - p)))
                                        for p in (dropout.recurrent_p, dropout.p))

    @classmethod
    def of(cls, spec, dropout, order, batch, dtype):
        """The plan of ``dropout``, or ``None`` where nothing is dropped."""
        if not any(masks.kinds(dropout, spec)):
            return None
        return cls(spec, dropout, order, batch, np.dtype(dtype))


class _ChunkOps:
    """The primitives of :mod:`fastlstm.model` on the rows of chunk ``ci`` of a workspace.

    The rows are sorted by length, longest first (see :meth:`_Workspace.order`).  A
    sequence is an array of these rows, batch-major: the input ``x``, or a layer's
    hidden states (both directions write their halves of one buffer, so ``join``
    has nothing to do).  The gradient of one is, per recurrence, the gradient
    w.r.t. each valid step's hidden state, packed as that recurrence's steps, or
    ``None`` for the top layer, whose gradient comes from the head.

    Parameters
    ----------
    backend : CPUBackend
    spec : ModelSpec
    views : dict
        Named views of the parameters.
    ws : _Workspace
    ci : int
        The chunk.
    outputs : array or None
        The head's outputs of the whole batch (forward).
    worker : int
        The thread's number: its partial weight gradients are ``ws.dw[n][worker]``.
    first : bool
        This is the worker's first chunk: its gradients are written, not added.
    h0_zero : bool
        The forward pass started from ``h0 = 0`` (backward skips that product).
    c0 : array or None
        The initial cell states of the whole batch that forward started from (backward).
    dinputs : tuple or None
        ``(dx, dh0, dc0)`` of the whole batch, whose rows of this chunk backward fills
        (``dh0`` and ``dc0``; ``dx`` by :meth:`scatter`).
    order : array or None
        The batch's rows in the order of the chunks (:meth:`_Workspace.order`): the chunk
        gathers its rows of ``x`` itself, on its own thread, right before reading them.
    dropout : _DropoutPlan or None
        The masks of the batch: recurrent ones are made by forward and kept in the
        workspace for backward; those between layers are recomputed where used.
    """

    def __init__(self, backend, spec, views, ws, ci, outputs, worker=0, first=True,
                 h0_zero=True, c0=None, dinputs=None, order=None, dropout=None):
        self.choices, self.spec, self.views, self.ws = backend.choices, spec, views, ws
        self.ci, self.chunk, (self.lo, self.hi) = ci, ws.chunks[ci], ws.rows[ci]
        self.dropout = dropout
        self.outputs, self.worker, self.first = outputs, worker, first
        self.h0_zero, self.c0, self.dinputs, self.order = h0_zero, c0, dinputs, order
        self.ring = "gates" not in self.chunk["layers"][0][0]
        self.bf16 = self.chunk.get("bf16")  # the packed operands' scratch, in bfloat16

    def _packed(self, weights, n):
        """``(b16, a16)`` of :func:`gemm_bf16_cpu.matmul` for the packed ``weights`` of
        recurrence ``n`` (a list of the workspace), float32's where ``bf16`` is off."""
        if self.bf16 is None:
            return gemm_bf16_cpu.FLOAT32
        return getattr(self.ws, weights)[n], self.bf16["step"]

    def _panels(self, weights, n):
        """The ``panels`` of :func:`gemm_cpu.matmul` for the packed ``weights`` of recurrence
        ``n`` (a list of the workspace), or none (BLAS, or bfloat16's own packing)."""
        panels = getattr(self.ws, weights, None)
        return gemm_cpu.no_panels(self.ws.zeros.dtype) if panels is None else panels[n]

    def inputs(self, x, lengths):
        R, T = self.hi - self.lo, self.ws.steps
        if lengths is None:
            self.steps = [_full_steps(R, T, self.ring)] * 2
        else:  # rows longest first: the active rows of a step are a prefix of the chunk
            self.steps = [lstm_cpu.packed_steps(lengths, R, self.ring, reverse)
                          for reverse in (False, True)]
        if x is None:
            return None
        if self.order is None:
            return x[self.lo:self.hi]
        lstm_cpu.gather_rows(x, self.order[self.lo:self.hi], self.chunk["x"])
        return self.chunk["x"]

    def _run(self, k, reverse):
        return self.chunk["layers"][k][reverse], k * self.spec.num_directions + reverse

    def _dropout(self, k, reverse, make_masks):
        """``(h_mask, out_keys, out_drop)`` of the kernels for layer ``k``'s direction;
        ``make_masks``: forward, which fills in the recurrent masks."""
        h_mask, out_keys, out_drop = lstm_cpu.no_dropout(self.ws.zeros.dtype)
        plan, lo, hi = self.dropout, self.lo, self.hi
        if plan is None:
            return h_mask, out_keys, out_drop
        n = k * self.spec.num_directions + reverse
        if n in plan.recurrent_keys:
            h_mask = self.ws.h_mask[self.ci][n]
            if make_masks:
                dropout_cpu.fill_masks(plan.keys[plan.recurrent_keys[n], lo:hi],
                                       *plan.recurrent, h_mask)
        if k in plan.between_keys:
            H = self.spec.hidden_size
            out_keys = plan.keys[plan.between_keys[k], lo:hi]
            out_drop = (*plan.between, reverse * H, self.spec.num_directions * H)
        return h_mask, out_keys, out_drop

    def recurrence(self, k, seq, h0, c0, reverse):
        (run, n), lo, hi = self._run(k, reverse), self.lo, self.hi
        H = self.spec.hidden_size
        zeros = self.ws.zeros[:hi - lo]
        if k < self.spec.num_layers - 1:
            hseq = self.chunk["hseq"][k][:, :, reverse * H:(reverse + 1) * H]
        else:
            hseq = np.empty((hi - lo, 0, H), zeros.dtype)  # the top layer's is not kept
        active, slot, cslot = self.steps[reverse]
        forward_layer = lstm_cpu.layer_kernels(H)[0]
        forward_layer(seq, self.ws.w_cat_t[n], self.ws.bias[n], run["xh"], run["c"],
                      run.get("gates"), hseq, run["h_last"], run["z"],
                      zeros if h0 is None else h0[lo:hi], zeros if c0 is None else c0[lo:hi],
                      active, slot, cslot, h0 is None, reverse, self._panels("w_panels", n),
                      *self._dropout(k, reverse, make_masks=True), *self._packed("w16", n))
        return self.chunk["hseq"][k] if k < self.spec.num_layers - 1 else None

    def join(self, outs):
        return outs[0]  # the directions write their halves of one buffer

    def readout(self, outs):
        h_last, H = self.ws.h_last[self.lo:self.hi], self.spec.hidden_size
        top = self.spec.num_layers - 1
        for d in range(len(outs)):
            h_last[:, d * H:(d + 1) * H] = self._run(top, d)[0]["h_last"]
        return h_last

    def head(self, h):
        out = self.outputs[self.lo:self.hi]
        head_cpu.linear(h, self.views["head.weight"], self.views["head.bias"], out)
        return out

    def head_backward(self, doutputs):
        dlast = self.chunk["dlast"]
        np.matmul(doutputs[self.lo:self.hi], self.views["head.weight"], out=dlast)
        return dlast

    def readout_backward(self, dh):
        # head_backward left ``dh`` in the chunk's ``dlast``, where each direction of the
        # top layer takes its half from
        return [None] * self.spec.num_directions

    def recurrence_backward(self, k, dseq, reverse, input_grads):
        """Backward through one direction of layer ``k``; its weight and bias gradients are
        written (the worker's ``first`` chunk) or added to the worker's partial sums."""
        chunk, ws, lo, hi = self.chunk, self.ws, self.lo, self.hi
        dz, dh, dc = chunk["dz"], chunk["dh"], chunk["dc"]
        H = self.spec.hidden_size
        run, n = self._run(k, reverse)
        w_ih, w_hh = self.spec.layout.layer(self.views, k, reverse)[:2]
        dw, db = ws.dw[n][self.worker], ws.db[n][self.worker]
        active, slot, cslot = self.steps[reverse]
        P = slot[-1]  # rows of the packed steps
        if dseq is None:  # the top layer: the gradient of its last states
            dh[...] = chunk["dlast"][:, reverse * H:(reverse + 1) * H]
            dseq = np.empty((0, H), dz.dtype)
        else:
            dh[...] = 0
        dc[...] = 0
        if self.first:
            db[...] = 0
        c_init = self.ws.zeros[:hi - lo] if self.c0 is None else self.c0[n, lo:hi]
        backward_layer = lstm_cpu.layer_kernels(H)[1]
        backward_layer(run["gates"], run["c"], c_init, w_hh, dseq, dz, dh, dc, db, active, slot,
                       cslot, self.dinputs is not None, self._panels("w_hh_panels", n), reverse,
                       *self._dropout(k, reverse, False), *self._packed("w_hh16", n))
        dz2, xh2 = dz[:P], run["xh"][:P]
        # with h0 = 0 the h part of the first step is zero: one GEMM over the other
        # steps, then the first step's x part alone (not two GEMMs over all steps:
        # each pass streams dz from L3)
        skip = active[0] if self.h0_zero else 0
        self._weight_gradient(xh2[skip:], dz2[skip:], dw, self.first)
        if skip:
            n_in = xh2.shape[1] - H
            self._weight_gradient(xh2[:skip, :n_in], dz2[:skip], dw[:n_in], False)
        if self.dinputs is not None:
            self.dinputs[1][n, lo:hi] = dh
            self.dinputs[2][n, lo:hi] = dc
        if not input_grads:
            return None
        if self.bf16 is None:
            return np.matmul(dz2, w_ih)
        dx, dz16 = np.empty((P, w_ih.shape[1]), dz2.dtype), self.bf16["dx"][:P]
        gemm_bf16_cpu.pack_rows(dz2, dz16)
        gemm_bf16_cpu.gemm(dz16, self.ws.w_ih16[n], dx, False)
        return dx

    def join_backward(self, dins, parts):
        """The directions' parts (each packed in its own order) summed, in each order the
        ``parts`` recurrences below read them: forward's, then reverse's."""
        H = self.spec.hidden_size
        (fwd, f_slot), (rev, r_slot) = ((d, self.steps[i][1]) for i, d in enumerate(dins))
        active = self.steps[0][0]
        if parts == 1:
            lstm_cpu.add_steps(fwd, f_slot, rev, r_slot, active, True)
            return [fwd]
        lstm_cpu.add_steps(fwd[:, :H], f_slot, rev[:, :H], r_slot, active, True)
        lstm_cpu.add_steps(rev[:, H:], r_slot, fwd[:, H:], f_slot, self.steps[1][0], True)
        return [fwd[:, :H], rev[:, H:]]

    def scatter(self, dx, out):
        """The packed gradient ``dx`` of the input (forward's order) into ``out``'s rows,
        batch-major (zero past each row's length)."""
        active, slot, _ = self.steps[0]
        rows = out[self.lo:self.hi]
        for t in range(len(active) - 1):
            rows[:active[t], t] = dx[slot[t]:slot[t] + active[t]]

    def _weight_gradient(self, rows, dz2, out, first):
        """``out (+)= rows^T @ dz2``: written for the ``first`` chunk of a worker, else added."""
        if self.bf16 is not None:
            gemm_bf16_cpu.gemm_xt(rows, dz2, self.bf16["grad_a"], self.bf16["grad_b"], out,
                                  not first)
        elif self.choices.own_grad_gemm:
            gemm_cpu.gemm(rows.T, dz2, out, not first)
        elif first:
            np.matmul(rows.T, dz2, out=out)
        else:
            out += np.matmul(rows.T, dz2)
