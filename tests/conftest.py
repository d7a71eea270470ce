import os

import numpy as np
import pytest

from fastlstm.model import ModelSpec
from fastlstm.backends import available_backends, get_backend

# The suite runs on the CPU backend's builtin choices, not on what this machine's calibration
# picks: which of two correct choices a timing picks must not decide a test's outcome (each
# choice is run against the reference in test_cpu_choices.py)
os.environ.setdefault("FASTLSTM_CPU_CHOICES", "builtin")

#: (batch, steps, inputs, hidden, layers, outputs): the edge cases and a few ordinary shapes
SMALL_SHAPES = [
    (1, 1, 1, 1, 1, 2),
    (3, 4, 2, 5, 1, 3),
    (2, 5, 3, 4, 2, 2),
    (4, 3, 1, 1, 3, 3),
    (1, 6, 4, 3, 3, 1),
    (5, 1, 3, 2, 2, 4),
]


def shape_id(shape):
    return "B{}-T{}-I{}-H{}-L{}-O{}".format(*shape)


def make_problem(shape, loss, dtype=np.float64, seed=0, initial_states=True, scale=1.0,
                 bidirectional=False):
    """Random parameters, inputs, targets and initial states for ``shape``."""
    B, T, I, H, L, O = shape
    rng = np.random.default_rng(seed)
    spec = ModelSpec(I, H, L, O, bidirectional)
    L *= spec.num_directions  # the initial states: one per layer and direction
    params = (spec.layout.init(rng, np.float64) * 2 * scale).astype(dtype)
    x = rng.standard_normal((B, T, I)).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, O, size=B)
    else:
        y = rng.standard_normal((B, O)).astype(dtype)
    h0 = c0 = None
    if initial_states:
        h0 = (0.5 * rng.standard_normal((L, B, H))).astype(dtype)
        c0 = (0.5 * rng.standard_normal((L, B, H))).astype(dtype)
    return spec, params, x, y, h0, c0


#: the kinds of lengths the variable-length tests use: the edge cases and a random mix
LENGTH_KINDS = ("random", "ones", "full", "one-short")


def make_lengths(batch, steps, kind, seed=0):
    """Lengths of ``kind`` for a batch: random (unsorted, the longest equal to ``steps``,
    so the batch is not just shorter), all 1, all ``steps``, or all but one ``steps``."""
    if kind == "random":
        lengths = np.random.default_rng(seed + 1).integers(1, steps + 1, batch)
        lengths[batch // 2] = steps
        return lengths
    if kind == "ones":
        return np.ones(batch, np.int64)
    lengths = np.full(batch, steps, np.int64)
    if kind == "one-short" and steps > 1:
        lengths[batch // 3] = steps - 1
    return lengths


def in_float64(*arrays):
    """``arrays`` in float64 (``None`` and integer labels unchanged).

    The reference always runs in float64 on the very values a float32 backend
    saw: computing the oracle in float32 too would compare two roundings of
    ill-conditioned quantities (saturated gates) instead of measuring the
    backend's error.
    """
    return [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
            for a in arrays]


def rel_err(actual, expected):
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected)) if expected.size else 0.0
    diff = np.max(np.abs(actual - expected)) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


@pytest.fixture(params=available_backends())
def backend(request):
    """Every backend that runs here (each is compared with the oracle, ``oracle.ORACLE``)."""
    return get_backend(request.param)
