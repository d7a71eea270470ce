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

from ..kernels import CUDA_SOURCE_DIR

__all__ = ["CUDA_MODULES", "cuda_source", "DeviceLimits", "RecurrencePlan", "plan_recurrence",
           "ADAM_SETTINGS", "adam_settings"]

#: the CUDA source files, one RawModule each (the persistent kernels need cooperative groups)
CUDA_MODULES = ("lstm_step", "lstm_persistent", "head", "adam")

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


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def plan_recurrence(direction, hidden, batch, itemsize, limits, persistent):
    """The launch plan of the forward or backward recurrence, or ``None``.

    ``None`` means the persistent kernel cannot run this shape here (its weight slice does not
    fit in shared memory, or a block would own more units than it has warps); the per-step
    plan (``persistent=False``) always exists.  The caller still checks co-residency with the
    occupancy API before a persistent launch.
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
    grid = (slices, 1) if persistent else (slices, math.ceil(batch / chunk))
    return RecurrencePlan(persistent, units, chunk, stage, vector, THREADS, grid,
                          shared(chunk, stage))


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
