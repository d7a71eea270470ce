"""The NumPy backend: the network program over plain NumPy primitives.

Slow and simple, any floating dtype (float64 for gradient checks).  It runs the
same program as the fast backends (:mod:`fastlstm.model`) and is checked, like
them, against the oracle :mod:`fastlstm.reference`; it is the readable statement
of what each primitive computes.
"""

from __future__ import annotations

import numpy as np

from .. import model, reference
from .base import Backend, Gradients


class _NumpyOps:
    """The primitives on the whole batch, keeping what backward needs; gradients in ``grads``."""

    def __init__(self, spec, params):
        self.spec, self.layout = spec, spec.layout
        self.views = self.layout.views(params)
        self.grads = np.zeros_like(params)
        self.grad_views = self.layout.views(self.grads)
        self.layers = []
        L = spec.num_layers
        self.dh0, self.dc0 = [None] * L, [None] * L

    def inputs(self, x):
        return x

    def recurrence(self, k, seq, h0, c0):
        w_ih, w_hh, b_ih, b_hh = self.layout.layer(self.views, k)
        B, T, _ = seq.shape
        H = w_hh.shape[1]
        # the input projection of every step at once; only h @ W_hh^T is left in the loop
        xz = seq @ w_ih.T + (b_ih + b_hh)
        h = np.empty((T + 1, B, H), seq.dtype)
        c = np.empty((T + 1, B, H), seq.dtype)
        h[0] = 0 if h0 is None else h0
        c[0] = 0 if c0 is None else c0
        gates = np.empty((T, B, 4 * H), seq.dtype)
        for t in range(T):
            z = xz[:, t] + h[t] @ w_hh.T
            i, f, o = (reference.sigmoid(z[:, q * H:(q + 1) * H]) for q in (0, 1, 3))
            g = np.tanh(z[:, 2 * H:3 * H])
            gates[t] = np.concatenate([i, f, g, o], axis=1)
            c[t + 1] = f * c[t] + i * g
            h[t + 1] = o * np.tanh(c[t + 1])
        self.layers.append(dict(inp=seq, h=h, c=c, gates=gates))
        return h[1:].transpose(1, 0, 2)

    def readout(self, seq):
        self.h_last = seq[:, -1]
        return self.h_last

    def head(self, h):
        return h @ self.views["head.weight"].T + self.views["head.bias"]

    def head_backward(self, doutputs):
        self.grad_views["head.weight"][...] = doutputs.T @ self.h_last
        self.grad_views["head.bias"][...] = doutputs.sum(axis=0)
        return doutputs @ self.views["head.weight"]

    def readout_backward(self, dh):
        top = self.layers[-1]["h"]
        dseq = np.zeros((dh.shape[0], top.shape[0] - 1, dh.shape[1]), dh.dtype)
        dseq[:, -1] = dh
        return dseq

    def recurrence_backward(self, k, dseq, input_grads):
        layer = self.layers[k]
        w_ih, w_hh = self.layout.layer(self.views, k)[:2]
        h, c, gates = layer["h"], layer["c"], layer["gates"]
        T, B, G = gates.shape
        H = G // 4
        dz = np.empty_like(gates)
        dh = np.zeros((B, H), gates.dtype)
        dc = np.zeros((B, H), gates.dtype)
        for t in reversed(range(T)):
            i, f, g, o = (gates[t, :, q * H:(q + 1) * H] for q in range(4))
            dh = dh + dseq[:, t]
            tc = np.tanh(c[t + 1])
            dc = dc + dh * o * (1 - tc * tc)
            dz[t] = np.concatenate([dc * g * i * (1 - i), dc * c[t] * f * (1 - f),
                                    dc * i * (1 - g * g), dh * tc * o * (1 - o)], axis=1)
            dh = dz[t] @ w_hh
            dc = dc * f
        self.dh0[k], self.dc0[k] = dh, dc
        # the weight gradients as one product over all steps
        dz2 = dz.reshape(T * B, G)
        inp = layer["inp"].transpose(1, 0, 2).reshape(T * B, -1)
        dw_ih, dw_hh, db_ih, db_hh = self.layout.layer(self.grad_views, k)
        dw_ih[...] = dz2.T @ inp
        dw_hh[...] = dz2.T @ h[:-1].reshape(T * B, H)
        db_ih[...] = dz2.sum(axis=0)
        db_hh[...] = db_ih
        return (dz @ w_ih).transpose(1, 0, 2) if input_grads else None


class ReferenceBackend(Backend):
    """Plain NumPy, any floating dtype."""

    name = "reference"

    def forward(self, spec, params, x, h0=None, c0=None, train=False):
        ops = _NumpyOps(spec, params)
        outputs = model.forward(ops, spec, np.asarray(x, dtype=params.dtype), h0, c0)
        return outputs, (ops if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        dx = model.backward(cache, spec, np.asarray(doutputs, dtype=params.dtype), input_grads)
        if input_grads:
            return Gradients(cache.grads, dx, np.stack(cache.dh0), np.stack(cache.dc0))
        return Gradients(cache.grads)

    def loss(self, outputs, y, kind):
        value, grad = reference.loss(outputs, y, kind)
        return float(value), grad

    def softmax(self, outputs):
        return reference.softmax(outputs)

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        state.step += 1
        reference.adam(params, grads, state.m, state.v, state.step, config.learning_rate,
                       config.beta1, config.beta2, config.eps, config.weight_decay, grad_scale)
