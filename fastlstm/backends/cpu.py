"""CPU backend: BLAS GEMMs around the Numba kernels of :mod:`fastlstm.kernels`.

Data flow of one training step (time-major inside, ``(T, B, ...)``):
input projection of all steps as one GEMM -> fused recurrence kernel -> head
GEMM -> loss kernel -> backward recurrence kernel -> weight gradients as one
GEMM each over all ``T * B`` rows -> Adam kernel over the flat buffer.
"""

from __future__ import annotations

import numpy as np

from ..kernels import adam_cpu, head_cpu, lstm_cpu
from .base import Backend, Gradients


class CPUBackend(Backend):
    """Numba kernels + BLAS, float32 or float64."""

    name = "cpu"

    def forward(self, layout, params, x, h0=None, c0=None, train=False):
        views = layout.views(params)
        B, T, _ = x.shape
        H, L = layout.hidden_size, layout.num_layers
        dtype = params.dtype
        inp = np.ascontiguousarray(x.transpose(1, 0, 2), dtype=dtype)
        z = np.empty((B, 4 * H), dtype)
        layers = []
        for k in range(L):
            w_ih, w_hh, b_ih, b_hh = layout.layer(views, k)
            xg = np.matmul(inp.reshape(T * B, -1), w_ih.T).reshape(T, B, 4 * H)
            keep_steps = train or k < L - 1
            slots = T + 1 if keep_steps else 2
            h = np.empty((slots, B, H), dtype)
            c = np.empty((slots, B, H), dtype)
            h[0] = 0 if h0 is None else h0[k]
            c[0] = 0 if c0 is None else c0[k]
            lstm_cpu.forward_recurrence(xg, w_hh.T, b_ih + b_hh, h, c, z)
            if train:
                layers.append((inp, xg, h, c))
            inp = h[1:]
        h_last = h[T % h.shape[0]]
        outputs = np.matmul(h_last, views["head.weight"].T)
        head_cpu.add_bias(outputs, views["head.bias"])
        cache = dict(layers=layers, h_last=h_last) if train else None
        return outputs, cache

    def backward(self, layout, params, cache, doutputs, input_grads=False):
        views = layout.views(params)
        grads = np.empty_like(params)
        gviews = layout.views(grads)
        h_last = cache["h_last"]
        np.matmul(doutputs.T, h_last, out=gviews["head.weight"])
        np.sum(doutputs, axis=0, out=gviews["head.bias"])
        dh = doutputs @ views["head.weight"]
        dc = np.zeros_like(dh)
        T, B, _ = cache["layers"][0][0].shape
        H = layout.hidden_size
        dh_seq = np.empty((0, B, H), params.dtype)
        dh0, dc0 = [], []
        for k in reversed(range(layout.num_layers)):
            w_ih, w_hh, _, _ = layout.layer(views, k)
            inp, gates, h, c = cache["layers"][k]
            dz = np.empty_like(gates)
            lstm_cpu.backward_recurrence(dh_seq, gates, c, w_hh, dz, dh, dc)
            dz2 = dz.reshape(T * B, 4 * H)
            np.matmul(dz2.T, inp.reshape(T * B, -1), out=gviews[f"lstm.weight_ih_l{k}"])
            np.matmul(dz2.T, h[:T].reshape(T * B, H), out=gviews[f"lstm.weight_hh_l{k}"])
            np.sum(dz2, axis=0, out=gviews[f"lstm.bias_ih_l{k}"])
            gviews[f"lstm.bias_hh_l{k}"][...] = gviews[f"lstm.bias_ih_l{k}"]
            dh0.append(dh)
            dc0.append(dc)
            if k > 0 or input_grads:
                dh_seq = np.matmul(dz2, w_ih).reshape(T, B, -1)
            dh = np.zeros_like(dh)
            dc = np.zeros_like(dc)
        if not input_grads:
            return Gradients(grads)
        dx = np.ascontiguousarray(dh_seq.transpose(1, 0, 2))
        return Gradients(grads, dx, np.stack(dh0[::-1]), np.stack(dc0[::-1]))

    def loss(self, outputs, y, kind):
        doutputs = np.empty_like(outputs)
        if kind == "cross_entropy":
            value = head_cpu.cross_entropy(outputs, np.asarray(y, dtype=np.intp), doutputs)
        elif kind == "squared_error":
            value = head_cpu.squared_error(outputs, np.asarray(y, dtype=outputs.dtype), doutputs)
        else:
            raise ValueError(f"unknown loss {kind!r}; expected 'cross_entropy' or 'squared_error'")
        return float(value), doutputs

    def softmax(self, outputs):
        probs = np.empty_like(outputs)
        head_cpu.softmax(outputs, probs)
        return probs

    def adam_step(self, params, grads, state, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, grad_scale=1.0):
        state.step += 1
        adam_cpu.adam_update(params, grads, state.m, state.v, float(lr), float(beta1),
                             float(beta2), float(eps), float(weight_decay),
                             float(grad_scale), state.step)
