"""The oracle, :mod:`fastlstm.reference`, behind the backend interface.

Every backend (the NumPy ``"reference"`` backend too) runs the network program of
:mod:`fastlstm.model`; the tests compare each with this adapter of the textbook
equations, which shares no composition with them.
"""

import numpy as np

from fastlstm import reference
from fastlstm.backends.base import Backend, Gradients


class Oracle(Backend):
    """:mod:`fastlstm.reference` with the methods of :class:`~fastlstm.backends.base.Backend`."""

    name = "oracle"

    def forward(self, spec, params, x, h0=None, c0=None, train=False, lengths=None):
        outputs, cache = reference.forward(spec.layout.views(params), x, h0, c0, lengths)
        return outputs, (cache if train else None)

    def backward(self, spec, params, cache, doutputs, input_grads=False):
        grads, dx, dh0, dc0 = reference.backward(spec.layout.views(params), cache, doutputs)
        flat = np.empty_like(params)
        views = spec.layout.views(flat)
        for name, value in grads.items():
            views[name][...] = value
        return Gradients(flat, dx, dh0, dc0) if input_grads else Gradients(flat)

    def loss(self, outputs, y, kind):
        value, grad = reference.loss(outputs, y, kind)
        return float(value), grad

    def softmax(self, outputs):
        return reference.softmax(outputs)

    def adam_step(self, params, grads, state, config, grad_scale=1.0):
        state.step += 1
        reference.adam(params, grads, state.m, state.v, state.step, config.learning_rate,
                       config.beta1, config.beta2, config.eps, config.weight_decay, grad_scale)


ORACLE = Oracle()
