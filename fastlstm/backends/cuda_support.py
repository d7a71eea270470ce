"""What the CUDA backend needs that does not need a GPU: its sources, launch plans and settings.

Kept apart from :mod:`fastlstm.backends.cuda` (which imports CuPy) so that it can be
tested on any machine.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from .. import dropout as _dropout
from ..kernels import CUDA_SOURCE_DIR

__all__ = ["CUDA_MODULES", "cuda_source", "DeviceLimits", "RecurrencePlan", "plan_recurrence",
           "StepSchedule", "step_schedule", "ADAM_SETTINGS", "adam_settings", "MASK_HEADER",
           "dropout_masks"]

#: the CUDA source files, one RawModule each
CUDA_MODULES = ("lstm_step", "lstm_persistent", "head", "adam", "gemm")

_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^#pragma once\s*$", re.MULTILINE)


def cuda_source(name):
    """The source of ``fastlstm/kernels/<name>.cu`` with its local ``#include "x.cuh"`` lines inlined.

    Inlining (rather than ``-I``) makes the text CuPy hashes for its kernel cache the whole
    program, so an edited header is never served from a stale cache.  Each header is
    inlined once, without its ``#pragma once``.
    """
    seen = set()

    def expand(text):
        def include(match):
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand(_PRAGMA_ONCE.sub("", (CUDA_SOURCE_DIR / header).read_text()))
        return _LOCAL_INCLUDE.sub(include, text)

    return expand((CUDA_SOURCE_DIR / f"{name}.cu").read_text())


@dataclass(frozen=True)
class DeviceLimits:
    """The few properties of a GPU the launch plans depend on."""

    multiprocessors: int
    shared_per_block: int   # bytes, without opting in (48 KB)
    shared_optin: int       # bytes, the most a kernel may opt in to
    cooperative: bool       # cooperative launch supported


@dataclass(frozen=True)
class RecurrencePlan:
    """How the recurrence of one layer is launched (see ``fastlstm/kernels/lstm_core.cuh``).

    ``persistent``: one cooperative launch for all steps, else one launch per step.
    ``slice_units`` (JS): hidden units per block; ``chunk_rows`` (BC): batch rows per chunk;
    ``stage_rows`` (KC): input rows staged per pass; ``vector`` (V): weight columns per warp task.
    """

    persistent: bool
    slice_units: int
    chunk_rows: int
    stage_rows: int
    vector: int
    threads: int
    grid: tuple
    shared_bytes: int


THREADS = 256
_STAGE_ROWS = 128
#: blocks per multiprocessor the per-step grid is cut for (see :func:`plan_recurrence`)
STEP_BLOCKS_PER_SM = 4


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def plan_recurrence(direction, hidden, batch, itemsize, limits, persistent):
    """The launch plan of the forward or backward recurrence, or ``None``.

    ``None`` means the persistent kernel cannot run this shape here (its weight slice does not
    fit in shared memory, or a block would own more units than it has warps); the per-step
    plan (``persistent=False``) always exists.  The caller still checks co-residency with the
    occupancy API before a persistent launch.

    The per-step plan halves its batch chunk (down to 32 rows) while its grid has fewer than
    :data:`STEP_BLOCKS_PER_SM` blocks per multiprocessor.  A step is a chain of L2 round trips
    (staging h_{t-1} or dz_{t+1}, then the weights, a barrier between them); with one block of
    8 warps per SM, which one chunk of the whole batch gives at H=128 and B=128 (a (128, 1)
    grid), an SM has nothing to issue while its warps wait.  Smaller chunks put several blocks
    on each SM, each staging fewer rows, so more loads are in flight.  Fewer rows a block also
    mean fewer warp tasks, so each dot product's K is split over more warps (see
    ``lstm_core.cuh``): the rounding differs from that of a plan with bigger chunks, the
    accuracy does not.  The persistent plan keeps one block per SM: its grid must be
    co-resident.
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    warps = THREADS // 32
    blocks_wanted = limits.multiprocessors if persistent else 2 * limits.multiprocessors
    units = max(1, math.ceil(hidden / blocks_wanted))
    if units > warps:
        if persistent:
            return None
        units = warps
    forward = direction == "forward"
    ncol = 4 * units if forward else units
    vector = 4 if forward or units % 4 == 0 else 1
    k = hidden if forward else 4 * hidden
    # One warp task = `vector` columns x 32 rows; the tasks of a chunk must fit in the warps.
    chunk = min(_round_up(batch, 32), 32 * (warps * vector // ncol))
    stage = min(k, _STAGE_ROWS)
    partial = THREADS * vector

    def shared(chunk_rows, stage_rows):
        rows = k if persistent else stage_rows
        return (rows * ncol + stage_rows * chunk_rows + partial) * itemsize

    limit = limits.shared_optin
    while shared(chunk, stage) > limit and chunk > 32:
        chunk -= 32
    while shared(chunk, stage) > limit and stage > 8:
        stage //= 2
    if shared(chunk, stage) > limit:
        if persistent:
            return None
        raise ValueError(f"no per-step plan fits {limit} bytes of shared memory (H={hidden})")
    slices = math.ceil(hidden / units)
    if persistent:
        grid = (slices, 1)
    else:
        wanted = STEP_BLOCKS_PER_SM * limits.multiprocessors
        while chunk > 32 and slices * math.ceil(batch / chunk) < wanted:
            chunk = _round_up(chunk // 2, 32)  # less shared memory, so it still fits
        grid = (slices, math.ceil(batch / chunk))
    return RecurrencePlan(persistent, units, chunk, stage, vector, THREADS, grid,
                          shared(chunk, stage))


class StepSchedule:
    """The rows of a batch sorted by length and, for the kernels, where each step reads and writes.

    The rows are sorted longest first (stably), so the rows still active at time step ``t`` are
    a prefix, ``active[t]`` of them; the steps are packed, as PyTorch's ``PackedSequence``: time
    ``t``'s rows take the columns ``xcol[t] + b``, ``b < active[t]``, of ``total`` columns in
    all, and the buffers have ``columns`` of them (``total``, or more: the columns past
    ``total`` are then zeroed on the device, so that GEMMs over all of them stay exact).  A
    layer's state buffer (``h``, ``c``: ``B`` columns of initial state first) keeps time ``t``
    at ``scol[t] = B + xcol[t]`` (every step) or ``ring[t] = B + (t % 2) * B`` (two slots in
    turn, the top layer in inference).  See the top of ``fastlstm/kernels/lstm_core.cuh``.

    :attr:`data` (int32) holds what the kernels read, at the offsets of :attr:`offsets`
    (``name -> (start, shape)``); its size depends only on the batch, the steps and the
    columns, so a device buffer of one shape takes the schedule of any batch of that shape:

    ``active``, ``xcol``, ``scol``, ``ring`` : (T,)
    ``total`` : (1,), the packed columns
    ``last``, ``last_ring`` : (2, B), the state column of each row's last state, per
        direction (forward: its last valid step; reverse: step 0), in ``scol`` or ``ring``
    ``first`` : (2, B), the packed column of each row's first step, per direction
    ``prev`` : (2, columns), the state column each packed column's step starts from (the
        step before, or the initial state), per direction; -1 past ``total``
    ``x`` : (columns,), the row of ``x.reshape(B * T, I)`` (caller's order) of each packed
        column; -1 past ``total``
    ``row`` : (B,), the caller's row of each sorted row (the dropout masks' row index)

    Parameters
    ----------
    lengths : ndarray of int or None
        Each row's valid steps, in the caller's order (``None``: all ``steps``).
    batch, steps : int
    columns : int, optional
        Columns of the packed buffers; default ``total``.
    """

    def __init__(self, lengths, batch, steps, columns=None):
        B, T = int(batch), int(steps)
        if lengths is None:
            self.order = None
            self.lengths = np.full(B, T, np.int64)
        else:
            lengths = np.asarray(lengths, np.int64)
            self.order = np.argsort(-lengths, kind="stable")
            self.lengths = lengths[self.order]
        self.batch, self.steps = B, T
        active = (self.lengths[None, :] > np.arange(T)[:, None]).sum(axis=1)
        xcol = np.concatenate([[0], np.cumsum(active)[:-1]]).astype(np.int64)
        self.total = int(active.sum())
        self.columns = self.total if columns is None else int(columns)
        if self.columns < self.total:
            raise ValueError(f"{self.columns} columns cannot hold {self.total} packed steps")
        C, rows = self.columns, np.arange(B)
        scol, ring = B + xcol, B + (np.arange(T) % 2) * B
        last_t = self.lengths - 1
        # every packed column's time step and row
        t_of = np.repeat(np.arange(T), active)
        r_of = np.arange(self.total) - xcol[t_of]
        prev = np.full((2, C), -1, np.int64)
        prev[0, :self.total] = np.where(t_of > 0, scol[t_of - 1] + r_of, r_of)
        after = np.append(active, 0)[t_of + 1]  # rows active at t + 1
        prev[1, :self.total] = np.where(r_of < after, scol[np.minimum(t_of + 1, T - 1)] + r_of,
                                        r_of)
        x = np.full(C, -1, np.int64)
        original = rows if self.order is None else self.order
        x[:self.total] = original[r_of] * T + t_of
        self.active, self.xcol = active, xcol
        parts = dict(active=active, xcol=xcol, scol=scol, ring=ring,
                     total=np.array([self.total]),
                     last=np.stack([scol[last_t] + rows, scol[0] + rows]),
                     last_ring=np.stack([ring[last_t] + rows, ring[0] + rows]),
                     first=np.stack([rows, xcol[last_t] + rows]), prev=prev, x=x, row=original)
        self.offsets, start = {}, 0
        for name, value in parts.items():
            self.offsets[name] = (start, value.shape)
            start += value.size
        if B + C >= 2 ** 31:
            raise ValueError(f"a batch of {B} rows and {C} packed columns is too large")
        self.data = np.concatenate([v.ravel() for v in parts.values()]).astype(np.int32)

    @property
    def max_length(self):
        """Steps of the longest row: the steps the recurrences run."""
        return int(self.lengths[0]) if self.batch else 0

    def unpack(self):
        """(B * T,) int32: the packed column of each row of ``x.reshape(B * T, I)`` (caller's
        order), -1 past the row's length; for the gradient w.r.t. ``x``."""
        B, T = self.batch, self.steps
        position = np.arange(B) if self.order is None else np.argsort(self.order)
        lengths = self.lengths[position]  # in the caller's order
        t = np.arange(T)[None, :]
        cols = self.xcol[None, :] + position[:, None]
        return np.where(t < lengths[:, None], cols, -1).reshape(-1).astype(np.int32)


def step_schedule(lengths, batch, steps, columns=None):
    """The :class:`StepSchedule` of a batch (``lengths`` as :func:`~.base.check_lengths` gives)."""
    return StepSchedule(lengths, batch, steps, columns)


#: the settings the Adam kernel reads from its buffer of doubles, in the order of the buffer
#: (``AdamSetting`` in ``fastlstm/kernels/adam.cu``)
ADAM_SETTINGS = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_scale",
                 "clip_grad_norm")


def adam_settings(config, grad_scale=1.0):
    """The contents of the Adam kernel's settings buffer.

    Parameters
    ----------
    config : AdamConfig
    grad_scale : float, default=1.0
        Multiplies the gradient, before clipping.

    Returns
    -------
    ndarray of float64
        The values in the order of :data:`ADAM_SETTINGS`; no clipping is 0.  The kernel
        clips only where it computes the norm (in a training step).
    """
    values = dict(dataclasses.asdict(config), grad_scale=grad_scale)
    values["clip_grad_norm"] = values["clip_grad_norm"] or 0.0  # None, or positive
    return np.array([values[name] for name in ADAM_SETTINGS], np.float64)


#: the header of each mask of the dropout buffer, before its row keys (``Mask`` in
#: ``fastlstm/kernels/lstm_core.cuh``)
MASK_HEADER = ("threshold", "scale", "step_stride", "unit_offset")


def dropout_masks(dropout, spec, batch):
    """The CUDA kernels' dropout buffer for one batch: uint64, ``(L, D, 2, 4 + batch)``.

    ``[k, d, 0]`` is the mask between layers on direction ``d``'s units of layer ``k``'s
    output (every layer but the last), ``[k, d, 1]`` the recurrent mask of layer ``k``,
    direction ``d``.  Each holds :data:`MASK_HEADER` (the :func:`~fastlstm.dropout.threshold`,
    the kept value ``1 / (1 - p)`` as the bits of a float64, the units per time step: ``D*H``
    between layers, 0 for the recurrent mask, the same at every step; the first unit of the
    direction: ``d*H`` between layers) and then :func:`~fastlstm.dropout.row_keys` of the
    caller's rows ``0 .. batch - 1``.  The kernels hash unit ``t * step_stride + unit_offset +
    j`` of a row from its key as :func:`~fastlstm.dropout.unit_masks` does.  A mask that does
    not apply holds zeros (the kernels are not given it).  The keys are computed here, on the
    host, rather than from the seed on the device: ``B * 4L`` hashes, and the kernels then need
    no seed, only this buffer, which the host rewrites before every step.
    """
    L, D, H = spec.num_layers, spec.num_directions, spec.hidden_size
    out = np.zeros((L, D, 2, len(MASK_HEADER) + batch), np.uint64)
    between, recurrent = _dropout.kinds(dropout, spec)
    rows = np.arange(batch)

    def header(p, stride, offset):
        scale = np.array(1 / (1 - p), np.float64).view(np.uint64)
        return np.array([_dropout.threshold(p), scale, stride, offset], np.uint64)

    for k in range(L):
        for d in range(D):
            if between and k < L - 1:
                out[k, d, 0, :4] = header(dropout.p, D * H, d * H)
                out[k, d, 0, 4:] = _dropout.row_keys(dropout.seed, _dropout.between_stream(k),
                                                     rows)
            if recurrent:
                out[k, d, 1, :4] = header(dropout.recurrent_p, 0, 0)
                out[k, d, 1, 4:] = _dropout.row_keys(dropout.seed,
                                                     _dropout.recurrent_stream(k, d), rows)
    return out
