"""CUDA backend: the hand-written kernels of ``fastlstm/kernels/*.cu`` through CuPy, GEMMs on
cuBLAS (its C API) or on our own kernels (:mod:`~fastlstm.backends.cuda_gemm`).

The network program of :mod:`fastlstm.model` runs on the whole batch over the primitives of
:class:`_CudaOps`.  Data flow of one training step (layouts in ``fastlstm/kernels/lstm_core.cuh``:
feature-major, batch fastest, so the kernels' warps make coalesced accesses):
``x`` (B, T, I) -> time-major copy (T*B, I) -> per layer and direction: input projection of
all steps as ONE GEMM into (4H, T*B) -> recurrence kernel (one persistent cooperative
launch for all T steps, or one launch per step) -> head GEMM -> loss kernel (loss stays on the
device) -> backward recurrence kernel -> weight gradients as ONE GEMM each over all T*B columns
-> norm pass + ONE Adam launch over the flat buffer, which decides on the device whether to
apply the update and reads its settings from device memory.  With fixed shapes and buffers the
whole step is captured once as a CUDA graph and replayed, whatever the settings.

Variable lengths (``torch.nn.utils.rnn.pack_padded_sequence``'s semantics): the host sorts the
rows by length, longest first (:class:`~fastlstm.backends.cuda_support.StepSchedule`), so the
rows still active at a step are a prefix; the steps are packed (time t's active rows at columns
``xcol[t] + b``, as PyTorch's ``PackedSequence``), so the GEMMs run over the valid steps only,
and each step of a recurrence kernel computes its active rows only, reading their count and
columns from a small device array (the schedule).  A reverse direction walks the same packed
steps from T-1 down (a row starts at its last valid step, from its initial state); each row's
last states are gathered for the head, and the results are put back in the caller's row order.
A training slot of variable-length batches keeps all T*B columns (zeroed past the packed
steps) and launches every step, so its CUDA graph serves every batch of its shape, the lengths
being read from the schedule buffer written before each replay.

Dropout (:mod:`fastlstm.dropout`) is fused into the recurrence kernels, which hash the masks
where they apply from one key per mask and caller's row (``_Workspace.masks``, written before
each step): recurrent dropout where the kernel stages h_{t-1} for its dot product (and where
backward turns the recurrent gradient into the gradient of h_{t-1}); dropout between layers
where the kernel writes the layer's output (a masked copy, which the layer above's GEMMs read)
and where backward adds the gradient from the layer above.  The weight gradient of W_hh reads
h_{t-1} as the recurrence read it, regathered through its mask.  Nothing of a step's dropout
but which kinds are on is in a launch, so a captured training step replays with a new seed.

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
    # loads libcublas into the process, where CublasGemm finds it
    from cupy_backends.cuda.libs import cublas  # noqa: F401
except ImportError as exc:  # CuPy, or its cuBLAS library, is missing
    raise ImportError(f"CuPy with cuBLAS is not importable ({_first_line(exc)})") from exc

try:
    _DEVICE_COUNT = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver, driver too old, no device: CuPy raises CUDARuntimeError
    raise ImportError(f"CuPy finds no usable CUDA GPU ({_first_line(exc)})") from exc
if _DEVICE_COUNT < 1:
    raise ImportError("CuPy finds no CUDA GPU")

from .. import model  # noqa: E402
from ..dropout import kinds as dropout_kinds  # noqa: E402
from .base import (  # noqa: E402
    AdamState, Backend, BackendUnavailable, Gradients, check_lengths, check_sample_weight,
    get_loss)
from . import cuda_gemm  # noqa: E402
from .cuda_gemm import Mat  # noqa: E402
from .cuda_support import (  # noqa: E402
    ADAM_SETTINGS, DeviceLimits, StepSchedule, adam_settings, cuda_source, dropout_masks,
    plan_recurrence)

__all__ = ["CUDABackend", "DeviceAdamState"]

_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_HEAD_THREADS = 512
_ADAM_THREADS = 256
_MAX_NORM_BLOCKS = 256
_LAYOUT_THREADS = 256
_CACHED_SHAPES = 4
#: one kernel of each module that a backend needs (gemm: where its GEMMs are our kernels),
#: fetched (so compiled) at construction
_PROBES = {"lstm_step": "fastlstm_forward_step_f32", "head": "fastlstm_softmax_f32",
           "adam": "fastlstm_adam_f32", "gemm": "fastlstm_gemm_nn_f32"}


# ----------------------------------------------------------------------------- kernels

_modules: dict = {}
_kernels: dict = {}


def _module(name):
    """The RawModule of ``fastlstm/kernels/<name>.cu``, compiled once per process (CuPy caches on disk)."""
    if name not in _modules:
        # Built without ``enable_cooperative_groups``: before 14.2 CuPy then compiles relocatable
        # device code, which needs a CUDA toolkit; the persistent kernels' launches ask for a
        # cooperative launch themselves (:func:`_launch_cooperative`), which needs nothing.
        _modules[name] = cupy.RawModule(code=cuda_source(name), options=("-std=c++17",))
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


def _launch_cooperative(kernel, grid, block, args, shared_mem):
    """Launch ``kernel`` (a RawKernel) through ``cuLaunchCooperativeKernel``, whose blocks are
    all resident at once, so that ``grid.sync()`` works; the caller has checked that they fit
    (CuPy would otherwise shrink the grid with a warning, leaving units uncomputed)."""
    kernel.kernel(grid, block, args, shared_mem=shared_mem, enable_cooperative_groups=True)


def _ptr(a):
    """Kernel argument for an optional array: its pointer, or a null pointer."""
    return np.uint64(0) if a is None else a


def _i32(n):
    return np.int32(n)


def _i64(n):
    return np.int64(n)


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

def _graph_key(params, state):
    """What a captured training step bakes in besides its slot's own buffers: the device
    pointers of ``params`` and of every buffer of ``state``.

    The settings' values are not part of it: the graph reads them from ``state.settings``,
    written before each replay, so a new learning rate never needs a new capture.  Nor are a
    batch's lengths and weights: a slot of variable-length batches reads the lengths from its
    schedule buffer, and one of weighted batches the weights from its own buffer, both written
    before each replay too (see :class:`_TrainSlot`).  Nor is the dropout's seed or rate: the
    kernels read the masks' keys and rates from the slot's ``work.masks``, written before each
    replay; only which kinds of dropout are on changes the launches, and the slot keys its
    graphs by that beside this key.
    """
    return tuple(a.data.ptr for a in (params, *state.buffers()))


# ----------------------------------------------------------------------------- buffers


class _Workspace:
    """Device buffers of one forward/backward pass of ``spec`` on a batch of ``(B, T)``.

    ``schedule`` (a :class:`~fastlstm.backends.cuda_support.StepSchedule`) sorts the rows by
    length and packs the steps; :attr:`sched`, its device copy, is what the kernels read.
    ``ragged``: rows may end before step ``T`` (the input is then packed, and the readout and
    the weight gradients gather through the schedule); ``padded``: the buffers have ``T*B``
    columns whatever the lengths, for a training slot whose CUDA graph serves every batch of
    its shape: the columns past the packed steps are zeroed on the device, so the GEMMs over all
    of them add exact zeros.  Layouts as in ``fastlstm/kernels/lstm_core.cuh``; the state
    buffers ``h[k]``, ``c[k]`` hold both directions of layer ``k``, forward's rows first, so the
    layer above reads ``[h_forward, h_reverse]`` as ONE (2H, columns) operand.  A forward
    records in ``layer_inputs[k]`` the sequence layer ``k`` read, and in ``head_input`` the
    states the head read, for backward.

    Dropout (:meth:`set_dropout`, training only): ``masks`` holds the keys and rates of every
    mask (:func:`~fastlstm.backends.cuda_support.dropout_masks`), ``dropped[k]`` (D*H, columns)
    layer ``k``'s output through its mask between layers, packed: what layer ``k + 1`` reads.
    The stored states ``h[k]`` stay unmasked, as the layer computed them: the recurrence reads
    them (through its own mask) and the head reads the top layer's.
    """

    def __init__(self, spec, batch, steps, dtype, train, schedule, padded=False, sched=None):
        B, T, H, L = batch, steps, spec.hidden_size, spec.num_layers
        D = spec.num_directions
        C = schedule.columns
        self.spec, self.batch, self.steps, self.dtype, self.train = spec, B, T, dtype, train
        self.schedule, self.offsets = schedule, schedule.offsets
        self.columns, self.padded = C, padded
        self.ragged = padded or schedule.order is not None
        # the steps the per-step kernels launch: a padded slot's graph launches every one
        self.launch_steps = T if padded or not self.ragged else schedule.max_length
        # the schedule on the device (``sched``: a copy of it already there, which the kernels
        # only read)
        self.sched = cupy.asarray(schedule.data) if sched is None else sched
        self.order = self.inverse = None  # rows sorted (device arrays), where they are
        if schedule.order is not None:
            self.order = cupy.asarray(schedule.order)
            self.inverse = cupy.asarray(np.argsort(schedule.order))
        shape = (C, spec.input_size) if self.ragged else (T, B, spec.input_size)
        self.x_in = cupy.empty(shape, dtype)
        self.xg = [[cupy.empty((4 * H, C), dtype) for _ in range(D)] for _ in range(L)]
        # Every step's states are kept when training, and for a layer that feeds another; the
        # top layer in inference alternates two slots.  Columns [0, B): the initial states.
        self.ring = [not (train or k < L - 1) for k in range(L)]
        self.h = [cupy.empty((D * H, 3 * B if ring else B + C), dtype) for ring in self.ring]
        self.c = [cupy.empty((D * H, 3 * B if ring else B + C), dtype) for ring in self.ring]
        # each row's last states, side by side, where they are not one strided view
        self.head_in = cupy.empty((D * H, B), dtype) if self.ragged or D == 2 else None
        self.outputs = cupy.empty((B, spec.output_size), dtype)
        self.layer_inputs = [None] * L
        self.head_input = None
        self.grad_buffers = None
        self.between = self.recurrent = False
        self.masks = None
        self.dropped = [None] * (L - 1)

    def set_dropout(self, dropout):
        """Apply ``dropout`` (a :class:`~fastlstm.dropout.Dropout` or ``None``) to the passes
        that follow, if this is a training workspace: its masks' keys and rates are copied into
        :attr:`masks` (on the current stream, as the Adam settings), the buffers it needs are
        allocated on first use.  Returns ``(between, recurrent)``, the kinds that are on."""
        spec = self.spec
        self.between, self.recurrent = dropout_kinds(dropout if self.train else None, spec)
        if self.between or self.recurrent:
            host = dropout_masks(dropout, spec, self.batch)
            if self.masks is None:
                self.masks = cupy.empty(host.shape, cupy.uint64)
            self.masks[...] = cupy.asarray(host)  # staged in pinned memory: no wait
        if self.between:
            width = spec.num_directions * spec.hidden_size
            for k in range(spec.num_layers - 1):
                if self.dropped[k] is None:
                    self.dropped[k] = cupy.empty((width, self.columns), self.dtype)
        return self.between, self.recurrent

    def mask(self, k, d, recurrent):
        """The section of :attr:`masks` of layer ``k``, direction ``d``'s recurrent mask (or
        of its mask between layers), or ``None`` where that mask is off."""
        if recurrent:
            on = self.recurrent
        else:
            on = self.between and k < self.spec.num_layers - 1
        return self.masks[k, d, int(recurrent)] if on else None

    def sched_view(self, name, direction=None):
        """The part ``name`` of :attr:`sched` (of one direction's row where given)."""
        start, shape = self.offsets[name]
        size = math.prod(shape)
        if direction is not None:
            size //= shape[0]
            start += direction * size
        return self.sched[start:start + size]

    def backward_buffers(self):
        """Buffers of the backward pass, allocated on first use."""
        if self.grad_buffers is None:
            B, H, C, dtype = self.batch, self.spec.hidden_size, self.columns, self.dtype
            D, L = self.spec.num_directions, self.spec.num_layers
            self.grad_buffers = dict(
                dz=cupy.empty((4 * H, C), dtype),
                dc=cupy.empty((H, B), dtype),
                dh_last=cupy.empty((D * H, B), dtype),
                # the gradient w.r.t. layer k's output sequence is in dh_seq[k % D]: the two
                # directions of a layer read one while they sum their parts into the other
                dh_seq=[cupy.empty((D * H, C), dtype) for _ in range(D if L > 1 else 0)],
                ones=cupy.ones((C, 2), dtype))  # sums over columns by GEMM
            if self.ragged or D == 2:
                self.grad_buffers.update(dz_first=cupy.empty((4 * H, B), dtype))
        if (self.ragged or self.spec.num_directions == 2 or self.recurrent) and \
                "h_prev" not in self.grad_buffers:  # a gather of h_{t-1} for dW_hh
            self.grad_buffers["h_prev"] = cupy.empty((self.spec.hidden_size, self.columns),
                                                     self.dtype)
        return self.grad_buffers


class _TrainSlot:
    """Static buffers of ``train_step`` for one shape and loss (a :class:`Loss`): inputs
    copied in, graphs reuse them.

    A slot of variable-length batches (``ragged``) is padded (:class:`_Workspace`): its
    buffers and GEMMs cover all ``T*B`` columns and its kernels launch for every step, so a
    graph captured once serves every batch of the shape; each batch's schedule is written into
    ``work.sched`` before its step, and the kernels skip the rows past their lengths.  A
    fixed-length batch takes a slot of its own (the key holds ``ragged``), which runs the
    fixed-length path as it always did.  The slot's workspace owns the dropout's buffers
    (:meth:`_Workspace.set_dropout`): each step writes its masks' keys there, and its graphs
    are keyed by the kinds of dropout that are on beside :func:`_graph_key`.  A slot of
    ``weighted`` batches holds their weights (``weights``, float64, written before each step
    like the targets) and the loss kernel's sum of them (``weight_sum``), which the Adam kernel
    checks; one of unweighted batches has neither, and its kernels get null pointers (the key
    holds ``weighted``).  ``blas``: the slot's own GEMMs (a handle and workspaces that its
    graphs bake in, used by no other caller, so freed with the slot).
    """

    def __init__(self, spec, batch, steps, dtype, loss_kind, ragged, weighted, blas):
        self.blas = blas
        schedule = StepSchedule(None, batch, steps, columns=batch * steps)
        self.work = _Workspace(spec, batch, steps, dtype, train=True, schedule=schedule,
                               padded=ragged)
        self.work.backward_buffers()
        self.loss_kind = loss_kind
        targets = (batch,) if loss_kind.class_targets else (batch, spec.output_size)
        self.y = cupy.empty(targets, loss_kind.target_dtype(dtype))
        self.doutputs = cupy.empty((batch, spec.output_size), dtype)
        self.loss = cupy.zeros((), cupy.float64)
        self.weights = cupy.empty((batch,), cupy.float64) if weighted else None
        self.weight_sum = cupy.zeros((), cupy.float64) if weighted else None
        self.grads = cupy.empty((spec.layout.size,), dtype)
        blocks = min(_MAX_NORM_BLOCKS, max(1, math.ceil(spec.layout.size / (4 * _ADAM_THREADS))))
        self.partials = cupy.zeros((blocks,), cupy.float64)
        # (_graph_key, dropout modes) -> CUDA graph (or None: capture failed)
        self.graphs = OrderedDict()


# ----------------------------------------------------------------------------- primitives


class _SeqGrad(NamedTuple):
    """The gradient w.r.t. a sequence, as the backward recurrence kernel takes it: at each row's
    last state only (``last``, (H, B)), or at every packed step (``steps``, feature-major
    (features, columns))."""

    last: Any
    steps: Any


class _CudaOps:
    """The primitives of :mod:`fastlstm.model` on the whole batch of a workspace, on the device.

    The rows are in the order of the workspace's schedule (sorted by length, longest first,
    where they have lengths; the backend sorts them on the way in and back on the way out).
    A sequence is the buffer that holds it: the network's input is ``work.x_in``, copied there
    before (time-major (T, B, I), or packed (columns, I)); the hidden states of layer ``k`` are
    ``work.h[k]``, feature-major (D*H, B + columns) with the initial states first, both
    directions in one buffer (so :meth:`join` has nothing to do).  Its gradient is a
    :class:`_SeqGrad`; the two directions' parts of one are summed into one buffer (the second
    GEMM accumulates).  A layer's input projection and each of its weight gradients is ONE GEMM
    over all packed steps; the recurrence runs the kernels of :class:`CUDABackend`, which skip
    the rows past their lengths.

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
        Backward also keeps the gradients w.r.t. the initial states, per layer and direction,
        in ``dh0`` and ``dc0`` (arrays of shape (B, H), rows in the workspace's order).
    recurrence : {"persistent", "step"}, optional
        The recurrence kernels to run; by default the backend's choice.
    blas : optional
        The GEMMs (:mod:`~fastlstm.backends.cuda_gemm`) to run; by default the thread's.
    """

    def __init__(self, backend, work, params, grads=None, initial_grads=False, recurrence=None,
                 blas=None):
        self.backend, self.work, self.params = backend, work, params
        self._recurrence = recurrence  # beside the method of the same name
        self.layout = work.spec.layout
        self.views = self.layout.views(params)
        self.grad_views = None if grads is None else self.layout.views(grads)
        self.blas = backend.blas(work.dtype) if blas is None else blas
        n = work.spec.num_layers * work.spec.num_directions
        self.dh0, self.dc0 = ([None] * n, [None] * n) if initial_grads else (None, None)
        self._dx = None          # the gradient w.r.t. the network's input
        self._summed = set()     # layers whose input gradient one direction has written

    def _block(self, buffer, d):
        """Direction ``d``'s rows of a buffer of both directions (its own, contiguous)."""
        H = self.layout.hidden_size
        return buffer[d * H:(d + 1) * H]

    def _operand(self, seq):
        """``(matrix, transposed)``: ``seq`` as a GEMM operand whose ``op`` is (features, columns).

        Only the network's input (time-major or packed: rows are steps x batch) is transposed.
        A layer's states start with the B columns of the initial states; its output through
        the mask between layers (``work.dropped``) does not.
        """
        work = self.work
        if seq is work.x_in:
            return Mat.of(seq, work.columns, seq.shape[-1]), True
        offset = work.batch if any(seq is h for h in work.h) else 0
        return Mat.of(seq, seq.shape[0], work.columns, ld=seq.shape[1], offset=offset), False

    def inputs(self, x, lengths):
        return x  # copied in, sorted and packed, by the backend

    def recurrence(self, k, seq, h0, c0, reverse):
        work, B, d = self.work, self.work.batch, int(reverse)
        source, transposed = self._operand(seq)
        w_ih = self.layout.layer(self.views, k, reverse)[0]
        self.blas.gemm(Mat.of(work.xg[k][d]), Mat.of(w_ih), source, tb=transposed)
        for state, initial in ((work.h[k], h0), (work.c[k], c0)):
            block = self._block(state, d)
            if initial is None:
                block[:, :B].fill(0)
            else:
                block[:, :B] = initial.T
        self.backend._forward_recurrence(work, self.params, k, d, work.train, self._recurrence)
        # what the layer above reads: the states, or their copy through the mask between layers
        out = work.dropped[k] if work.mask(k, d, False) is not None else work.h[k]
        if work.padded and k < work.spec.num_layers - 1:
            # the columns past this batch's packed steps, which the layer above's GEMMs read
            block = self._block(out, d)
            tail = block if out is not work.h[k] else block[:, B:]
            self.backend._zero_tail(work, tail, block.shape[1], block.shape[0])
        work.layer_inputs[k] = seq
        return out

    def join(self, outs):
        return outs[0]  # the directions write their rows of one buffer

    def readout(self, outs):
        work, H = self.work, self.layout.hidden_size
        B, T, top = work.batch, work.steps, work.spec.num_layers - 1
        h = work.h[top]
        if work.head_in is None:  # one direction, every row every step: time T-1's columns
            col = B + ((T - 1) % 2 if work.ring[top] else T - 1) * B
            return Mat.of(h, H, B, ld=h.shape[1], offset=col)
        last = work.sched_view("last_ring" if work.ring[top] else "last")
        for d in range(len(outs)):
            self.backend._gather(self._block(h, d), 1, h.shape[1], last[d * B:(d + 1) * B],
                                 self._block(work.head_in, d), 1, B, H, B)
        return Mat.of(work.head_in)

    def head(self, h):
        outputs = self.work.outputs
        self.blas.gemm(Mat.of(outputs), h, Mat.of(self.views["head.weight"]), ta=True, tb=True)
        outputs += self.views["head.bias"]
        self.work.head_input = h
        return outputs

    def head_backward(self, doutputs):
        work, blas, grads = self.work, self.blas, self.grad_views
        buffers = work.backward_buffers()
        if work.padded:  # no kernel writes dz past the packed steps: its GEMMs read zeros there
            dz = buffers["dz"]
            self.backend._zero_tail(work, dz, dz.shape[1], dz.shape[0])
        B, O = doutputs.shape
        d_out = Mat.of(doutputs)
        blas.gemm(Mat.of(grads["head.weight"]), d_out, work.head_input, ta=True, tb=True)
        blas.gemm(Mat.of(grads["head.bias"], 1, O), Mat.of(buffers["ones"], B, 1, ld=2), d_out,
                  ta=True)
        blas.gemm(Mat.of(buffers["dh_last"]), Mat.of(self.views["head.weight"]), d_out,
                  ta=True, tb=True)
        return buffers["dh_last"]

    def readout_backward(self, dh):
        return [_SeqGrad(last=self._block(dh, d), steps=None)
                for d in range(self.work.spec.num_directions)]

    def recurrence_backward(self, k, dseq, reverse, input_grads):
        work, blas, layout, d = self.work, self.blas, self.layout, int(reverse)
        B, C, H = work.batch, work.columns, layout.hidden_size
        buffers = work.backward_buffers()
        self.backend._backward_recurrence(work, self.params, k, d, dseq.last, dseq.steps,
                                          self._recurrence)
        w_ih, w_hh = layout.layer(self.views, k, reverse)[:2]
        dw_ih, dw_hh, db_ih, _ = layout.layer(self.grad_views, k, reverse)
        dz = Mat.of(buffers["dz"])
        source, transposed = self._operand(work.layer_inputs[k])
        blas.gemm(Mat.of(dw_ih), dz, source, tb=not transposed)
        h = self._block(work.h[k], d)
        recurrent_mask = work.mask(k, d, True)
        if recurrent_mask is not None:
            # h_{t-1} as the recurrence read it, through its mask: regathered, not kept from the
            # forward pass (the schedule's x gives each packed column's caller's row and step)
            h_prev = buffers["h_prev"]
            self.backend._mask_columns(h, h.shape[1], work.sched_view("prev", d), h_prev, C, H,
                                       C, recurrent_mask, work.sched_view("x"), work.steps)
            blas.gemm(Mat.of(dw_hh), dz, Mat.of(h_prev), tb=True)
        elif work.ragged or reverse:
            # the state each packed step started from, gathered in the packed order
            h_prev = buffers["h_prev"]
            self.backend._gather(h, 1, h.shape[1], work.sched_view("prev", d), h_prev, 1, C, H, C)
            blas.gemm(Mat.of(dw_hh), dz, Mat.of(h_prev), tb=True)
        else:  # forwards over every step: step t started from the state in column t*B + b
            blas.gemm(Mat.of(dw_hh), dz, Mat.of(h, H, C, ld=h.shape[1]), tb=True)
        # bias_ih and bias_hh are adjacent in the layout: one GEMM fills both (2 x 4H).
        blas.gemm(Mat(db_ih.data.ptr, 2, 4 * H, 4 * H), Mat.of(buffers["ones"], C, 2), dz,
                  ta=True, tb=True)
        if self.dh0 is not None:
            dh = cupy.empty((H, B), work.dtype)
            if reverse:  # a row's first step is its last valid one
                first = buffers["dz_first"]
                self.backend._gather(buffers["dz"], 1, C, work.sched_view("first", 1), first, 1,
                                     B, 4 * H, B)
                dz_first = Mat.of(first)
            else:  # every row's first step is step 0: the first B columns
                dz_first = Mat(dz.ptr, 4 * H, B, C)
            blas.gemm(Mat.of(dh), Mat.of(w_hh), dz_first, ta=True)
            if recurrent_mask is not None:  # h0 is h_{-1}: the first step read it masked
                self.backend._mask_columns(dh, B, None, dh, B, H, B, recurrent_mask,
                                           work.sched_view("row"), 1)
            n = k * work.spec.num_directions + d
            self.dh0[n], self.dc0[n] = dh.T, buffers["dc"].T.copy()
        if not input_grads:
            return None
        # The gradient w.r.t. the layer's input: the network input's is the caller's, so its own;
        # hidden states' goes to the layer below's dh_seq buffer.  The second direction adds its
        # part to the first's.
        if transposed:
            if self._dx is None:
                self._dx = cupy.empty((w_ih.shape[1], C), work.dtype)
            out = self._dx
        else:
            out = buffers["dh_seq"][(k - 1) % len(buffers["dh_seq"])]
        blas.gemm(Mat.of(out), Mat.of(w_ih), dz, ta=True, accumulate=k in self._summed)
        self._summed.add(k)
        return _SeqGrad(last=None, steps=out)

    def join_backward(self, dins, parts):
        summed = dins[0].steps  # both directions' parts are summed in one buffer
        if parts == 1:
            return [_SeqGrad(last=None, steps=summed)]
        return [_SeqGrad(last=None, steps=self._block(summed, d)) for d in range(parts)]


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
        Adam state), and replay it.  :attr:`graph_replays` counts the replays.
    gemm : {"cublas", "kernels"}, default="cublas"
        The GEMMs' implementation (:mod:`~fastlstm.backends.cuda_gemm`), both capturable:
        ``"cublas"`` calls cuBLAS's C API on a handle of its own, ``"kernels"`` runs
        fastlstm's own GEMM kernels.  cuBLAS is the default as the tuned library; which is
        faster at these small shapes is for a GPU to tell (``benchmarks/gpu_epoch.py`` times
        both).
    """

    name = "cuda"
    xp = cupy
    GEMMS = ("cublas", "kernels")

    def __init__(self, recurrence="persistent", graphs=True, gemm="cublas"):
        if recurrence not in ("persistent", "step"):
            raise ValueError(f"recurrence must be 'persistent' or 'step', got {recurrence!r}")
        if gemm not in self.GEMMS:
            raise ValueError(f"gemm must be one of {self.GEMMS}, got {gemm!r}")
        self.recurrence, self.gemm = recurrence, gemm
        self.graphs = bool(graphs)
        self.graph_replays = 0
        self._persistent_ok: dict = {}
        self._fixed_schedules: OrderedDict = OrderedDict()  # (B, T) -> (schedule, on device)
        self._slots: OrderedDict = OrderedDict()
        # A slot's input buffers are shared by every caller of train_step with that shape: the
        # copy-in, the launch and the copy-out of one step must not interleave with another's.
        self._train_lock = threading.Lock()
        self._gemms = threading.local()  # (device, dtype) -> GEMMs, per thread: see blas()
        try:  # compile now, so that a machine where NVRTC fails falls back to the CPU
            for module, kernel in _PROBES.items():
                if module != "gemm" or gemm == "kernels":
                    _module(module).get_function(kernel)
        except Exception as exc:
            raise BackendUnavailable(
                f"the CUDA kernels of fastlstm do not compile here ({exc}); use device='cpu'"
            ) from exc
        self._cublas = None
        if gemm == "cublas":
            try:
                self._cublas = cuda_gemm.load_cublas()
            except OSError as exc:
                raise BackendUnavailable(
                    f"libcublas does not load through ctypes here ({exc}); use "
                    "CUDABackend(gemm='kernels') or device='cpu'") from exc

    # ------------------------------------------------------------------ helpers

    def blas(self, dtype):
        """The calling thread's GEMMs of ``dtype`` on the current device.

        A GEMM object holds a handle and a workspace used in stream order, so threads (whose
        current streams differ) each have their own, as they have CuPy's cuBLAS handles; a
        training slot has its own too (:class:`_TrainSlot`), which its CUDA graph bakes in.
        """
        gemms = self._gemms.__dict__
        key = (cupy.cuda.Device().id, np.dtype(dtype))
        if key not in gemms:
            gemms[key] = self._new_gemm(dtype)
        return gemms[key]

    def _new_gemm(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in _SUFFIX:
            raise TypeError(f"the CUDA backend supports float32 and float64, not {dtype}")
        if self.gemm == "cublas":
            return cuda_gemm.CublasGemm(dtype, self._cublas)
        return cuda_gemm.KernelGemm(dtype, lambda name, dtype: _kernel("gemm", name, dtype))

    def to_host(self, a):
        return cupy.asnumpy(a)

    def recurrence_kind(self, direction, hidden, batch, dtype, recurrence=None):
        """``"persistent"`` or ``"step"``: the kernel a recurrence of this shape runs here."""
        return "persistent" if self._persistent_plan(direction, hidden, batch, dtype,
                                                     recurrence) else "step"

    def _persistent_plan(self, direction, hidden, batch, dtype, recurrence=None, dropout=False):
        """The persistent kernel's plan, or ``None`` where the per-step kernels run; with
        ``dropout`` compiled in, whose registers may make fewer blocks co-resident."""
        if (recurrence or self.recurrence) != "persistent":
            return None
        key = (direction, hidden, batch, np.dtype(dtype), bool(dropout))
        if key not in self._persistent_ok:
            self._persistent_ok[key] = self._check_persistent(*key)
        return self._persistent_ok[key]

    def _check_persistent(self, direction, hidden, batch, dtype, dropout):
        limits = _limits()
        plan = plan_recurrence(direction, hidden, batch, dtype.itemsize, limits, persistent=True)
        if plan is None or not limits.cooperative:
            return None
        try:
            name = self._recurrence_name(direction, plan, True, dropout)
            kernel = _kernel("lstm_persistent", name, dtype)
            per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                kernel.kernel.ptr, plan.threads, plan.shared_bytes)
        except Exception as exc:
            warnings.warn(f"fastlstm: persistent CUDA kernels unavailable ({exc}); "
                          "using per-step kernels", RuntimeWarning, stacklevel=3)
            return None
        return plan if per_sm * limits.multiprocessors >= plan.grid[0] else None

    @staticmethod
    def _recurrence_name(direction, plan, persistent, dropout=False):
        kind = ("persistent" if persistent else "step") + ("_dropout" if dropout else "")
        if direction == "forward":
            return f"forward_{kind}"
        return f"backward_{kind}_v{plan.vector}"

    # ------------------------------------------------------------------ recurrences

    @staticmethod
    def _schedule_args(work, ring, d):
        """The kernels' ``Schedule`` of direction ``d`` (the state in two slots where ``ring``)."""
        return (work.sched_view("active"), work.sched_view("xcol"),
                work.sched_view("ring" if ring else "scol"), _i32(work.steps), _i32(d))

    @staticmethod
    def _dropout_args(work, k, d, forward):
        """``(dropout, args)``: whether the recurrence of layer ``k``, direction ``d`` runs with
        dropout compiled in, and the kernels' ``Dropout`` arguments (null where a mask is off;
        forwards: and where the masked output goes)."""
        recurrent, between = work.mask(k, d, True), work.mask(k, d, False)
        args = (work.sched_view("row"), _ptr(recurrent), _ptr(between))
        if forward:
            H = work.spec.hidden_size
            args += (_ptr(None if between is None else work.dropped[k][d * H:(d + 1) * H]),)
        return recurrent is not None or between is not None, args

    def _forward_recurrence(self, work, params, k, d, store_gates, recurrence):
        layout, dtype = work.spec.layout, work.dtype
        H, B = layout.hidden_size, work.batch
        _, w_hh, b_ih, b_hh = layout.layer(layout.views(params), k, reverse=d == 1)
        h, c = (state[d * H:(d + 1) * H] for state in (work.h[k], work.c[k]))
        dropout, dropout_args = self._dropout_args(work, k, d, forward=True)
        args = ((w_hh, b_ih, b_hh, work.xg[k][d], h, c, _i32(H), _i64(work.columns),
                 _i64(h.shape[1])) + self._schedule_args(work, work.ring[k], d) + dropout_args)
        plan = self._persistent_plan("forward", H, B, dtype, recurrence, dropout)
        if plan is not None:
            name = self._recurrence_name("forward", plan, True, dropout)
            kernel = _kernel("lstm_persistent", name, dtype)
            tail = (_i32(store_gates), _i32(plan.slice_units), _i32(plan.chunk_rows),
                    _i32(plan.stage_rows))
            _launch_cooperative(kernel, plan.grid, (plan.threads,), args + tail, plan.shared_bytes)
            return
        plan = plan_recurrence("forward", H, B, dtype.itemsize, _limits(), persistent=False)
        kernel = _kernel("lstm_step", self._recurrence_name("forward", plan, False, dropout), dtype)
        tail = (_i32(store_gates), _i32(plan.slice_units), _i32(plan.chunk_rows),
                _i32(plan.stage_rows))
        steps = range(work.launch_steps)
        for t in reversed(steps) if d else steps:
            kernel(plan.grid, (plan.threads,), args + (_i32(t),) + tail,
                   shared_mem=plan.shared_bytes)

    def _backward_recurrence(self, work, params, k, d, dh_last, dh_seq, recurrence):
        layout, dtype = work.spec.layout, work.dtype
        H, B = layout.hidden_size, work.batch
        buffers = work.backward_buffers()
        w_hh = layout.layer(layout.views(params), k, reverse=d == 1)[1]
        c = work.c[k][d * H:(d + 1) * H]
        dropout, dropout_args = self._dropout_args(work, k, d, forward=False)
        args = ((w_hh, work.xg[k][d], c, _ptr(dh_last), _ptr(dh_seq), buffers["dz"],
                 buffers["dc"], _i32(H), _i32(B), _i64(work.columns), _i64(c.shape[1]))
                + self._schedule_args(work, False, d) + dropout_args)
        plan = self._persistent_plan("backward", H, B, dtype, recurrence, dropout)
        if plan is not None:
            name = self._recurrence_name("backward", plan, True, dropout)
            tail = (_i32(plan.slice_units), _i32(plan.chunk_rows), _i32(plan.stage_rows))
            _launch_cooperative(_kernel("lstm_persistent", name, dtype), plan.grid,
                                (plan.threads,), args + tail, plan.shared_bytes)
            return
        plan = plan_recurrence("backward", H, B, dtype.itemsize, _limits(), persistent=False)
        kernel = _kernel("lstm_step", self._recurrence_name("backward", plan, False, dropout),
                         dtype)
        tail = (_i32(plan.slice_units), _i32(plan.chunk_rows), _i32(plan.stage_rows))
        steps = range(work.launch_steps)  # the forward pass's, last first
        for t in steps if d else reversed(steps):
            kernel(plan.grid, (plan.threads,), args + (_i32(t),) + tail,
                   shared_mem=plan.shared_bytes)

    # ------------------------------------------------------------------ layouts

    @staticmethod
    def _gather(src, src_col, src_feature, idx, dst, dst_col, dst_feature, features, cols):
        """``dst[c, f] = src[idx[c], f]`` (zero where ``idx[c] < 0``), strides in elements."""
        blocks = max(1, min(4096, math.ceil(features * cols / _LAYOUT_THREADS)))
        _kernel("lstm_step", "gather_columns", dst.dtype)(
            (blocks,), (_LAYOUT_THREADS,),
            (src, _i64(src_col), _i64(src_feature), idx, dst, _i64(dst_col), _i64(dst_feature),
             _i32(features), _i32(cols)))

    @staticmethod
    def _mask_columns(src, ld_src, idx, dst, ld_dst, features, cols, mask, rows, steps):
        """``dst[f, c] = src[f, idx[c]] * mask(rows[c] // steps, rows[c] % steps, f)`` (``idx``
        ``None``: ``c``; zero where ``idx[c] < 0``): a gather through a dropout mask (a section
        of ``work.masks``), with each column's caller's row and step from ``rows``."""
        blocks = max(1, min(4096, math.ceil(features * cols / _LAYOUT_THREADS)))
        _kernel("lstm_step", "mask_columns", dst.dtype)(
            (blocks,), (_LAYOUT_THREADS,),
            (src, _i64(ld_src), _ptr(idx), dst, _i64(ld_dst), _i32(features), _i32(cols), mask,
             rows, _i32(steps)))

    @staticmethod
    def _zero_tail(work, a, ld, rows):
        """Zero the columns of ``a`` (``rows`` x ``work.columns``, row length ``ld``) past the
        packed steps of the batch whose schedule ``work.sched`` holds (read on the device)."""
        blocks = max(1, min(4096, math.ceil(rows * work.columns / _LAYOUT_THREADS)))
        _kernel("lstm_step", "zero_tail", a.dtype)(
            (blocks,), (_LAYOUT_THREADS,),
            (a, _i64(ld), _i32(rows), work.sched_view("total"), _i32(work.columns)))

    def _fixed_schedule(self, batch, steps):
        """The schedule of every row over every step and its device copy, made once per shape."""
        key = (batch, steps)
        found = self._fixed_schedules.pop(key, None)
        if found is None:
            schedule = StepSchedule(None, batch, steps)
            found = (schedule, cupy.asarray(schedule.data))
        self._fixed_schedules[key] = found
        while len(self._fixed_schedules) > _CACHED_SHAPES:
            self._fixed_schedules.popitem(last=False)
        return found

    def _copy_in(self, work, x):
        """``x`` (caller's rows) into ``work.x_in``: time-major, or sorted and packed."""
        if not work.ragged:
            work.x_in[...] = x.transpose(1, 0, 2)
            return
        x = cupy.ascontiguousarray(x, dtype=work.dtype)
        n = x.shape[2]
        self._gather(x, n, 1, work.sched_view("x"), work.x_in, n, 1, n, work.columns)

    # ------------------------------------------------------------------ Backend API

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None,
                dropout=None):
        x = cupy.asarray(x)
        B, T, _ = x.shape
        lengths = check_lengths(lengths, B, T)
        h0, c0 = self.initial_states(spec, params, x, h0, c0)
        if lengths is None:
            schedule, sched = self._fixed_schedule(B, T)
        else:
            schedule, sched = StepSchedule(lengths, B, T), None
        work = _Workspace(spec, B, T, params.dtype, train, schedule, sched=sched)
        work.set_dropout(dropout)  # in training only
        self._copy_in(work, x)
        if work.order is not None:  # the initial states, in the rows' sorted order
            h0, c0 = (None if a is None else cupy.asarray(a)[:, work.order] for a in (h0, c0))
        outputs = model.forward(_CudaOps(self, work, params), spec, work.x_in, h0, c0)
        if work.order is not None:
            outputs = outputs[work.inverse]
        return outputs, (work if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        work = cache
        grads = cupy.empty_like(params)
        ops = _CudaOps(self, work, params, grads, initial_grads=input_grads)
        doutputs = cupy.ascontiguousarray(doutputs, dtype=params.dtype)
        if work.order is not None:
            doutputs = cupy.ascontiguousarray(doutputs[work.order])
        dseq = model.backward(ops, spec, doutputs, input_grads)
        if not input_grads:
            return Gradients(grads)
        B, T, I = work.batch, work.steps, spec.input_size
        dh0, dc0 = cupy.stack(ops.dh0), cupy.stack(ops.dc0)
        if work.order is None:
            dx = dseq.steps.reshape(I, T, B).transpose(2, 1, 0)
        else:  # unpacked into the caller's rows, zero past each row's length
            dx = cupy.empty((B, T, I), work.dtype)
            unpack = cupy.asarray(work.schedule.unpack())
            self._gather(dseq.steps, 1, work.columns, unpack, dx, I, 1, I, B * T)
            dh0, dc0 = dh0[:, work.inverse], dc0[:, work.inverse]
        return Gradients(grads, cupy.ascontiguousarray(dx), cupy.ascontiguousarray(dh0),
                         cupy.ascontiguousarray(dc0))

    @staticmethod
    def _launch_loss(outputs, y, loss_kind, doutputs, value, weights=None, weight_sum=None):
        """The kernel of ``loss_kind`` (a :class:`Loss`): ``value`` and ``doutputs`` from
        ``outputs`` and ``y`` with the rows weighted by ``weights`` (float64, or ``None``:
        all 1), whose sum goes to ``weight_sum`` where given."""
        rows, cols = outputs.shape
        _kernel("head", loss_kind.name, outputs.dtype)(
            (1,), (_HEAD_THREADS,), (outputs, y, _ptr(weights), doutputs, value,
                                     _ptr(weight_sum), _i32(rows), _i32(cols)))

    def loss(self, outputs, y, kind, sample_weight=None):
        loss_kind = get_loss(kind)
        outputs = cupy.ascontiguousarray(outputs)
        y = cupy.ascontiguousarray(cupy.asarray(y), dtype=loss_kind.target_dtype(outputs.dtype))
        if not loss_kind.class_targets and y.shape != outputs.shape:
            raise ValueError(f"y has shape {y.shape}, expected {outputs.shape}")
        weights, _ = check_sample_weight(sample_weight, outputs.shape[0], cupy)
        doutputs = cupy.empty_like(outputs)
        value = cupy.empty((), cupy.float64)
        self._launch_loss(outputs, y, loss_kind, doutputs, value, weights)
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
    def _launch_adam(params, grads, state, partials, loss, weight_sum=None):
        """The Adam kernel on ``state``'s buffers and settings; ``partials`` (the gradient's
        sums of squares) and ``loss`` are checked for finiteness where given, and the batch's
        ``weight_sum`` for being positive."""
        n = params.size
        blocks = max(1, min(4096, math.ceil(n / (4 * _ADAM_THREADS))))
        n_partials = 0 if partials is None else partials.size
        _kernel("adam", "adam", params.dtype)(
            (blocks,), (_ADAM_THREADS,),
            (params, grads, state.m, state.v, np.int64(n), state.settings, _ptr(partials),
             _i32(n_partials), _ptr(loss), _ptr(weight_sum), state.counter, state.arrivals))

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        _device_state(state).write_settings(config, grad_scale)
        self._launch_adam(params, grads, state, None, None)

    # ------------------------------------------------------------------ training step

    def _train_slot(self, spec, batch, steps, dtype, loss_kind, ragged, weighted):
        key = (spec, batch, steps, np.dtype(dtype), loss_kind, ragged, weighted)
        slot = self._slots.pop(key, None)
        if slot is None:
            slot = _TrainSlot(spec, batch, steps, dtype, loss_kind, ragged, weighted,
                              self._new_gemm(dtype))
        self._slots[key] = slot
        while len(self._slots) > _CACHED_SHAPES:
            self._slots.popitem(last=False)
        return slot

    def _step_body(self, slot, params, state, recurrence):
        """Everything of one training step after the inputs are in ``slot`` and the settings in
        ``state``: device work only, on fixed buffers (what a CUDA graph captures)."""
        work, spec = slot.work, slot.work.spec
        ops = _CudaOps(self, work, params, slot.grads, recurrence=recurrence, blas=slot.blas)
        model.forward(ops, spec, work.x_in)
        self._launch_loss(work.outputs, slot.y, slot.loss_kind, slot.doutputs, slot.loss,
                          slot.weights, slot.weight_sum)
        model.backward(ops, spec, slot.doutputs)
        n = slot.grads.size
        _kernel("adam", "sumsq_partials", params.dtype)(
            (slot.partials.size,), (_ADAM_THREADS,), (slot.grads, np.int64(n), slot.partials))
        self._launch_adam(params, slot.grads, state, slot.partials, slot.loss, slot.weight_sum)

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

    def train_step(self, spec, params, state, x, y, loss, config, lengths=None,
                   sample_weight=None, dropout=None):
        """One training step, all on the device; returns the loss as a 0-d device array.

        No host synchronisation: the Adam kernel itself skips the update when the loss or the
        gradient norm is not finite, or the batch's weights sum to zero.  ``config`` is copied
        into ``state.settings``, where the step reads it.  The first step of a new shape
        (batch, steps, dtype, loss, whether the rows have lengths, whether they have weights)
        and set of buffers (``params`` and ``state``'s) runs directly and captures a CUDA graph; the next ones replay it, whatever
        their settings, lengths, weights and dropout seed and rates (the kinds of dropout that
        are on, between layers and recurrent, are a graph's own).
        """
        loss_kind, state, x = get_loss(loss), _device_state(state), cupy.asarray(x)
        B, T, _ = x.shape
        lengths = check_lengths(lengths, B, T)
        weights, _ = check_sample_weight(sample_weight, B, cupy)
        with self._train_lock:
            return self._train_step(spec, params, state, x, y, loss_kind, config, lengths,
                                    weights, dropout)

    def _train_step(self, spec, params, state, x, y, loss_kind, config, lengths, weights,
                    dropout):
        B, T, _ = x.shape
        slot = self._train_slot(spec, B, T, params.dtype, loss_kind, lengths is not None,
                                weights is not None)
        work = slot.work
        y = cupy.asarray(y)
        # A graph reads its inputs, weights and this batch's schedule from the slot, its
        # settings from the state.
        if lengths is not None:
            schedule = StepSchedule(lengths, B, T, columns=work.columns)
            work.sched[...] = cupy.asarray(schedule.data)
            order = cupy.asarray(schedule.order)
            y = y[order]
            weights = None if weights is None else weights[order]
        self._copy_in(work, x)
        slot.y[...] = y
        if weights is not None:
            slot.weights[...] = weights
        state.write_settings(config)
        modes = work.set_dropout(dropout)  # this step's masks: keys and rates, in the slot
        work.backward_buffers()  # what these modes need, allocated before any capture
        if not self.graphs:
            self._step_body(slot, params, state, self.recurrence)
            return slot.loss.copy()
        key = (_graph_key(params, state), modes)
        if key in slot.graphs:
            graph = slot.graphs[key]
            if graph is None:
                self._step_body(slot, params, state, self.recurrence)
            else:
                graph.launch(stream=cupy.cuda.get_current_stream())
                self.graph_replays += 1
            return slot.loss.copy()
        # First step with these buffers: run it (compiles, warms cuBLAS up), then capture.
        self._step_body(slot, params, state, self.recurrence)
        value = slot.loss.copy()
        slot.graphs[key] = self._capture(slot, params, state)
        while len(slot.graphs) > _CACHED_SHAPES:
            slot.graphs.popitem(last=False)
        return value
