"""Plain NumPy LSTM forward and backpropagation through time: the project's oracle.

Written for clarity, not speed: batch-first arrays, one time step at a time, the
textbook equations with PyTorch's gate order (i, f, g, o)::

    z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh
    i, f, g, o = sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

A stack of such layers is followed by a linear head on the top layer's last
hidden state, trained with Adam.  Every other implementation is tested against
this module, and this module is tested against central finite differences in
float64.  It works in whatever floating dtype the parameters and inputs have.
It is written from the equations on purpose, not on the network program of
:mod:`fastlstm.model` that every backend runs, so that it can check that program.

Parameters are passed as a ``{name: array}`` mapping with PyTorch's names (see
:class:`fastlstm.params.ParamLayout`); initial states ``h0`` and ``c0`` have
PyTorch's shape ``(num_layers, batch, hidden)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sigmoid", "forward", "backward", "loss", "loss_and_grad", "softmax", "adam", "LOSSES"]

LOSSES = ("cross_entropy", "squared_error")


def sigmoid(z):
    """Logistic function that never overflows: exp is only taken of -|z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _num_layers(params):
    return sum(1 for name in params if name.startswith("lstm.weight_ih_l"))


def forward(params, x, h0=None, c0=None):
    """Run the stacked LSTM and the head.

    Returns
    -------
    outputs : ndarray of shape (batch, output_size)
        The head's outputs (logits for classification).
    cache : dict
        Everything :func:`backward` needs.
    """
    x = np.asarray(x)
    B, T, _ = x.shape
    L = _num_layers(params)
    layers = []
    inp = x
    for k in range(L):
        W_ih, W_hh = params[f"lstm.weight_ih_l{k}"], params[f"lstm.weight_hh_l{k}"]
        b = params[f"lstm.bias_ih_l{k}"] + params[f"lstm.bias_hh_l{k}"]
        H = W_hh.shape[1]
        h = np.zeros((B, H), x.dtype) if h0 is None else h0[k]
        c = np.zeros((B, H), x.dtype) if c0 is None else c0[k]
        steps = []
        hs = []
        for t in range(T):
            z = inp[:, t] @ W_ih.T + h @ W_hh.T + b
            i = sigmoid(z[:, :H])
            f = sigmoid(z[:, H:2 * H])
            g = np.tanh(z[:, 2 * H:3 * H])
            o = sigmoid(z[:, 3 * H:])
            c_new = f * c + i * g
            h_new = o * np.tanh(c_new)
            steps.append(dict(h_prev=h, c_prev=c, i=i, f=f, g=g, o=o, c=c_new))
            h, c = h_new, c_new
            hs.append(h)
        layers.append(dict(inp=inp, steps=steps))
        inp = np.stack(hs, axis=1)
    h_last = inp[:, -1]
    outputs = h_last @ params["head.weight"].T + params["head.bias"]
    return outputs, dict(layers=layers, h_last=h_last)


def backward(params, cache, doutputs):
    """Backpropagate ``doutputs`` (gradient of the loss w.r.t. the outputs).

    Returns
    -------
    grads : dict
        Gradient of every parameter, same names and shapes as ``params``.
    dx : ndarray of shape (batch, steps, input_size)
    dh0, dc0 : ndarray of shape (num_layers, batch, hidden)
    """
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    grads["head.weight"] = doutputs.T @ cache["h_last"]
    grads["head.bias"] = doutputs.sum(axis=0)

    layers = cache["layers"]
    L = len(layers)
    dh0 = [None] * L
    dc0 = [None] * L
    # Gradient w.r.t. every hidden state the layer emitted: from the head for the top layer.
    top = layers[-1]["steps"]
    d_out = np.zeros((doutputs.shape[0], len(top), top[0]["c"].shape[1]), doutputs.dtype)
    d_out[:, -1] = doutputs @ params["head.weight"]
    for k in reversed(range(L)):
        W_ih, W_hh = params[f"lstm.weight_ih_l{k}"], params[f"lstm.weight_hh_l{k}"]
        inp, steps = layers[k]["inp"], layers[k]["steps"]
        dW_ih, dW_hh = grads[f"lstm.weight_ih_l{k}"], grads[f"lstm.weight_hh_l{k}"]
        db = np.zeros(W_ih.shape[0], doutputs.dtype)
        d_inp = np.zeros_like(inp)
        dh_next = np.zeros_like(steps[0]["c"])
        dc_next = np.zeros_like(steps[0]["c"])
        for t in reversed(range(len(steps))):
            s = steps[t]
            dh = d_out[:, t] + dh_next
            tc = np.tanh(s["c"])
            do = dh * tc
            dc = dc_next + dh * s["o"] * (1 - tc * tc)
            di = dc * s["g"]
            dg = dc * s["i"]
            df = dc * s["c_prev"]
            dz = np.concatenate([di * s["i"] * (1 - s["i"]),
                                 df * s["f"] * (1 - s["f"]),
                                 dg * (1 - s["g"] * s["g"]),
                                 do * s["o"] * (1 - s["o"])], axis=1)
            dW_ih += dz.T @ inp[:, t]
            dW_hh += dz.T @ s["h_prev"]
            db += dz.sum(axis=0)
            d_inp[:, t] = dz @ W_ih
            dh_next = dz @ W_hh
            dc_next = dc * s["f"]
        grads[f"lstm.bias_ih_l{k}"] = db
        grads[f"lstm.bias_hh_l{k}"] = db.copy()
        dh0[k], dc0[k] = dh_next, dc_next
        d_out = d_inp
    return grads, d_out, np.stack(dh0), np.stack(dc0)


def loss(outputs, y, kind):
    """Mean loss over the batch and its gradient w.r.t. ``outputs``.

    ``cross_entropy``: softmax cross-entropy, ``y`` holds class indices.
    ``squared_error``: ``mean((outputs - y) ** 2) / 2`` over every element, as
    scikit-learn's ``MLPRegressor``; ``y`` has the shape of ``outputs``.
    """
    B = outputs.shape[0]
    if kind == "cross_entropy":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(B)
        value = -log_p[rows, y].mean()
        grad = np.exp(log_p)
        grad[rows, y] -= 1
        return value, grad / B
    if kind == "squared_error":
        diff = outputs - y
        return 0.5 * np.mean(diff * diff), diff / diff.size
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")


def loss_and_grad(params, x, y, kind, h0=None, c0=None):
    """Forward, loss and backward in one call.

    Returns ``(loss, grads, dx, dh0, dc0, outputs)``.
    """
    outputs, cache = forward(params, x, h0, c0)
    value, doutputs = loss(outputs, y, kind)
    grads, dx, dh0, dc0 = backward(params, cache, doutputs)
    return value, grads, dx, dh0, dc0, outputs


def softmax(outputs):
    """Row-wise softmax."""
    e = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def adam(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay=0.0, grad_scale=1.0):
    """Adam update number ``step`` (counted from 1) of ``params``, ``m`` and ``v`` in place.

    As ``torch.optim.Adam`` with L2 ``weight_decay``; the gradient used is
    ``grad_scale * grads + weight_decay * params``.
    """
    g = grad_scale * grads + weight_decay * params
    m[...] = beta1 * m + (1 - beta1) * g
    v[...] = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    params -= lr * m_hat / (np.sqrt(v_hat) + eps)
