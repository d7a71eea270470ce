"""Dropout between layers and recurrent dropout: what is dropped, and the masks' one definition.

Two kinds, both inverted (kept values are scaled by ``1 / (1 - p)``, so inference
runs the network as it is):

* between layers (``torch.nn.LSTM(dropout=p)``): the output of every layer but
  the last, as the layer above reads it: a mask per sample, time step and unit
  of ``[h_forward, h_reverse]``;
* recurrent (variational, as Keras's ``recurrent_dropout``): the previous hidden
  state ``h_{t-1}`` where the recurrence reads it (``h_{t-1} @ W_hh^T``), one mask
  per sample, layer and direction, the same at every step.  The layer's output
  (to the layer above, to the head) is not masked by it.

The masks are not drawn from a generator's stream but are a function of a seed
and of where they apply: ``(seed, mask, sample, step, unit)``, hashed by SplitMix64
(:func:`_mix`).  Every backend computes them where it needs them, inside its
kernels, from ``(seed, row)`` alone, so a batch's masks do not depend on how it
is cut into chunks or threads, and backward recomputes them instead of storing
them.  ``sample`` is a row's index in the batch as the caller passed it.  This
module is the plain statement of them (NumPy, for the oracle and the NumPy
backend); the kernels' copies are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dropout", "kinds", "row_keys", "unit_masks", "between_stream", "recurrent_stream"]

#: SplitMix64's increment: the odd 64-bit integer closest to 2^64 / golden ratio
GAMMA = 0x9E3779B97F4A7C15
_U64 = np.uint64


def _mix(z):
    """SplitMix64's finaliser (a bijection of uint64 with full avalanche), on a uint64 array."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def between_stream(k):
    """The mask number of the dropout on layer ``k``'s output."""
    return 2 * k


def recurrent_stream(k, d):
    """The mask number of the recurrent dropout of layer ``k``, direction ``d``."""
    return 2 * (2 * k + d) + 1


def row_keys(seed, stream, rows):
    """The key of each sample index in ``rows`` for mask ``stream``: uint64, ``(len(rows),)``;
    for an array of streams, ``(len(stream), len(rows))``.

    Counter ``stream * 2^32 + row`` of a SplitMix64 sequence started at ``seed``:
    distinct for every mask and row (rows below 2^32).
    """
    counter = (np.asarray(stream, np.uint64)[..., None] << _U64(32)) + \
        np.asarray(rows, np.uint64)
    with np.errstate(over="ignore"):
        return _mix(_U64(seed) + _U64(GAMMA) * (counter + _U64(1)))


def kinds(dropout, spec):
    """``(between, recurrent)``: which kinds of dropout ``dropout`` (a :class:`Dropout` or
    ``None``) applies to the network of ``spec``.

    A network of one layer has no output that another layer reads: dropout between
    layers does nothing there.  What a backend compiles in, allocates, or keys a captured
    CUDA graph by is these two, never the rates or the seed.
    """
    if not dropout:
        return False, False
    return dropout.p > 0 and spec.num_layers > 1, dropout.recurrent_p > 0


def threshold(p):
    """The integer a mask value's high 32 bits must reach to keep it: ``round(p * 2^32)``."""
    return int(round(p * 2 ** 32))


def unit_masks(keys, start, count, p, dtype):
    """The masks of units ``start`` to ``start + count - 1`` of each row key, ``(len(keys),
    count)``.

    Unit ``u`` of a row is kept where the high 32 bits of the ``u + 1``-th value of
    the SplitMix64 sequence started at the row's key reach :func:`threshold`; a
    kept unit holds ``1 / (1 - p)`` in ``dtype``, a dropped one 0.
    """
    units = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        values = _mix(np.asarray(keys, np.uint64)[:, None] + _U64(GAMMA) * units[None, :])
    keep = (values >> _U64(32)) >= _U64(threshold(p))
    dtype = np.dtype(dtype)
    return np.where(keep, dtype.type(1 / (1 - p)), dtype.type(0)).astype(dtype)


@dataclass(frozen=True)
class Dropout:
    """The dropout of one training step: rates and the seed of its masks.

    Parameters
    ----------
    p : float
        Probability of dropping each unit of a layer's output that the layer
        above reads (every layer but the last), ``0 <= p < 1``.
    recurrent_p : float
        Probability of dropping each unit of ``h_{t-1}`` where the recurrence
        reads it, one mask per sample, layer and direction, ``0 <= p < 1``.
    seed : int
        Seeds the masks, ``0 <= seed < 2^64``.
    """

    p: float = 0.0
    recurrent_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("p", "recurrent_p"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"dropout {name} must be in [0, 1), got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"the dropout seed must be in [0, 2^64), got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def __bool__(self):
        return self.p > 0 or self.recurrent_p > 0

    def between_masks(self, spec, rows, steps, dtype):
        """The masks on the outputs of layers ``0 .. L - 2`` for the samples ``rows``:
        a list of ``(len(rows), steps, num_directions * hidden)`` arrays (empty if ``p = 0``)."""
        if self.p == 0:
            return []
        width = spec.num_directions * spec.hidden_size
        return [unit_masks(row_keys(self.seed, between_stream(k), rows), 0, steps * width,
                           self.p, dtype).reshape(len(rows), steps, width)
                for k in range(spec.num_layers - 1)]

    def recurrent_masks(self, spec, rows, dtype):
        """The recurrent masks of the samples ``rows``: ``(num_layers * num_directions,
        len(rows), hidden)``, PyTorch's order of ``h_0`` (``None`` if ``recurrent_p = 0``)."""
        if self.recurrent_p == 0:
            return None
        D = spec.num_directions
        return np.stack([unit_masks(row_keys(self.seed, recurrent_stream(k, d), rows), 0,
                                    spec.hidden_size, self.recurrent_p, dtype)
                         for k in range(spec.num_layers) for d in range(D)])
