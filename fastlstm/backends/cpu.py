"""CPU backend: the Numba kernels of :mod:`fastlstm.kernels` and BLAS, on a few threads.

The rows of a batch never interact inside an LSTM, so a batch is cut into
chunks of rows and each thread runs whole chunks (every layer, every time step)
with single-threaded BLAS: no thread waits for another inside the time loop,
and Numba's threads and OpenBLAS's threads never compete for the cores.  The
threads meet twice per training step: after the forward pass (the head and the
loss see the whole batch) and after the backward pass (each thread's partial
weight gradients are summed).

Per chunk and layer, forward: one GEMM per step ``[x_t, h_{t-1}] @ [W_ih,
W_hh]^T`` and one fused pass for the gates (:func:`lstm_cpu.forward_layer`);
backward: one fused pass per step and ``dz_t @ W_hh``, then the weight
gradients (transposed) as ONE GEMM over all steps, ``[x, h_prev]^T @ dz``.
Where it is the faster (AVX-512), the GEMMs of the time loop and the weight
gradients run on the register-blocked kernel of :mod:`..kernels.gemm_cpu`
instead of BLAS: at these shapes BLAS spends a good part of each call packing
its operands.

Buffers are reused across calls (per thread and shape) once no result refers
to them any more: inference, training steps, and a forward + backward whose
cache has been dropped.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls: loaded before limiting it)
from threadpoolctl import ThreadpoolController

from ..kernels import adam_cpu, gemm_cpu, head_cpu, lstm_cpu
from .base import Backend, Gradients

#: largest number of rows per chunk: the per-step working set stays in L2
MAX_CHUNK_ROWS = 128
#: workspaces kept per thread (a full batch and an epoch's last, smaller one, ...)
MAX_WORKSPACES = 4


def default_num_threads():
    """The cores this process may run on (``FASTLSTM_NUM_THREADS`` overrides)."""
    value = os.environ.get("FASTLSTM_NUM_THREADS")
    if value:
        return max(1, int(value))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _chunk_bounds(rows, threads):
    """Row bounds of the chunks of a batch: as many per thread, at most ``MAX_CHUNK_ROWS`` rows each."""
    per_thread = -(-rows // (MAX_CHUNK_ROWS * threads))
    n = min(rows, threads * per_thread)
    return [rows * i // n for i in range(n + 1)]


class _Workspace:
    """Every buffer one forward (+ backward) of a given shape needs, per chunk and layer."""

    def __init__(self, layout, batch, steps, dtype, train, threads):
        H, G, L = layout.hidden_size, 4 * layout.hidden_size, layout.num_layers
        self.bounds = _chunk_bounds(batch, threads)
        self.chunks = []
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
            R = hi - lo
            S = steps + 1 if train else 2
            layers = []
            for k in range(L):
                K = (layout.input_size if k == 0 else H) + H
                layers.append(dict(
                    xh=np.empty((S, R, K), dtype), c=np.empty((S, R, H), dtype),
                    gates=np.empty((steps if train else 1, R, G), dtype),
                    hseq=np.empty((R, steps if k < L - 1 else 0, H), dtype),
                    z=np.empty((R, G), dtype)))
            chunk = dict(rows=(lo, hi), layers=layers)
            if train:
                chunk.update(dz=np.empty((steps, R, G), dtype), dh=np.empty((R, H), dtype),
                             dc=np.empty((R, H), dtype))
            self.chunks.append(chunk)
        self.h_last = np.empty((batch, H), dtype)
        self.w_cat_t = [np.empty(((layout.input_size if k == 0 else H) + H, G), dtype)
                        for k in range(L)]
        self.bias = [np.empty(G, dtype) for _ in range(L)]
        if train:
            # per worker and layer: the weight gradient (transposed, as ``w_cat_t``)
            # and the bias gradient of the worker's rows
            workers = min(threads, len(self.chunks))
            self.partial = [[(np.empty_like(w), np.empty(G, dtype)) for w in self.w_cat_t]
                            for _ in range(workers)]


class CPUBackend(Backend):
    """Numba kernels + BLAS, float32 or float64, on ``num_threads`` threads.

    Parameters
    ----------
    num_threads : int, optional
        Threads to use; default :func:`default_num_threads`.
    blocked_gemm : bool, optional
        Run the GEMMs inside the time loop and the weight-gradient GEMM with the
        register-blocked kernel of :mod:`fastlstm.kernels.gemm_cpu` instead of
        BLAS.  Default: where that kernel is the faster (``gemm_cpu.PAYS_OFF``).
    """

    name = "cpu"

    def __init__(self, num_threads=None, blocked_gemm=None):
        self.num_threads = int(num_threads) if num_threads else default_num_threads()
        self.blocked_gemm = gemm_cpu.PAYS_OFF if blocked_gemm is None else bool(blocked_gemm)
        self._pool = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._blas = ThreadpoolController().select(user_api="blas")

    # -- threads and buffers -------------------------------------------------------------

    def _run(self, work, n_items):
        """Call ``work(worker, items)`` for contiguous groups of ``range(n_items)``, one per thread.

        Callers hold :meth:`_single_threaded_blas`.
        """
        workers = min(self.num_threads, n_items)
        groups = [range(n_items * w // workers, n_items * (w + 1) // workers) for w in range(workers)]
        if workers == 1:
            work(0, groups[0])
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads - 1, thread_name_prefix="fastlstm")
        futures = [self._pool.submit(work, w, groups[w]) for w in range(1, workers)]
        work(0, groups[0])
        for f in futures:
            f.result()

    @contextmanager
    def _single_threaded_blas(self):
        """BLAS on one thread while our threads run (re-entrant; per thread of the caller).

        The limit is process-wide (BLAS has one setting), for the duration of one call.
        """
        depth = getattr(self._local, "blas_depth", 0)
        self._local.blas_depth = depth + 1
        try:
            if depth:
                yield
            else:
                with self._blas.limit(limits=1):
                    yield
        finally:
            self._local.blas_depth = depth

    def _workspace(self, layout, batch, steps, dtype, train):
        """A workspace for this shape: the last one, unless a forward cache still holds it.

        A training forward returns its workspace inside the cache that backward needs;
        it is reused once the caller has dropped that cache (no reference left but ours),
        so a training loop or a benchmark does not pay for fresh memory on every step.
        """
        cache = self._local.__dict__.setdefault("workspaces", {})
        key = (layout.key(), batch, steps, np.dtype(dtype).str, train, self.num_threads)
        ws = cache.pop(key, None)
        if ws is None or sys.getrefcount(ws) > 2:  # 2: the name ``ws`` and the call's argument
            ws = _Workspace(layout, batch, steps, dtype, train, self.num_threads)
            while len(cache) >= MAX_WORKSPACES:
                cache.pop(next(iter(cache)))
        cache[key] = ws
        return ws

    # -- the interface -------------------------------------------------------------------

    def forward(self, layout, params, x, h0=None, c0=None, train=False):
        with self._single_threaded_blas():
            return self._forward(layout, params, x, h0, c0, train)

    def backward(self, layout, params, cache, doutputs, input_grads=False):
        with self._single_threaded_blas():
            return self._backward(layout, params, cache, doutputs, input_grads)

    def _forward(self, layout, params, x, h0, c0, train):
        views = layout.views(params)
        dtype = params.dtype
        x = np.ascontiguousarray(x, dtype=dtype)
        B, T, _ = x.shape
        L = layout.num_layers
        ws = self._workspace(layout, B, T, dtype, train)
        for k in range(L):
            w_ih, w_hh, b_ih, b_hh = layout.layer(views, k)
            n_in = w_ih.shape[1]
            ws.w_cat_t[k][:n_in] = w_ih.T
            ws.w_cat_t[k][n_in:] = w_hh.T
            np.add(b_ih, b_hh, out=ws.bias[k])

        def work(worker, chunk_ids):
            for ci in chunk_ids:
                chunk = ws.chunks[ci]
                lo, hi = chunk["rows"]
                inp = x[lo:hi]
                for k, buf in enumerate(chunk["layers"]):
                    n_in = inp.shape[2]
                    buf["xh"][0, :, n_in:] = 0 if h0 is None else h0[k, lo:hi]
                    buf["c"][0] = 0 if c0 is None else c0[k, lo:hi]
                    lstm_cpu.forward_layer(inp, ws.w_cat_t[k], ws.bias[k], buf["xh"], buf["c"],
                                           buf["gates"], buf["hseq"], buf["z"], h0 is None,
                                           self.blocked_gemm)
                    inp = buf["hseq"]
                ws.h_last[lo:hi] = buf["xh"][T % buf["xh"].shape[0], :, n_in:]

        self._run(work, len(ws.chunks))
        outputs = np.matmul(ws.h_last, views["head.weight"].T)
        head_cpu.add_bias(outputs, views["head.bias"])
        cache = dict(ws=ws, steps=T) if train else None
        return outputs, cache

    def _backward(self, layout, params, cache, doutputs, input_grads):
        views = layout.views(params)
        ws, T = cache["ws"], cache["steps"]
        L = layout.num_layers
        grads = self._grad_buffer(params)
        gviews = layout.views(grads)
        np.matmul(doutputs.T, ws.h_last, out=gviews["head.weight"])
        np.sum(doutputs, axis=0, out=gviews["head.bias"])
        dh_last = doutputs @ views["head.weight"]
        B = dh_last.shape[0]
        if input_grads:
            dx = np.empty((B, T, layout.input_size), params.dtype)
            dh0 = np.empty((L, B, layout.hidden_size), params.dtype)
            dc0 = np.empty_like(dh0)
        no_seq = np.empty((0, 1, layout.hidden_size), params.dtype)

        def work(worker, chunk_ids):
            for n, ci in enumerate(chunk_ids):
                chunk = ws.chunks[ci]
                lo, hi = chunk["rows"]
                dz, dh, dc = chunk["dz"], chunk["dh"], chunk["dc"]
                R, G = hi - lo, dz.shape[2]
                dh[...] = dh_last[lo:hi]
                dc[...] = 0
                dh_seq = no_seq
                for k in reversed(range(L)):
                    buf = chunk["layers"][k]
                    w_ih, w_hh, _, _ = layout.layer(views, k)
                    dw, db = ws.partial[worker][k]
                    if n == 0:
                        db[...] = 0
                    lstm_cpu.backward_layer(buf["gates"], buf["c"], w_hh, dh_seq, dz, dh, dc, db,
                                            input_grads, self.blocked_gemm)
                    dz2 = dz.reshape(T * R, G)
                    xh2 = buf["xh"][:T].reshape(T * R, -1)
                    if self.blocked_gemm:
                        gemm_cpu.gemm(xh2.T, dz2, dw, n > 0)
                    elif n == 0:
                        np.matmul(xh2.T, dz2, out=dw)
                    else:
                        dw += np.matmul(xh2.T, dz2)
                    if input_grads:
                        dh0[k, lo:hi] = dh
                        dc0[k, lo:hi] = dc
                    if k > 0 or input_grads:
                        dh_seq = np.matmul(dz2, w_ih).reshape(T, R, -1)
                    dh[...] = 0
                    dc[...] = 0
                if input_grads:
                    dx[lo:hi] = dh_seq.transpose(1, 0, 2)

        self._run(work, len(ws.chunks))
        workers = min(self.num_threads, len(ws.chunks))
        for k in range(L):
            dw, db = ws.partial[0][k]
            for w in range(1, workers):
                dw += ws.partial[w][k][0]
                db += ws.partial[w][k][1]
            n_in = dw.shape[0] - layout.hidden_size
            gviews[f"lstm.weight_ih_l{k}"][...] = dw[:n_in].T
            gviews[f"lstm.weight_hh_l{k}"][...] = dw[n_in:].T
            gviews[f"lstm.bias_ih_l{k}"][...] = db
            gviews[f"lstm.bias_hh_l{k}"][...] = db
        if not input_grads:
            return Gradients(grads)
        return Gradients(grads, dx, dh0, dc0)

    def _grad_buffer(self, params):
        """The gradient buffer: fresh, unless inside :meth:`train_step` (consumed there)."""
        if not getattr(self._local, "in_train_step", False):
            return np.empty_like(params)
        buf = getattr(self._local, "grads", None)
        if buf is None or buf.shape != params.shape or buf.dtype != params.dtype:
            buf = self._local.grads = np.empty_like(params)
        return buf

    def train_step(self, layout, params, state, x, y, loss, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, clip_grad_norm=None):
        # Same step as the base class; the forward cache and the gradients never escape
        # it, so every buffer is reused from one step to the next.
        self._local.in_train_step = True
        try:
            with self._single_threaded_blas():
                return super().train_step(layout, params, state, x, y, loss, lr, beta1, beta2,
                                          eps, weight_decay, clip_grad_norm)
        finally:
            self._local.in_train_step = False

    def loss(self, outputs, y, kind):
        doutputs = np.empty_like(outputs)
        if kind == "cross_entropy":
            value = head_cpu.cross_entropy(outputs, np.asarray(y, dtype=np.intp), doutputs)
        elif kind == "squared_error":
            value = head_cpu.squared_error(outputs, np.asarray(y, dtype=outputs.dtype), doutputs)
        else:
            raise ValueError(f"unknown loss {kind!r}; expected 'cross_entropy' or 'squared_error'")
        return float(value), doutputs

    def softmax(self, outputs):
        probs = np.empty_like(outputs)
        head_cpu.softmax(outputs, probs)
        return probs

    def adam_step(self, params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, grad_scale=1.0):
        state.step += 1
        adam_cpu.adam_update(params, grads, state.m, state.v, float(lr), float(beta1),
                             float(beta2), float(eps), float(weight_decay),
                             float(grad_scale), state.step)
