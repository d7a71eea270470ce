"""The interface every backend implements (NumPy reference, Numba CPU, CUDA).

Arrays live in the backend's own memory (NumPy or CuPy).  A network is described by
a :class:`fastlstm.model.ModelSpec`; its parameters are ONE flat buffer laid out by
``spec.layout``; gradients come back in a buffer of the same layout, so the optimizer
is one pass over one buffer.  Inputs are batch-first ``(batch, steps, inputs)``;
initial states have PyTorch's shape ``(num_layers * num_directions, batch, hidden)``.  Every backend
runs the network program of :mod:`fastlstm.model` over its own primitives; tests and
benchmarks call these methods on every backend and compare against the oracle,
:mod:`fastlstm.reference`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run on this machine (the message says why)."""


@dataclass
class Gradients:
    """What :meth:`Backend.backward` returns.

    ``params`` has the layout of the parameter buffer.  ``x``, ``h0`` and ``c0``
    (gradients w.r.t. the input and the initial states) are ``None`` unless
    ``input_grads=True`` was asked for: training does not need them.
    """

    params: Any
    x: Any = None
    h0: Any = None
    c0: Any = None


@dataclass(frozen=True)
class AdamConfig:
    """The settings of an Adam step, as ``torch.optim.Adam`` names them, and clipping.

    Parameters
    ----------
    learning_rate : float
    beta1, beta2 : float
        Decay rates of the first and second moment estimates.
    eps : float
        Added to the denominator.
    weight_decay : float
        L2 penalty: ``weight_decay * params`` is added to the gradient.
    clip_grad_norm : float or None
        In :meth:`Backend.train_step`, the gradient is scaled down to this Euclidean
        norm where it is larger; ``None``: no clipping.
    """

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None

    def __post_init__(self):
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be positive, got {self.clip_grad_norm!r}")


@dataclass(frozen=True)
class Loss:
    """A loss of the head: its kernels carry its ``name`` on every backend."""

    name: str
    #: the targets are class indices (else values of the outputs' shape and dtype)
    class_targets: bool

    def target_dtype(self, dtype):
        """The dtype the targets take for outputs of ``dtype``."""
        return np.dtype(np.int64) if self.class_targets else np.dtype(dtype)


#: the losses every backend implements
LOSSES = {loss.name: loss for loss in (Loss("cross_entropy", class_targets=True),
                                       Loss("squared_error", class_targets=False))}


