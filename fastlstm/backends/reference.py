"""The NumPy reference as a backend: slow, simple, the oracle for the others."""

from __future__ import annotations

import numpy as np

from .. import reference
from .base import Backend, Gradients


class ReferenceBackend(Backend):
    """Plain NumPy, any floating dtype (float64 for gradient checks)."""

    name = "reference"

    def forward(self, layout, params, x, h0=None, c0=None, train=False):
        outputs, cache = reference.forward(layout.views(params), x, h0, c0)
        return outputs, (cache if train else None)

    def backward(self, layout, params, cache, doutputs, input_grads=False):
        grads, dx, dh0, dc0 = reference.backward(layout.views(params), cache, doutputs)
        flat = np.empty_like(params)
        views = layout.views(flat)
        for name, value in grads.items():
            views[name][...] = value
        if input_grads:
            return Gradients(flat, dx, dh0, dc0)
        return Gradients(flat)

    def loss(self, outputs, y, kind):
        value, grad = reference.loss(outputs, y, kind)
        return float(value), grad

    def softmax(self, outputs):
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)

    def adam_step(self, params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, grad_scale=1.0):
        state.step += 1
        g = grad_scale * grads + weight_decay * params
        state.m[...] = beta1 * state.m + (1 - beta1) * g
        state.v[...] = beta2 * state.v + (1 - beta2) * g * g
        m_hat = state.m / (1 - beta1 ** state.step)
        v_hat = state.v / (1 - beta2 ** state.step)
        params -= lr * m_hat / (np.sqrt(v_hat) + eps)
