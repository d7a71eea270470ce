"""CUDA backend: the hand-written kernels of ``fastlstm/kernels/*.cu`` through CuPy, cuBLAS for the GEMMs.

The network program of :mod:`fastlstm.model` runs on the whole batch over the primitives of
:class:`_CudaOps`.  Data flow of one training step (layouts in ``fastlstm/kernels/lstm_core.cuh``:
feature-major, batch fastest, so the kernels' warps make coalesced accesses):
``x`` (B, T, I) -> time-major copy (T*B, I) -> per layer: input projection of all steps as ONE
cuBLAS GEMM into (4H, T*B) -> recurrence kernel (one persistent cooperative launch for all T
steps, or one launch per step) -> head GEMM -> loss kernel (loss stays on the device) ->
backward recurrence kernel -> weight gradients as ONE GEMM each over all T*B columns -> norm
pass + ONE Adam launch over the flat buffer, which decides on the device whether to apply the
update and reads its settings from device memory.  With fixed shapes and buffers the whole step
is captured once as a CUDA graph and replayed, whatever the settings.

Importing this module raises ImportError when CuPy, cuBLAS or a usable GPU is missing, so
``get_backend("cuda")`` says why and ``get_backend("auto")`` falls back to the CPU.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np


def _first_line(exc):
    return (str(exc).splitlines() or [type(exc).__name__])[0]


try:
    import cupy
    from cupy_backends.cuda.libs import cublas
except ImportError as exc:  # CuPy, or its cuBLAS library, is missing
    raise ImportError(f"CuPy with cuBLAS is not importable ({_first_line(exc)})") from exc

try:
    _DEVICE_COUNT = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver, driver too old, no device: CuPy raises CUDARuntimeError
    raise ImportError(f"CuPy finds no usable CUDA GPU ({_first_line(exc)})") from exc
if _DEVICE_COUNT < 1:
    raise ImportError("CuPy finds no CUDA GPU")

from .. import model  # noqa: E402
from .base import (  # noqa: E402
    AdamState, Backend, BackendUnavailable, Gradients, check_lengths, get_loss)
from .cuda_support import (  # noqa: E402
    ADAM_SETTINGS, DeviceLimits, adam_settings, cuda_source, plan_recurrence)

__all__ = ["CUDABackend", "DeviceAdamState"]

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_HEAD_THREADS = 512
_ADAM_THREADS = 256
_MAX_NORM_BLOCKS = 256
_CACHED_SHAPES = 4
#: one kernel of each module that every backend needs, fetched (so compiled) at construction
_PROBES = {"lstm_step": "fastlstm_forward_step_f32", "head": "fastlstm_softmax_f32",
           "adam": "fastlstm_adam_f32"}


# ----------------------------------------------------------------------------- kernels

_modules: dict = {}
_kernels: dict = {}


def _module(name):
    """The RawModule of ``fastlstm/kernels/<name>.cu``, compiled once per process (CuPy caches on disk)."""
    if name not in _modules:
        _modules[name] = cupy.RawModule(code=cuda_source(name), options=("-std=c++17",),
                                        enable_cooperative_groups=name == "lstm_persistent")
    return _modules[name]


def _kernel(module, name, dtype):
    key = (module, name, np.dtype(dtype))
    if key not in _kernels:
        kernel = _module(module).get_function(f"fastlstm_{name}_{_SUFFIX[np.dtype(dtype)]}")
        if module.startswith("lstm"):
            # The recurrence plans may use up to the opt-in limit of dynamic shared memory.
            kernel.max_dynamic_shared_size_bytes = _limits().shared_optin
        _kernels[key] = kernel
    return _kernels[key]


_device_limits: dict = {}


def _limits():
    device = cupy.cuda.Device().id
    if device not in _device_limits:
        attrs = cupy.cuda.Device(device).attributes
        _device_limits[device] = DeviceLimits(
            multiprocessors=attrs["MultiProcessorCount"],
            shared_per_block=attrs["MaxSharedMemoryPerBlock"],
            shared_optin=attrs["MaxSharedMemoryPerBlockOptin"],
            cooperative=bool(attrs.get("CooperativeLaunch", 0)))
    return _device_limits[device]


def _ptr(a):
    """Kernel argument for an optional array: its pointer, or a null pointer."""
    return np.uint64(0) if a is None else a


def _i32(n):
    return np.int32(n)


# ----------------------------------------------------------------------------- cuBLAS


class _Mat:
    """A row-major matrix in device memory: pointer, shape and leading dimension (in elements)."""

    __slots__ = ("ptr", "rows", "cols", "ld")

    def __init__(self, ptr, rows, cols, ld):
        self.ptr, self.rows, self.cols, self.ld = int(ptr), int(rows), int(cols), int(ld)

    @classmethod
    def of(cls, a, rows=None, cols=None, ld=None, offset=0):
        """``a`` (C-contiguous, any shape) seen as ``rows x cols`` with ``ld``, from ``offset``."""
        if rows is None:
            rows, cols = a.shape
        return cls(a.data.ptr + offset * a.itemsize, rows, cols, cols if ld is None else ld)

    def shape(self, trans):
        return (self.cols, self.rows) if trans else (self.rows, self.cols)


class _Blas:
    """Row-major GEMM on cuBLAS (fp32 without TF32, or fp64), on CuPy's current stream."""

    def __init__(self, dtype):
        self.fn = cublas.sgemm if np.dtype(dtype) == np.float32 else cublas.dgemm
        self.one = np.ones((), dtype)
        self.zero = np.zeros((), dtype)

    def gemm(self, c, a, b, ta=False, tb=False):
        """``c = op(a) @ op(b)`` with ``op`` transposing where ``ta`` / ``tb``."""
        m, k = a.shape(ta)
        k2, n = b.shape(tb)
        assert k == k2 and (c.rows, c.cols) == (m, n), ((m, k), (k2, n), (c.rows, c.cols))
        handle = cupy.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        op = (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
        # Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
        self.fn(handle, op[tb], op[ta], n, m, k, self.one.ctypes.data, b.ptr, b.ld, a.ptr, a.ld,
                self.zero.ctypes.data, c.ptr, c.ld)


# ----------------------------------------------------------------------------- state


class DeviceAdamState(AdamState):
    """Adam state whose step count and settings live on the GPU.

    A training step decides on the device whether its update is applied (finite loss and
    gradient), so the count of applied updates is kept there too; reading ``step`` synchronises.
    The Adam kernel reads its settings from :attr:`settings` (laid out by
    :func:`~fastlstm.backends.cuda_support.adam_settings`), so a captured training step, when
    replayed, uses whatever settings were written last.
    """

    def __init__(self, m, v, step=0):
        self.counter = cupy.zeros((), cupy.int64)
        self.arrivals = cupy.zeros((), cupy.uint32)  # scratch of the Adam kernel
        self.settings = cupy.zeros((len(ADAM_SETTINGS),), cupy.float64)
        super().__init__(m, v, step)

    @property
    def step(self):
        return int(self.counter.get())

    @step.setter
    def step(self, value):
        self.counter.fill(int(value))

    def buffers(self):
        """Every device buffer of the state that the Adam kernel reads or writes."""
        return self.m, self.v, self.counter, self.arrivals, self.settings

    def write_settings(self, config, grad_scale=1.0):
        """Copy ``config`` (an :class:`AdamConfig`) into :attr:`settings`, on the current
        stream, for the Adam launches that follow on it."""
        # cupy.asarray stages the values in pinned memory, so the copy never waits for the
        # stream; ndarray.set, from pageable memory, may.
        self.settings[...] = cupy.asarray(adam_settings(config, grad_scale))


def _device_state(state):
    """``state``, which must be the CUDA backend's own kind of Adam state."""
    if not isinstance(state, DeviceAdamState):
        raise TypeError("the CUDA backend needs the Adam state made by its adam_state(params)")
    return state


def _check_supported(spec, x, lengths):
    """Refuse, before any work, what the kernels do not run (``NotImplementedError``): a
    bidirectional network, and ``lengths`` other than every step of every row of ``x``
    (lengths that are no lengths at all: ``ValueError``, from :func:`check_lengths`)."""
    if spec.bidirectional:
        raise NotImplementedError("the CUDA backend runs unidirectional networks only; use "
                                  "device='cpu' for bidirectional ones")
    B, T, _ = x.shape
    if check_lengths(lengths, B, T) is not None:
        raise NotImplementedError("the CUDA backend runs every row over all its steps; use "
                                  "device='cpu' for sequences of different lengths")


def _graph_key(params, state):
    """What a captured training step bakes in besides its slot's own buffers: the device
    pointers of ``params`` and of every buffer of ``state``.

    The settings' values are not part of it: the graph reads them from ``state.settings``,
    written before each replay, so a new learning rate never needs a new capture.
    """
    return tuple(a.data.ptr for a in (params, *state.buffers()))


# ----------------------------------------------------------------------------- buffers


class _Workspace:
    """Device buffers of one forward/backward pass of ``spec`` on a batch of ``(B, T)``.

    Layouts as in the module docstring.  A forward records in ``layer_inputs[k]`` the
    sequence layer ``k`` read, and in ``head_input`` the states the head read, for backward.
    """

    def __init__(self, spec, batch, steps, dtype, train):
        B, T, H, L = batch, steps, spec.hidden_size, spec.num_layers
        self.spec, self.batch, self.steps, self.dtype, self.train = spec, B, T, dtype, train
        self.x_tb = cupy.empty((T, B, spec.input_size), dtype)
        self.xg = [cupy.empty((4 * H, T * B), dtype) for _ in range(L)]
        # Every step's states are kept when training, and for a layer that feeds another.
        self.slots = [T + 1 if train or k < L - 1 else 2 for k in range(L)]
        self.h = [cupy.empty((H, s * B), dtype) for s in self.slots]
        self.c = [cupy.empty((H, s * B), dtype) for s in self.slots]
        self.outputs = cupy.empty((B, spec.output_size), dtype)
        self.layer_inputs = [None] * L
        self.head_input = None
        self.grad_buffers = None

    def backward_buffers(self):
        """Buffers of the backward pass, allocated on first use."""
        if self.grad_buffers is None:
            B, T, H = self.batch, self.steps, self.spec.hidden_size
            self.grad_buffers = dict(
                dz=cupy.empty((4 * H, T * B), self.dtype),
                dc=cupy.empty((H, B), self.dtype),
                dh_last=cupy.empty((H, B), self.dtype),
                dh_seq=cupy.empty((H, T * B), self.dtype),
                ones=cupy.ones((T * B, 2), self.dtype))  # sums over columns by GEMM
        return self.grad_buffers


class _TrainSlot:
    """Static buffers of ``train_step`` for one shape and loss (a :class:`Loss`): inputs
    copied in, graphs reuse them."""

    def __init__(self, spec, batch, steps, dtype, loss_kind):
        self.work = _Workspace(spec, batch, steps, dtype, train=True)
        self.work.backward_buffers()
        self.loss_kind = loss_kind
        targets = (batch,) if loss_kind.class_targets else (batch, spec.output_size)
        self.y = cupy.empty(targets, loss_kind.target_dtype(dtype))
        self.doutputs = cupy.empty((batch, spec.output_size), dtype)
        self.loss = cupy.zeros((), cupy.float64)
        self.grads = cupy.empty((spec.layout.size,), dtype)
        blocks = min(_MAX_NORM_BLOCKS, max(1, math.ceil(spec.layout.size / (4 * _ADAM_THREADS))))
        self.partials = cupy.zeros((blocks,), cupy.float64)
        self.graphs = OrderedDict()  # _graph_key -> CUDA graph (or None: capture failed)


# ----------------------------------------------------------------------------- primitives


class _SeqGrad(NamedTuple):
    """The gradient w.r.t. a sequence, as the backward recurrence kernel takes it: at the last
    step only (``last``, (H, B)), or at every step (``steps``, feature-major (features, T*B))."""

    last: Any
    steps: Any


class _CudaOps:
    """The primitives of :mod:`fastlstm.model` on the whole batch of a workspace, on the device.

    A sequence is the buffer that holds it: the network's input is ``work.x_tb``, time-major
    (T, B, I), copied there before; the hidden states of layer ``k`` are ``work.h[k]``,
    feature-major (H, S*B) with the initial state in slot 0.  Its gradient is a
    :class:`_SeqGrad`.  A layer's input projection and each of its weight gradients is ONE
    GEMM over all steps; the recurrence runs the kernels of :class:`CUDABackend`.  The kernels
    run forward in time over every step of every row: the backend refuses bidirectional
    networks and variable lengths before any work (:func:`_check_supported`), so no
    ``reverse`` recurrence, ``lengths``, ``join`` or ``join_backward`` ever reaches here.

    Parameters
    ----------
    backend : CUDABackend
    work : _Workspace
        The pass's buffers; a training forward leaves in them what backward reads.
    params : cupy.ndarray
        The flat parameters.
    grads : cupy.ndarray, optional
        Where backward writes the gradient w.r.t. the parameters (same layout).
    initial_grads : bool, default=False
        Backward also keeps the gradients w.r.t. the initial states, per layer, in ``dh0``
        and ``dc0`` (arrays of shape (B, H)).
    recurrence : {"persistent", "step"}, optional
        The recurrence kernels to run; by default the backend's choice.
    """

    def __init__(self, backend, work, params, grads=None, initial_grads=False, recurrence=None):
        self.backend, self.work, self.params = backend, work, params
        self._recurrence = recurrence  # beside the method of the same name
        self.layout = work.spec.layout
        self.views = self.layout.views(params)
        self.grad_views = None if grads is None else self.layout.views(grads)
        self.blas = backend.blas(work.dtype)
        L = work.spec.num_layers
        self.dh0, self.dc0 = ([None] * L, [None] * L) if initial_grads else (None, None)

    def _operand(self, seq):
        """``(matrix, transposed)``: ``seq`` as a GEMM operand whose ``op`` is (features, T*B).

        Only the network's input (time-major: rows are steps x batch) is transposed.
        """
        B, T = self.work.batch, self.work.steps
        if seq.ndim == 3:
            return _Mat.of(seq, T * B, seq.shape[2]), True
        return _Mat.of(seq, seq.shape[0], T * B, ld=seq.shape[1], offset=B), False

    def inputs(self, x, lengths):
        return x

    def recurrence(self, k, seq, h0, c0, reverse):
        work, B = self.work, self.work.batch
        source, transposed = self._operand(seq)
        w_ih = self.layout.layer(self.views, k)[0]
        self.blas.gemm(_Mat.of(work.xg[k]), _Mat.of(w_ih), source, tb=transposed)
        for state, initial in ((work.h[k], h0), (work.c[k], c0)):
            if initial is None:
                state[:, :B].fill(0)
            else:
                state[:, :B] = initial.T
        self.backend._forward_recurrence(work, self.params, k, work.train, self._recurrence)
        work.layer_inputs[k] = seq
        return work.h[k]

    def readout(self, outs):
        (seq,) = outs
        B, T = self.work.batch, self.work.steps
        slots = seq.shape[1] // B  # after step t, slot (t + 1) % slots
        return _Mat.of(seq, seq.shape[0], B, ld=seq.shape[1], offset=(T % slots) * B)

    def head(self, h):
        outputs = self.work.outputs
        self.blas.gemm(_Mat.of(outputs), h, _Mat.of(self.views["head.weight"]), ta=True, tb=True)
        outputs += self.views["head.bias"]
        self.work.head_input = h
        return outputs

    def head_backward(self, doutputs):
        work, blas, grads = self.work, self.blas, self.grad_views
        buffers = work.backward_buffers()
        B, O = doutputs.shape
        d_out = _Mat.of(doutputs)
        blas.gemm(_Mat.of(grads["head.weight"]), d_out, work.head_input, ta=True, tb=True)
        blas.gemm(_Mat.of(grads["head.bias"], 1, O), _Mat.of(buffers["ones"], B, 1, ld=2), d_out,
                  ta=True)
        blas.gemm(_Mat.of(buffers["dh_last"]), _Mat.of(self.views["head.weight"]), d_out,
                  ta=True, tb=True)
        return buffers["dh_last"]

    def readout_backward(self, dh):
        return [_SeqGrad(last=dh, steps=None)]

    def recurrence_backward(self, k, dseq, reverse, input_grads):
        work, blas, layout = self.work, self.blas, self.layout
        B, T, H = work.batch, work.steps, layout.hidden_size
        buffers = work.backward_buffers()
        self.backend._backward_recurrence(work, self.params, k, dseq.last, dseq.steps,
                                          self._recurrence)
        w_ih, w_hh = layout.layer(self.views, k)[:2]
        dw_ih, dw_hh, db_ih, _ = layout.layer(self.grad_views, k)
        dz = _Mat.of(buffers["dz"])
        source, transposed = self._operand(work.layer_inputs[k])
        blas.gemm(_Mat.of(dw_ih), dz, source, tb=not transposed)
        blas.gemm(_Mat.of(dw_hh), dz, _Mat.of(work.h[k], H, T * B, ld=(T + 1) * B), tb=True)
        # bias_ih and bias_hh are adjacent in the layout: one GEMM fills both (2 x 4H).
        blas.gemm(_Mat(db_ih.data.ptr, 2, 4 * H, 4 * H), _Mat.of(buffers["ones"], T * B, 2), dz,
                  ta=True, tb=True)
        if self.dh0 is not None:
            dh = cupy.empty((H, B), work.dtype)
            blas.gemm(_Mat.of(dh), _Mat.of(w_hh), _Mat(dz.ptr, 4 * H, B, T * B), ta=True)
            self.dh0[k], self.dc0[k] = dh.T, buffers["dc"].T.copy()
        if not input_grads:
            return None
        # The gradient w.r.t. hidden states goes to the one dh_seq buffer: the layer below reads
        # it before anything writes it again.  The network input's is the caller's, so its own.
        out = cupy.empty((w_ih.shape[1], T * B), work.dtype) if transposed else buffers["dh_seq"]
        blas.gemm(_Mat.of(out), _Mat.of(w_ih), dz, ta=True)
        return _SeqGrad(last=None, steps=out)


# ----------------------------------------------------------------------------- backend


class CUDABackend(Backend):
    """Hand-written CUDA kernels through CuPy, float32 (no TF32) or float64.

    Parameters
    ----------
    recurrence : {"persistent", "step"}, default="persistent"
        ``"persistent"`` runs all time steps of a layer in one cooperative launch where the
        GPU can (the weight slices fit in shared memory and all blocks are co-resident) and
        one launch per step elsewhere; ``"step"`` always launches per step.
    graphs : bool, default=True
        Capture ``train_step`` as a CUDA graph per shape and set of buffers (parameters and
        Adam state), and replay it.
    """

    name = "cuda"
    xp = cupy

    def __init__(self, recurrence="persistent", graphs=True):
        if recurrence not in ("persistent", "step"):
            raise ValueError(f"recurrence must be 'persistent' or 'step', got {recurrence!r}")
        self.recurrence = recurrence
        self.graphs = bool(graphs)
        self._persistent_ok: dict = {}
        self._slots: OrderedDict = OrderedDict()
        # A slot's input buffers are shared by every caller of train_step with that shape: the
        # copy-in, the launch and the copy-out of one step must not interleave with another's.
        self._train_lock = threading.Lock()
        self._blas = {np.dtype(d): None for d in _SUFFIX}
        try:  # compile now, so that a machine where NVRTC fails falls back to the CPU
            for module, kernel in _PROBES.items():
                _module(module).get_function(kernel)
        except Exception as exc:
            raise BackendUnavailable(
                f"the CUDA kernels of fastlstm do not compile here ({exc}); use device='cpu'"
            ) from exc

    # ------------------------------------------------------------------ helpers

    def blas(self, dtype):
        dtype = np.dtype(dtype)
        if self._blas.get(dtype) is None:
            if dtype not in _SUFFIX:
                raise TypeError(f"the CUDA backend supports float32 and float64, not {dtype}")
            self._blas[dtype] = _Blas(dtype)
        return self._blas[dtype]

    def to_host(self, a):
        return cupy.asnumpy(a)

    def recurrence_kind(self, direction, hidden, batch, dtype, recurrence=None):
        """``"persistent"`` or ``"step"``: the kernel a recurrence of this shape runs here."""
        return "persistent" if self._persistent_plan(direction, hidden, batch, dtype,
                                                     recurrence) else "step"

    def _persistent_plan(self, direction, hidden, batch, dtype, recurrence=None):
        if (recurrence or self.recurrence) != "persistent":
            return None
        key = (direction, hidden, batch, np.dtype(dtype))
        if key not in self._persistent_ok:
            self._persistent_ok[key] = self._check_persistent(*key)
        return self._persistent_ok[key]

    def _check_persistent(self, direction, hidden, batch, dtype):
        limits = _limits()
        plan = plan_recurrence(direction, hidden, batch, dtype.itemsize, limits, persistent=True)
        if plan is None or not limits.cooperative:
            return None
        try:
            kernel = _kernel("lstm_persistent", self._recurrence_name(direction, plan, True), dtype)
            per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                kernel.kernel.ptr, plan.threads, plan.shared_bytes)
        except Exception as exc:
            warnings.warn(f"fastlstm: persistent CUDA kernels unavailable ({exc}); "
                          "using per-step kernels", RuntimeWarning, stacklevel=3)
            return None
        return plan if per_sm * limits.multiprocessors >= plan.grid[0] else None

    @staticmethod
    def _recurrence_name(direction, plan, persistent):
        kind = "persistent" if persistent else "step"
        if direction == "forward":
            return f"forward_{kind}"
        return f"backward_{kind}_v{plan.vector}"

    # ------------------------------------------------------------------ recurrences

    def _forward_recurrence(self, work, params, k, store_gates, recurrence):
        layout, dtype = work.spec.layout, work.dtype
        H, B, T, S = layout.hidden_size, work.batch, work.steps, work.slots[k]
        _, w_hh, b_ih, b_hh = layout.layer(layout.views(params), k)
        args = (w_hh, b_ih, b_hh, work.xg[k], work.h[k], work.c[k], _i32(H), _i32(B), _i32(T),
                _i32(S))
        plan = self._persistent_plan("forward", H, B, dtype, recurrence)
        if plan is not None:
            kernel = _kernel("lstm_persistent", "forward_persistent", dtype)
            tail = (_i32(store_gates), _i32(plan.slice_units), _i32(plan.chunk_rows),
                    _i32(plan.stage_rows))
            kernel(plan.grid, (plan.threads,), args + tail, shared_mem=plan.shared_bytes)
            return
        plan = plan_recurrence("forward", H, B, dtype.itemsize, _limits(), persistent=False)
        kernel = _kernel("lstm_step", "forward_step", dtype)
        tail = (_i32(store_gates), _i32(plan.slice_units), _i32(plan.chunk_rows),
                _i32(plan.stage_rows))
        for t in range(T):
            kernel(plan.grid, (plan.threads,), args + (_i32(t),) + tail,
                   shared_mem=plan.shared_bytes)

    def _backward_recurrence(self, work, params, k, dh_last, dh_seq, recurrence):
        layout, dtype = work.spec.layout, work.dtype
        H, B, T = layout.hidden_size, work.batch, work.steps
        buffers = work.backward_buffers()
        w_hh = layout.layer(layout.views(params), k)[1]
        args = (w_hh, work.xg[k], work.c[k], _ptr(dh_last), _ptr(dh_seq), buffers["dz"],
                buffers["dc"], _i32(H), _i32(B), _i32(T))
        plan = self._persistent_plan("backward", H, B, dtype, recurrence)
        if plan is not None:
            name = self._recurrence_name("backward", plan, True)
            tail = (_i32(plan.slice_units), _i32(plan.chunk_rows), _i32(plan.stage_rows))
            _kernel("lstm_persistent", name, dtype)(plan.grid, (plan.threads,), args + tail,
                                                   shared_mem=plan.shared_bytes)
            return
        plan = plan_recurrence("backward", H, B, dtype.itemsize, _limits(), persistent=False)
        kernel = _kernel("lstm_step", self._recurrence_name("backward", plan, False), dtype)
        tail = (_i32(plan.slice_units), _i32(plan.chunk_rows), _i32(plan.stage_rows))
        for t in reversed(range(T)):
            kernel(plan.grid, (plan.threads,), args + (_i32(t),) + tail,
                   shared_mem=plan.shared_bytes)

    # ------------------------------------------------------------------ Backend API

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None):
        x = cupy.asarray(x)
        _check_supported(spec, x, lengths)
        B, T, _ = x.shape
        work = _Workspace(spec, B, T, params.dtype, train)
        work.x_tb[...] = x.transpose(1, 0, 2)
        outputs = model.forward(_CudaOps(self, work, params), spec, work.x_tb, h0, c0)
        return outputs, (work if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        grads = cupy.empty_like(params)
        ops = _CudaOps(self, cache, params, grads, initial_grads=input_grads)
        doutputs = cupy.ascontiguousarray(doutputs, dtype=params.dtype)
        dseq = model.backward(ops, spec, doutputs, input_grads)
        if not input_grads:
            return Gradients(grads)
        dx = dseq.steps.reshape(spec.input_size, cache.steps, cache.batch).transpose(2, 1, 0)
        return Gradients(grads, cupy.ascontiguousarray(dx),
                         cupy.ascontiguousarray(cupy.stack(ops.dh0)),
                         cupy.ascontiguousarray(cupy.stack(ops.dc0)))

    @staticmethod
    def _launch_loss(outputs, y, loss_kind, doutputs, value):
        """The kernel of ``loss_kind`` (a :class:`Loss`): ``value`` and ``doutputs`` from
        ``outputs`` and ``y``."""
        rows, cols = outputs.shape
        _kernel("head", loss_kind.name, outputs.dtype)(
            (1,), (_HEAD_THREADS,), (outputs, y, doutputs, value, _i32(rows), _i32(cols)))

    def loss(self, outputs, y, kind):
        loss_kind = get_loss(kind)
        outputs = cupy.ascontiguousarray(outputs)
        y = cupy.ascontiguousarray(cupy.asarray(y), dtype=loss_kind.target_dtype(outputs.dtype))
        if not loss_kind.class_targets and y.shape != outputs.shape:
            raise ValueError(f"y has shape {y.shape}, expected {outputs.shape}")
        doutputs = cupy.empty_like(outputs)
        value = cupy.empty((), cupy.float64)
        self._launch_loss(outputs, y, loss_kind, doutputs, value)
        return value, doutputs

    def softmax(self, outputs):
        outputs = cupy.ascontiguousarray(outputs)
        probs = cupy.empty_like(outputs)
        rows, cols = outputs.shape
        blocks = max(1, min(4096, math.ceil(rows * 32 / 256)))
        _kernel("head", "softmax", outputs.dtype)((blocks,), (256,),
                                                  (outputs, probs, _i32(rows), _i32(cols)))
        return probs

    def adam_state(self, params):
        return DeviceAdamState(cupy.zeros_like(params), cupy.zeros_like(params), 0)

    @staticmethod
    def _launch_adam(params, grads, state, partials, loss):
        """The Adam kernel on ``state``'s buffers and settings; ``partials`` (the gradient's
        sums of squares) and ``loss`` are checked for finiteness where given."""
        n = params.size
        blocks = max(1, min(4096, math.ceil(n / (4 * _ADAM_THREADS))))
        n_partials = 0 if partials is None else partials.size
        _kernel("adam", "adam", params.dtype)(
            (blocks,), (_ADAM_THREADS,),
            (params, grads, state.m, state.v, np.int64(n), state.settings, _ptr(partials),
             _i32(n_partials), _ptr(loss), state.counter, state.arrivals))

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        _device_state(state).write_settings(config, grad_scale)
        self._launch_adam(params, grads, state, None, None)

    # ------------------------------------------------------------------ training step

    def _train_slot(self, spec, batch, steps, dtype, loss_kind):
        key = (spec, batch, steps, np.dtype(dtype), loss_kind)
        slot = self._slots.pop(key, None)
        if slot is None:
            slot = _TrainSlot(spec, batch, steps, dtype, loss_kind)
        self._slots[key] = slot
        while len(self._slots) > _CACHED_SHAPES:
            self._slots.popitem(last=False)
        return slot

    def _step_body(self, slot, params, state, recurrence):
        """Everything of one training step after the inputs are in ``slot`` and the settings in
        ``state``: device work only, on fixed buffers (what a CUDA graph captures)."""
        work, spec = slot.work, slot.work.spec
        ops = _CudaOps(self, work, params, slot.grads, recurrence=recurrence)
        model.forward(ops, spec, work.x_tb)
        self._launch_loss(work.outputs, slot.y, slot.loss_kind, slot.doutputs, slot.loss)
        model.backward(ops, spec, slot.doutputs)
        n = slot.grads.size
        _kernel("adam", "sumsq_partials", params.dtype)(
            (slot.partials.size,), (_ADAM_THREADS,), (slot.grads, np.int64(n), slot.partials))
        self._launch_adam(params, slot.grads, state, slot.partials, slot.loss)

    def _capture(self, slot, params, state):
        """A CUDA graph of ``_step_body``, or ``None`` where capture fails here (with a warning)."""
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        modes = [self.recurrence] + (["step"] if self.recurrence != "step" else [])
        errors = []
        for recurrence in modes:
            with stream:
                stream.begin_capture()
                try:
                    self._step_body(slot, params, state, recurrence)
                except Exception as exc:  # a launch that cannot be captured
                    errors.append(f"{recurrence}: {exc}")
                    try:
                        stream.end_capture()
                    except Exception:
                        pass
                    continue
                graph = stream.end_capture()
            return graph
        warnings.warn("fastlstm: CUDA graph capture of the training step failed "
                      f"({'; '.join(errors)}); running it without a graph", RuntimeWarning,
                      stacklevel=3)
        return None

    def train_step(self, spec, params, state, x, y, loss, config, lengths=None):
        """One training step, all on the device; returns the loss as a 0-d device array.

        No host synchronisation: the Adam kernel itself skips the update when the loss or the
        gradient norm is not finite.  ``config`` is copied into ``state.settings``, where the
        step reads it.  The first step of a new shape (batch, steps, dtype, loss) and set of
        buffers (``params`` and ``state``'s) runs directly and captures a CUDA graph; the next
        ones replay it, whatever their settings.
        """
        loss_kind, state, x = get_loss(loss), _device_state(state), cupy.asarray(x)
        _check_supported(spec, x, lengths)
        with self._train_lock:
            return self._train_step(spec, params, state, x, y, loss_kind, config)

    def _train_step(self, spec, params, state, x, y, loss_kind, config):
        B, T, _ = x.shape
        slot = self._train_slot(spec, B, T, params.dtype, loss_kind)
        # A graph reads its inputs from the slot and its settings from the state.
        slot.work.x_tb[...] = x.transpose(1, 0, 2)
        slot.y[...] = cupy.asarray(y)
        state.write_settings(config)
        if not self.graphs:
            self._step_body(slot, params, state, self.recurrence)
            return slot.loss.copy()
        key = _graph_key(params, state)
        if key in slot.graphs:
            graph = slot.graphs[key]
            if graph is None:
                self._step_body(slot, params, state, self.recurrence)
            else:
                graph.launch(stream=cupy.cuda.get_current_stream())
            return slot.loss.copy()
        # First step with these buffers: run it (compiles, warms cuBLAS up), then capture.
        self._step_body(slot, params, state, self.recurrence)
        value = slot.loss.copy()
        slot.graphs[key] = self._capture(slot, params, state)
        while len(slot.graphs) > _CACHED_SHAPES:
            slot.graphs.popitem(last=False)
        return value