def get_loss(name):
    """The :class:`Loss` called ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None


def check_lengths(lengths, batch, steps):
    """``lengths`` as a host int64 array, checked, or ``None`` where every row has every step.

    Raises
    ------
    ValueError
        ``lengths`` is not one integer from 1 to ``steps`` per row.
    """
    if lengths is None or batch == 0:
        return None
    lengths = np.asarray(lengths)
    if (lengths.shape != (batch,) or lengths.dtype.kind not in "iu" or lengths.min() < 1
            or lengths.max() > steps):
        raise ValueError(f"lengths must be {batch} integers from 1 to {steps} (one per row), "
                         f"got {lengths!r}")
    return None if lengths.min() == steps else lengths.astype(np.int64)


def check_sample_weight(sample_weight, batch, xp=np):
    """``sample_weight`` as a contiguous float64 array of ``xp`` (one weight per row), and
    the sum of the weights; ``(None, batch)`` where there are none (every row weighs 1).

    The sum is in float64, so weights of all ones sum to ``batch`` exactly: a loss divided
    by it is the unweighted mean, bit for bit.  It is a host float for NumPy and ``None``
    otherwise: a device backend's loss kernel sums the weights itself, and nothing here
    launches a reduction whose result no one reads.

    Raises
    ------
    ValueError
        ``sample_weight`` is not one value per row.
    """
    if sample_weight is None:
        return None, batch
    weights = xp.ascontiguousarray(xp.asarray(sample_weight), dtype=xp.float64)
    if weights.shape != (batch,):
        raise ValueError(f"sample_weight must hold one weight per row of the batch, shape "
                         f"({batch},), got shape {weights.shape}")
    return weights, float(weights.sum()) if xp is np else None


@dataclass
class AdamState:
    """First and second moment buffers (layout of the parameters) and the step count."""

    m: Any
    v: Any
    step: int = 0


class Backend:
    """Base class: the methods a backend provides.  See the module docstring."""

    #: short name, as accepted by :func:`fastlstm.backends.get_backend`
    name = "abstract"
    #: the array module of this backend's memory (numpy or cupy)
    xp = np

    def asarray(self, a, dtype=None):
        """``a`` in this backend's memory (no copy where it already is)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a):
        """``a`` as a NumPy array."""
        return np.asarray(a)

    def initial_states(self, spec, params, x, h0, c0):
        """``h0`` and ``c0`` checked against ``spec`` and ``x`` and in the parameters' dtype
        (``None`` stays ``None``): the kernels index them without bounds checks.

        Raises
        ------
        ValueError
            A state is not ``(num_layers * num_directions, batch, hidden)``.
        """
        shape = (spec.num_layers * spec.num_directions, x.shape[0], spec.hidden_size)
        out = []
        for name, state in (("h0", h0), ("c0", c0)):
            if state is not None:
                state = self.xp.ascontiguousarray(self.xp.asarray(state), dtype=params.dtype)
                if state.shape != shape:
                    raise ValueError(f"{name} must have shape (num_layers * num_directions, "
                                     f"batch, hidden) = {shape}, got {state.shape}")
            out.append(state)
        return out

    def session(self):
        """A context for a run of many calls (a fit, a prediction in batches).

        Whatever each call would set up and tear down (the CPU backend: BLAS
        limited to one thread) is held once, from enter to exit.  Calls are
        correct without it; sessions may nest and overlap across threads.
        """
        return contextlib.nullcontext()

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None,
                dropout=None):
        """Run the network of ``spec`` on ``x`` of shape (batch, steps, inputs).

        ``lengths`` (a host array of ints, ``1 <= lengths <= steps``, or ``None``: all
        steps) ends each row there, as ``torch.nn.utils.rnn.pack_padded_sequence``:
        its later steps are neither read nor computed.  ``dropout`` (a
        :class:`fastlstm.dropout.Dropout`, used with ``train`` only) drops units with
        the masks :mod:`fastlstm.dropout` defines, rows numbered as in ``x``; the
        backward of that forward follows the same masks.

        Returns ``(outputs, cache)``: ``outputs`` of shape (batch, output_size);
        ``cache`` holds what :meth:`backward` needs when ``train`` is true, and
        is ``None`` otherwise (inference keeps nothing per step).
        """
        raise NotImplementedError

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        """Backpropagate ``doutputs`` through the head and the stack; returns :class:`Gradients`."""
        raise NotImplementedError

    def loss(self, outputs, y, kind, sample_weight=None):
        """``(loss, doutputs)``: mean loss over the batch and its gradient w.r.t. ``outputs``.

        ``kind`` names one of :data:`LOSSES`: ``"cross_entropy"`` (``y``: int class
        indices) or ``"squared_error"`` (``y``: targets of the shape of ``outputs``).
        ``sample_weight`` (an array of this backend, one non-negative weight per row, or
        ``None``: all 1) makes the loss the weighted mean ``sum_i w_i l_i / sum_i w_i``
        of the rows' losses ``l_i``, as :func:`fastlstm.reference.loss` defines them;
        weights of all ones give the unweighted results (bit for bit on the NumPy and CPU
        backends).  Weights that sum to zero give a loss of 0 and a zero gradient.
        The loss is a Python float on the CPU; a backend on a device may
        return a 0-d device array so that the caller decides when to synchronise.
        """
        raise NotImplementedError

    def softmax(self, outputs):
        """Row-wise softmax of ``outputs`` (class probabilities)."""
        raise NotImplementedError

    def adam_state(self, params):
        """Fresh :class:`AdamState` for ``params``."""
        return AdamState(self.xp.zeros_like(params), self.xp.zeros_like(params), 0)

    def grad_norm(self, grads):
        """Euclidean norm of the gradient buffer."""
        return float(self.xp.sqrt(self.xp.dot(grads, grads)))

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        """One Adam update of ``params`` in place, as ``torch.optim.Adam`` does it.

        ``config`` is an :class:`AdamConfig` (its ``clip_grad_norm`` is not used
        here).  The gradient used is ``grad_scale * grads + config.weight_decay *
        params`` (``grad_scale`` serves gradient-norm clipping without another
        pass).  ``state.step`` is incremented.
        """
        raise NotImplementedError

    def train_step(self, spec, params, state, x, y, loss, config, lengths=None,
                   sample_weight=None, dropout=None):
        """One minibatch step: forward, loss, backward, optional clipping, Adam, in place.

        ``loss`` names one of :data:`LOSSES`; ``config`` is an :class:`AdamConfig`;
        ``lengths`` and ``dropout`` as in :meth:`forward`; ``sample_weight`` weights the
        rows' losses as in :meth:`loss`.
        If the loss or the gradient is not finite, ``params`` and ``state`` are
        left untouched, so a diverging run never corrupts the weights.  So are they
        where the weights sum to zero: such a batch carries no loss (0 is returned)
        and no step is taken, not even one of Adam's momentum.  Returns the loss (a
        float here; a device backend may return a 0-d device array and keep the whole
        step on the device, e.g. as a replayed CUDA graph).
        """
        if sample_weight is not None and \
                not check_sample_weight(sample_weight, len(x), self.xp)[1] > 0:
            return 0.0  # a batch of no weight: no step
        outputs, cache = self.forward(spec, params, x, train=True, lengths=lengths,
                                      dropout=dropout)
        value, doutputs = self.loss(outputs, y, loss, sample_weight)
        if not math.isfinite(value):
            return value
        grads = self.backward(spec, params, cache, doutputs).params
        self._apply_gradients(params, grads, state, config)
        return value

    def _apply_gradients(self, params, grads, state, config):
        """The end of :meth:`train_step`: clip, then Adam, unless the gradient is not finite."""
        norm = self.grad_norm(grads)
        if not math.isfinite(norm):
            return
        scale = 1.0
        if config.clip_grad_norm is not None and norm > config.clip_grad_norm:
            scale = config.clip_grad_norm / norm
        self.adam_step(params, grads, state, config, scale)
