"""Numba copies of the dropout masks of :mod:`fastlstm.dropout`, for the recurrence kernels.

:func:`unit_scale` is one mask value, computed where it is used (inside the gate
and gradient loops of :mod:`.lstm_cpu`), so the masks of dropout between layers
are never stored: backward recomputes them.  ``tests/test_dropout.py`` checks
these against :func:`fastlstm.dropout.unit_masks` bit for bit.
"""

import numpy as np
from numba import njit

from ..dropout import GAMMA

_GAMMA = np.uint64(GAMMA)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)


@njit(cache=True, inline="always")
def unit_scale(key, unit, threshold, scale):
    """The mask value of unit ``unit`` (counted from 0) of the row with ``key``: ``scale`` or 0.

    All arithmetic in uint64 (Numba would widen a mix of signed and unsigned to float).
    """
    z = key + _GAMMA * (np.uint64(unit) + np.uint64(1))
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return scale if (z >> _S32) >= threshold else scale - scale


@njit(cache=True, nogil=True)
def fill_masks(keys, threshold, scale, out):
    """``out[r, u]``: the mask value of unit ``u`` of row key ``keys[r]``."""
    for r in range(out.shape[0]):
        key = keys[r]
        row = out[r]
        for u in range(out.shape[1]):
            row[u] = unit_scale(key, u, threshold, scale)
