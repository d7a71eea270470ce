"""CUDA backend: the hand-written kernels of ``fastlstm/kernels/*.cu`` through CuPy, cuBLAS for the GEMMs.

Data flow of one training step (layouts in ``fastlstm/kernels/lstm_core.cuh``: feature-major, batch
fastest, so the kernels' warps make coalesced accesses):
``x`` (B, T, I) -> time-major copy (T*B, I) -> per layer: input projection of all steps as ONE
cuBLAS GEMM into (4H, T*B) -> recurrence kernel (one persistent cooperative launch for all T
steps, or one launch per step) -> head GEMM -> loss kernel (loss stays on the device) ->
backward recurrence kernel -> weight gradients as ONE GEMM each over all T*B columns -> norm
pass + ONE Adam launch over the flat buffer, which decides on the device whether to apply the
update.  With fixed shapes the whole step is captured once as a CUDA graph and replayed.

Importing this module raises ImportError when CuPy, cuBLAS or a usable GPU is missing, so
``get_backend("cuda")`` says why and ``get_backend("auto")`` falls back to the CPU.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict

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

from .base import AdamState, Backend, BackendUnavailable, Gradients  # noqa: E402
from .cuda_support import DeviceLimits, cuda_source, plan_recurrence  # noqa: E402

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
    """Adam state whose step count lives on the GPU.

    A training step decides on the device whether its update is applied (finite loss and
    gradient), so the count of applied updates is kept there too; reading ``step`` synchronises.
    """

    def __init__(self, m, v, step=0):
        self.counter = cupy.zeros((), cupy.int64)
        self.arrivals = cupy.zeros((), cupy.uint32)  # scratch of the Adam kernel
        super().__init__(m, v, step)

    @property
    def step(self):
        return int(self.counter.get())

    @step.setter
    def step(self, value):
        self.counter.fill(int(value))


# ----------------------------------------------------------------------------- buffers


class _Workspace:
    """Device buffers of one forward/backward pass for a batch of ``(B, T)`` (see module doc)."""

    def __init__(self, layout, batch, steps, dtype, train):
        B, T, H, L = batch, steps, layout.hidden_size, layout.num_layers
        self.layout, self.batch, self.steps, self.dtype, self.train = layout, B, T, dtype, train
        self.x_tb = cupy.empty((T, B, layout.input_size), dtype)
        self.xg = [cupy.empty((4 * H, T * B), dtype) for _ in range(L)]
        # Every step's states are kept when training, and for a layer that feeds another.
        self.slots = [T + 1 if train or k < L - 1 else 2 for k in range(L)]
        self.h = [cupy.empty((H, s * B), dtype) for s in self.slots]
        self.c = [cupy.empty((H, s * B), dtype) for s in self.slots]
        self.logits = cupy.empty((B, layout.output_size), dtype)
        self.grad_buffers = None

    def backward_buffers(self):
        """Buffers of the backward pass, allocated on first use."""
        if self.grad_buffers is None:
            B, T, H = self.batch, self.steps, self.layout.hidden_size
            self.grad_buffers = dict(
                dz=cupy.empty((4 * H, T * B), self.dtype),
                dc=cupy.empty((H, B), self.dtype),
                dh_last=cupy.empty((H, B), self.dtype),
                dh_seq=cupy.empty((H, T * B), self.dtype),
                ones=cupy.ones((T * B, 2), self.dtype))  # sums over columns by GEMM
        return self.grad_buffers


class _TrainSlot:
    """Static buffers of ``train_step`` for one shape: inputs copied in, graphs reuse them."""

    def __init__(self, layout, batch, steps, dtype, loss_kind):
        self.work = _Workspace(layout, batch, steps, dtype, train=True)
        self.work.backward_buffers()
        if loss_kind == "cross_entropy":
            self.y = cupy.empty((batch,), cupy.int64)
        else:
            self.y = cupy.empty((batch, layout.output_size), dtype)
        self.dlogits = cupy.empty((batch, layout.output_size), dtype)
        self.loss = cupy.zeros((), cupy.float64)
        self.grads = cupy.empty((layout.size,), dtype)
        blocks = min(_MAX_NORM_BLOCKS, max(1, math.ceil(layout.size / (4 * _ADAM_THREADS))))
        self.partials = cupy.zeros((blocks,), cupy.float64)
        self.graphs = OrderedDict()  # hyper-parameters and buffers -> CUDA graph (or None)


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
        Capture ``train_step`` as a CUDA graph per shape and hyper-parameters, and replay it.
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

    def asarray(self, a, dtype=None):
        return cupy.asarray(a, dtype=dtype)

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
        layout, dtype = work.layout, work.dtype
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
        layout, dtype = work.layout, work.dtype
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

    # ------------------------------------------------------------------ passes

    def _run_forward(self, work, params, h0, c0, recurrence=None):
        """Forward pass on ``work`` (its ``x_tb`` holds the input); logits in ``work.logits``."""
        layout = work.layout
        views = layout.views(params)
        blas = self.blas(work.dtype)
        B, T, H = work.batch, work.steps, layout.hidden_size
        for k in range(layout.num_layers):
            w_ih = layout.layer(views, k)[0]
            if k == 0:
                source = _Mat.of(work.x_tb, T * B, layout.input_size)
                blas.gemm(_Mat.of(work.xg[k]), _Mat.of(w_ih), source, tb=True)
            else:
                below = _Mat.of(work.h[k - 1], H, T * B, ld=(T + 1) * B, offset=B)
                blas.gemm(_Mat.of(work.xg[k]), _Mat.of(w_ih), below)
            for state, initial in ((work.h[k], h0), (work.c[k], c0)):
                if initial is None:
                    state[:, :B].fill(0)
                else:
                    state[:, :B] = initial[k].T
            self._forward_recurrence(work, params, k, work.train, recurrence)
        top = layout.num_layers - 1
        slot = T % work.slots[top]
        h_last = _Mat.of(work.h[top], H, B, ld=work.slots[top] * B, offset=slot * B)
        blas.gemm(_Mat.of(work.logits), h_last, _Mat.of(views["head.weight"]), ta=True, tb=True)
        work.logits += views["head.bias"]

    def _run_backward(self, work, params, dlogits, grads, input_grads=False, recurrence=None):
        """Backward pass on ``work`` after a training forward; gradients into ``grads``."""
        layout = work.layout
        views, gviews = layout.views(params), layout.views(grads)
        blas = self.blas(work.dtype)
        buffers = work.backward_buffers()
        B, T, H, L = work.batch, work.steps, layout.hidden_size, layout.num_layers
        O = layout.output_size
        top_h = _Mat.of(work.h[L - 1], H, B, ld=(T + 1) * B, offset=T * B)
        d_out = _Mat.of(dlogits)
        blas.gemm(_Mat.of(gviews["head.weight"]), d_out, top_h, ta=True, tb=True)
        blas.gemm(_Mat.of(gviews["head.bias"], 1, O), _Mat.of(buffers["ones"], B, 1, ld=2), d_out,
                  ta=True)
        blas.gemm(_Mat.of(buffers["dh_last"]), _Mat.of(views["head.weight"]), d_out, ta=True,
                  tb=True)
        dz = _Mat.of(buffers["dz"])
        dh0, dc0, dx = [None] * L, [None] * L, None
        for k in reversed(range(L)):
            top = k == L - 1
            self._backward_recurrence(work, params, k, buffers["dh_last"] if top else None,
                                      None if top else buffers["dh_seq"], recurrence)
            w_ih, w_hh = layout.layer(views, k)[:2]
            if k == 0:
                inputs = _Mat.of(work.x_tb, T * B, layout.input_size)
                blas.gemm(_Mat.of(gviews[f"lstm.weight_ih_l{k}"]), dz, inputs)
            else:
                below = _Mat.of(work.h[k - 1], H, T * B, ld=(T + 1) * B, offset=B)
                blas.gemm(_Mat.of(gviews[f"lstm.weight_ih_l{k}"]), dz, below, tb=True)
            h_prev = _Mat.of(work.h[k], H, T * B, ld=(T + 1) * B)
            blas.gemm(_Mat.of(gviews[f"lstm.weight_hh_l{k}"]), dz, h_prev, tb=True)
            # bias_ih and bias_hh are adjacent in the layout: one GEMM fills both (2 x 4H).
            biases = _Mat(gviews[f"lstm.bias_ih_l{k}"].data.ptr, 2, 4 * H, 4 * H)
            blas.gemm(biases, _Mat.of(buffers["ones"], T * B, 2), dz, ta=True, tb=True)
            if input_grads:
                dh = cupy.empty((H, B), work.dtype)
                blas.gemm(_Mat.of(dh), _Mat.of(w_hh), _Mat(dz.ptr, 4 * H, B, T * B), ta=True)
                dh0[k], dc0[k] = dh.T, buffers["dc"].T.copy()
            if k > 0:
                blas.gemm(_Mat.of(buffers["dh_seq"]), _Mat.of(w_ih), dz, ta=True)
            elif input_grads:
                dx_fm = cupy.empty((layout.input_size, T * B), work.dtype)
                blas.gemm(_Mat.of(dx_fm), _Mat.of(w_ih), dz, ta=True)
                dx = dx_fm.reshape(layout.input_size, T, B).transpose(2, 1, 0)
        if not input_grads:
            return None
        return (cupy.ascontiguousarray(dx), cupy.ascontiguousarray(cupy.stack(dh0)),
                cupy.ascontiguousarray(cupy.stack(dc0)))

    def _new_work(self, layout, params, x, train):
        x = cupy.asarray(x)
        B, T, _ = x.shape
        work = _Workspace(layout, B, T, params.dtype, train)
        work.x_tb[...] = x.transpose(1, 0, 2)
        return work

    # ------------------------------------------------------------------ Backend API

    def forward(self, layout, params, x, h0=None, c0=None, train=False):
        work = self._new_work(layout, params, x, train)
        self._run_forward(work, params, h0, c0)
        return work.logits, (work if train else None)

    def backward(self, layout, params, cache, doutputs, input_grads=False):
        grads = cupy.empty_like(params)
        doutputs = cupy.ascontiguousarray(doutputs, dtype=params.dtype)
        extra = self._run_backward(cache, params, doutputs, grads, input_grads)
        if not input_grads:
            return Gradients(grads)
        return Gradients(grads, *extra)

    def _launch_loss(self, outputs, y, kind, doutputs, value):
        dtype = outputs.dtype
        rows, cols = outputs.shape
        if kind == "cross_entropy":
            _kernel("head", "cross_entropy", dtype)(
                (1,), (_HEAD_THREADS,), (outputs, y, doutputs, value, _i32(rows), _i32(cols)))
        elif kind == "squared_error":
            _kernel("head", "squared_error", dtype)(
                (1,), (_HEAD_THREADS,), (outputs, y, doutputs, value, np.int64(outputs.size)))
        else:
            raise ValueError(f"unknown loss {kind!r}; expected 'cross_entropy' or 'squared_error'")

    def loss(self, outputs, y, kind):
        outputs = cupy.ascontiguousarray(outputs)
        if kind == "cross_entropy":
            y = cupy.ascontiguousarray(cupy.asarray(y), dtype=cupy.int64)
        else:
            y = cupy.ascontiguousarray(cupy.asarray(y), dtype=outputs.dtype)
            if y.shape != outputs.shape:
                raise ValueError(f"y has shape {y.shape}, expected {outputs.shape}")
        doutputs = cupy.empty_like(outputs)
        value = cupy.empty((), cupy.float64)
        self._launch_loss(outputs, y, kind, doutputs, value)
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

    def _launch_adam(self, params, grads, state, lr, beta1, beta2, eps, weight_decay, grad_scale,
                     clip, partials, loss):
        if not isinstance(state, DeviceAdamState):
            raise TypeError("the CUDA backend needs the Adam state made by its adam_state(params)")
        n = params.size
        blocks = max(1, min(4096, math.ceil(n / (4 * _ADAM_THREADS))))
        n_partials = 0 if partials is None else partials.size
        _kernel("adam", "adam", params.dtype)(
            (blocks,), (_ADAM_THREADS,),
            (params, grads, state.m, state.v, np.int64(n), np.float64(lr), np.float64(beta1),
             np.float64(beta2), np.float64(eps), np.float64(weight_decay), np.float64(grad_scale),
             np.float64(clip), _ptr(partials), _i32(n_partials), _ptr(loss), state.counter,
             state.arrivals))

    def adam_step(self, params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, grad_scale=1.0):
        self._launch_adam(params, grads, state, lr, beta1, beta2, eps, weight_decay, grad_scale,
                          0.0, None, None)

    # ------------------------------------------------------------------ training step

    def _train_slot(self, layout, batch, steps, dtype, loss_kind):
        key = (layout.key(), batch, steps, np.dtype(dtype), loss_kind)
        slot = self._slots.pop(key, None)
        if slot is None:
            slot = _TrainSlot(layout, batch, steps, dtype, loss_kind)
        self._slots[key] = slot
        while len(self._slots) > _CACHED_SHAPES:
            self._slots.popitem(last=False)
        return slot

    def _step_body(self, slot, params, state, loss_kind, hyper, recurrence):
        """Everything of one training step after the inputs are in ``slot``: device work only."""
        work = slot.work
        self._run_forward(work, params, None, None, recurrence)
        self._launch_loss(work.logits, slot.y, loss_kind, slot.dlogits, slot.loss)
        self._run_backward(work, params, slot.dlogits, slot.grads, recurrence=recurrence)
        n = slot.grads.size
        _kernel("adam", "sumsq_partials", params.dtype)(
            (slot.partials.size,), (_ADAM_THREADS,), (slot.grads, np.int64(n), slot.partials))
        lr, beta1, beta2, eps, weight_decay, clip = hyper
        self._launch_adam(params, slot.grads, state, lr, beta1, beta2, eps, weight_decay, 1.0,
                          clip, slot.partials, slot.loss)

    def _capture(self, slot, params, state, loss_kind, hyper):
        """A CUDA graph of ``_step_body``, or ``None`` where capture fails here (with a warning)."""
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        modes = [self.recurrence] + (["step"] if self.recurrence != "step" else [])
        errors = []
        for recurrence in modes:
            with stream:
                stream.begin_capture()
                try:
                    self._step_body(slot, params, state, loss_kind, hyper, recurrence)
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

    def train_step(self, layout, params, state, x, y, loss, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.0, clip_grad_norm=None):
        """One training step, all on the device; returns the loss as a 0-d device array.

        No host synchronisation: the Adam kernel itself skips the update when the loss or the
        gradient norm is not finite.  The first step of a new shape (batch, steps, dtype, loss)
        and hyper-parameters runs directly and captures a CUDA graph; the next ones replay it.
        """
        with self._train_lock:
            return self._train_step(layout, params, state, x, y, loss, lr, beta1, beta2, eps,
                                    weight_decay, clip_grad_norm)

    def _train_step(self, layout, params, state, x, y, loss, lr, beta1, beta2, eps, weight_decay,
                    clip_grad_norm):
        x = cupy.asarray(x)
        B, T, _ = x.shape
        slot = self._train_slot(layout, B, T, params.dtype, loss)
        slot.work.x_tb[...] = x.transpose(1, 0, 2)  # the graph reads its inputs from the slot
        slot.y[...] = cupy.asarray(y)
        clip = 0.0 if clip_grad_norm is None else float(clip_grad_norm)
        if clip_grad_norm is not None and not clip > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {clip_grad_norm!r}")
        hyper = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), clip)
        if not self.graphs:
            self._step_body(slot, params, state, loss, hyper, self.recurrence)
            return slot.loss.copy()
        key = (hyper, params.data.ptr, state.m.data.ptr, state.v.data.ptr, state.counter.data.ptr)
        if key in slot.graphs:
            graph = slot.graphs[key]
            if graph is None:
                self._step_body(slot, params, state, loss, hyper, self.recurrence)
            else:
                graph.launch(stream=cupy.cuda.get_current_stream())
            return slot.loss.copy()
        # First step with these buffers: run it (compiles, warms cuBLAS up), then capture.
        self._step_body(slot, params, state, loss, hyper, self.recurrence)
        value = slot.loss.copy()
        slot.graphs[key] = self._capture(slot, params, state, loss, hyper)
        while len(slot.graphs) > _CACHED_SHAPES:
            slot.graphs.popitem(last=False)
        return value
