"""The NumPy backend: the network program over plain NumPy primitives.

Slow and simple, any floating dtype (float64 for gradient checks).  It runs the
same program as the fast backends (:mod:`fastlstm.model`) and is checked, like
them, against the oracle :mod:`fastlstm.reference`; it is the readable statement
of what each primitive computes.  Steps past a row's length are skipped: each
step computes the rows still active at it.
"""

from __future__ import annotations

import numpy as np

from .. import model, reference
from .base import Backend, Gradients, check_lengths, check_sample_weight


class _NumpyOps:
    """The primitives on the whole batch, keeping what backward needs; gradients in ``grads``.

    A sequence is ``(B, T, n)``, zero past each row's length; so is its gradient.
    ``dropout`` (a :class:`~fastlstm.dropout.Dropout` or ``None``) gives the masks, for
    the rows numbered as in the batch.
    """

    def __init__(self, spec, params, dropout=None):
        self.spec, self.layout = spec, spec.layout
        self.views = self.layout.views(params)
        self.grads = np.zeros_like(params)
        self.grad_views = self.layout.views(self.grads)
        self.runs = {}
        n = spec.num_layers * spec.num_directions
        self.dh0, self.dc0 = [None] * n, [None] * n
        self.dropout = dropout

    def inputs(self, x, lengths):
        B, T, _ = x.shape
        self.lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
        rows = np.arange(B)
        self.between, self.recurrent = [], None
        if self.dropout:
            self.between = self.dropout.between_masks(self.spec, rows, T, x.dtype)
            self.recurrent = self.dropout.recurrent_masks(self.spec, rows, x.dtype)
        return x

    def _h_mask(self, k, reverse):
        """The recurrent mask of layer ``k``'s direction, ``(B, H)``, or ``None``."""
        n = k * self.spec.num_directions + reverse
        return None if self.recurrent is None else self.recurrent[n]

    def _order(self, T, reverse):
        return reversed(range(T)) if reverse else range(T)

    def recurrence(self, k, seq, h0, c0, reverse):
        w_ih, w_hh, b_ih, b_hh = self.layout.layer(self.views, k, reverse)
        B, T, _ = seq.shape
        H = w_hh.shape[1]
        # the input projection of every step at once; only h @ W_hh^T is left in the loop
        xz = seq @ w_ih.T + (b_ih + b_hh)
        h = np.zeros((B, H), seq.dtype) if h0 is None else h0.copy()
        c = np.zeros((B, H), seq.dtype) if c0 is None else c0.copy()
        out = np.zeros((B, T, H), seq.dtype)
        steps = {}
        h_mask = self._h_mask(k, reverse)
        for t in self._order(T, reverse):
            rows = np.flatnonzero(self.lengths > t)  # the rows still active: the others skip
            h_read = h[rows] if h_mask is None else h[rows] * h_mask[rows]
            z = xz[rows, t] + h_read @ w_hh.T
            i, f, o = (reference.sigmoid(z[:, q * H:(q + 1) * H]) for q in (0, 1, 3))
            g = np.tanh(z[:, 2 * H:3 * H])
            steps[t] = dict(rows=rows, h_prev=h_read, c_prev=c[rows],
                            gates=np.concatenate([i, f, g, o], axis=1))
            c[rows] = f * c[rows] + i * g
            h[rows] = o * np.tanh(c[rows])
            steps[t]["c"] = c[rows]
            out[rows, t] = h[rows]
        self.runs[k, reverse] = dict(inp=seq, steps=steps, h_n=h)
        if self.between and k < self.spec.num_layers - 1:
            H0 = reverse * H  # this direction's units of the layer's output
            out = out * self.between[k][:, :, H0:H0 + H]
        return out

    def join(self, outs):
        return np.concatenate(outs, axis=2)

    def readout(self, outs):
        top = self.spec.num_layers - 1
        self.h_last = np.concatenate([self.runs[top, d == 1]["h_n"] for d in range(len(outs))],
                                     axis=1)
        return self.h_last

    def head(self, h):
        return h @ self.views["head.weight"].T + self.views["head.bias"]

    def head_backward(self, doutputs):
        self.grad_views["head.weight"][...] = doutputs.T @ self.h_last
        self.grad_views["head.bias"][...] = doutputs.sum(axis=0)
        return doutputs @ self.views["head.weight"]

    def readout_backward(self, dh):
        """Each direction's part of ``dh`` as the gradient of its last states: ``(B, H)``."""
        return np.split(dh, self.spec.num_directions, axis=1)

    def recurrence_backward(self, k, dseq, reverse, input_grads):
        run = self.runs[k, reverse]
        w_ih, w_hh = self.layout.layer(self.views, k, reverse)[:2]
        inp, steps = run["inp"], run["steps"]
        B, T, _ = inp.shape
        H = w_hh.shape[1]
        last = dseq.ndim == 2  # the top layer: the gradient of the last states
        if self.between and not last:  # the gradient of the output before its mask
            dseq = dseq * self.between[k][:, :, reverse * H:(reverse + 1) * H]
        h_mask = self._h_mask(k, reverse)
        dh = dseq.copy() if last else np.zeros((B, H), dseq.dtype)
        dc = np.zeros((B, H), dseq.dtype)
        dw_ih, dw_hh, db_ih, db_hh = self.layout.layer(self.grad_views, k, reverse)
        din = np.zeros_like(inp) if input_grads else None
        for t in reversed(list(self._order(T, reverse))):
            s = steps[t]
            rows = s["rows"]
            i, f, g, o = (s["gates"][:, q * H:(q + 1) * H] for q in range(4))
            dh_t = dh[rows] if last else dh[rows] + dseq[rows, t]
            tc = np.tanh(s["c"])
            dc_t = dc[rows] + dh_t * o * (1 - tc * tc)
            dz = np.concatenate([dc_t * g * i * (1 - i), dc_t * s["c_prev"] * f * (1 - f),
                                 dc_t * i * (1 - g * g), dh_t * tc * o * (1 - o)], axis=1)
            dw_ih += dz.T @ inp[rows, t]
            dw_hh += dz.T @ s["h_prev"]
            db_ih += dz.sum(axis=0)
            if input_grads:
                din[rows, t] = dz @ w_ih
            dh[rows] = dz @ w_hh if h_mask is None else dz @ w_hh * h_mask[rows]
            dc[rows] = dc_t * f
        db_hh[...] = db_ih
        n = k * self.spec.num_directions + reverse
        self.dh0[n], self.dc0[n] = dh, dc
        return din

    def join_backward(self, dins, parts):
        return np.split(sum(dins), parts, axis=2)


class ReferenceBackend(Backend):
    """Plain NumPy, any floating dtype."""

    name = "reference"

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None,
                dropout=None):
        ops = _NumpyOps(spec, params, dropout if train else None)
        x = np.asarray(x, dtype=params.dtype)
        h0, c0 = self.initial_states(spec, params, x, h0, c0)
        lengths = check_lengths(lengths, *x.shape[:2])
        outputs = model.forward(ops, spec, x, h0, c0, lengths)
        return outputs, (ops if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        dx = model.backward(cache, spec, np.asarray(doutputs, dtype=params.dtype), input_grads)
        if input_grads:
            return Gradients(cache.grads, dx, np.stack(cache.dh0), np.stack(cache.dc0))
        return Gradients(cache.grads)

    def loss(self, outputs, y, kind, sample_weight=None):
        weights, _ = check_sample_weight(sample_weight, len(outputs))
        value, grad = reference.loss(outputs, y, kind, weights)
        return float(value), grad

    def softmax(self, outputs):
        return reference.softmax(outputs)

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        state.step += 1
        reference.adam(params, grads, state.m, state.v, state.step, config.learning_rate,
                       config.beta1, config.beta2, config.eps, config.weight_decay, grad_scale)
