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
``precision="bfloat16"`` rounds the operands of the LSTM's GEMMs to bfloat16 as the
bfloat16 kernels do, by the rule of :mod:`fastlstm.precision` (each such product is
one call of :func:`_gemm` below); the sums stay in the arrays' dtype.
It is written from the equations on purpose, not on the network program of
:mod:`fastlstm.model` that every backend runs, so that it can check that program.

Parameters are passed as a ``{name: array}`` mapping with PyTorch's names (see
:class:`fastlstm.params.ParamLayout`); initial states ``h0`` and ``c0`` have
PyTorch's shape ``(num_layers * num_directions, batch, hidden)``.
"""

from __future__ import annotations

import numpy as np

from .precision import check_precision, round_bf16

__all__ = ["sigmoid", "forward", "backward", "loss", "loss_and_grad", "softmax", "adam", "LOSSES"]

LOSSES = ("cross_entropy", "squared_error")


def sigmoid(z):
    """Logistic function that never overflows: exp is only taken of -|z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def _num_layers(params):
    return sum(1 for name in params if name.startswith("lstm.weight_ih_l")
               and not name.endswith("_reverse"))


def _directions(params):
    return ("", "_reverse") if "lstm.weight_ih_l0_reverse" in params else ("",)


def _gemm(precision):
    """``a @ b`` for the LSTM's GEMMs in ``precision`` (:mod:`fastlstm.precision`)."""
    if check_precision(precision) == "bfloat16":
        return lambda a, b: round_bf16(a) @ round_bf16(b)
    return np.matmul


def forward(params, x, h0=None, c0=None, lengths=None, between_masks=None,
            recurrent_masks=None, precision="float32"):
    """Run the stacked LSTM and the head.

    A bidirectional network (parameters ``..._reverse``) runs a second recurrence
    per layer from each sample's last valid step back to step 0; the next layer
    reads both directions' hidden states side by side, and the head reads
    ``cat(h_n[-2], h_n[-1])``, PyTorch's last states of the top layer.
    ``lengths`` (one per sample, ``1 <= length <= steps``) makes each sample end
    there, as ``torch.nn.utils.rnn.pack_padded_sequence``: its later steps are
    not read, and its state stays as it was (here: masked, not skipped).
    ``h0`` and ``c0`` have PyTorch's shape ``(num_layers * directions, batch, hidden)``.

    Dropout is given by its masks (values ``0`` or ``1 / (1 - p)``, see
    :mod:`fastlstm.dropout`): ``between_masks[k]``, ``(batch, steps, directions *
    hidden)``, multiplies layer ``k``'s output where layer ``k + 1`` reads it (one
    per layer but the last); ``recurrent_masks[n]``, ``(batch, hidden)``, multiplies
    ``h_{t-1}`` where recurrence ``n = k * directions + d`` reads it, at every step.
    ``precision`` (``"float32"`` or ``"bfloat16"``, see :mod:`fastlstm.precision`) is
    kept in the cache for :func:`backward`.

    Returns
    -------
    outputs : ndarray of shape (batch, output_size)
        The head's outputs (logits for classification).
    cache : dict
        Everything :func:`backward` needs.
    """
    x = np.asarray(x)
    gemm = _gemm(precision)
    B, T, _ = x.shape
    L, dirs = _num_layers(params), _directions(params)
    valid = np.ones((B, T), bool) if lengths is None else \
        np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    layers = []
    inp = x
    for k in range(L):
        outs = []
        for d, suffix in enumerate(dirs):
            W_ih, W_hh = params[f"lstm.weight_ih_l{k}{suffix}"], params[f"lstm.weight_hh_l{k}{suffix}"]
            b = params[f"lstm.bias_ih_l{k}{suffix}"] + params[f"lstm.bias_hh_l{k}{suffix}"]
            H = W_hh.shape[1]
            n = k * len(dirs) + d
            h = np.zeros((B, H), x.dtype) if h0 is None else h0[n]
            c = np.zeros((B, H), x.dtype) if c0 is None else c0[n]
            steps = {}
            out = np.zeros((B, T, H), x.dtype)
            for t in (reversed(range(T)) if suffix else range(T)):
                m = valid[:, t, None]
                h_read = h if recurrent_masks is None else h * recurrent_masks[n]
                z = gemm(inp[:, t], W_ih.T) + gemm(h_read, W_hh.T) + b
                i = sigmoid(z[:, :H])
                f = sigmoid(z[:, H:2 * H])
                g = np.tanh(z[:, 2 * H:3 * H])
                o = sigmoid(z[:, 3 * H:])
                c_new = f * c + i * g
                h_new = o * np.tanh(c_new)
                steps[t] = dict(h_prev=h_read, c_prev=c, i=i, f=f, g=g, o=o, c=c_new, m=m)
                h, c = np.where(m, h_new, h), np.where(m, c_new, c)
                out[:, t] = np.where(m, h_new, 0)
            layers.append(dict(inp=inp, steps=steps, k=k, suffix=suffix, h_n=h,
                               h_mask=None if recurrent_masks is None else recurrent_masks[n]))
            outs.append(out)
        inp = np.concatenate(outs, axis=2)
        if between_masks and k < L - 1:
            inp = inp * between_masks[k]
    h_last = np.concatenate([layer["h_n"] for layer in layers[-len(dirs):]], axis=1)
    outputs = h_last @ params["head.weight"].T + params["head.bias"]
    return outputs, dict(layers=layers, h_last=h_last, directions=len(dirs), steps=T,
                         between_masks=between_masks, precision=precision)


def backward(params, cache, doutputs):
    """Backpropagate ``doutputs`` (gradient of the loss w.r.t. the outputs).

    Returns
    -------
    grads : dict
        Gradient of every parameter, same names and shapes as ``params``.
    dx : ndarray of shape (batch, steps, input_size)
    dh0, dc0 : ndarray of shape (num_layers * directions, batch, hidden)
    """
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    grads["head.weight"] = doutputs.T @ cache["h_last"]
    grads["head.bias"] = doutputs.sum(axis=0)

    layers, D, T = cache["layers"], cache["directions"], cache["steps"]
    gemm = _gemm(cache["precision"])
    dh0 = [None] * len(layers)
    dc0 = [None] * len(layers)
    d_last = np.split(doutputs @ params["head.weight"], D, axis=1)
    B, H = d_last[0].shape
    # the gradient w.r.t. each direction's hidden states, as the layer above read them
    d_out = [np.zeros((B, T, H), doutputs.dtype) for _ in range(D)]
    for n in reversed(range(len(layers))):
        layer = layers[n]
        k, suffix, steps = layer["k"], layer["suffix"], layer["steps"]
        d = n % D
        W_ih, W_hh = params[f"lstm.weight_ih_l{k}{suffix}"], params[f"lstm.weight_hh_l{k}{suffix}"]
        dW_ih, dW_hh = grads[f"lstm.weight_ih_l{k}{suffix}"], grads[f"lstm.weight_hh_l{k}{suffix}"]
        inp = layer["inp"]
        db = np.zeros(W_ih.shape[0], doutputs.dtype)
        if d == D - 1:
            d_inp = np.zeros_like(inp)
        dh_next = d_last[d] if k == len(layers) // D - 1 else np.zeros((B, H), doutputs.dtype)
        dc_next = np.zeros((B, H), doutputs.dtype)
        for t in (range(T) if suffix else reversed(range(T))):
            s = steps[t]
            m = s["m"]
            dh = np.where(m, d_out[d][:, t], 0) + dh_next
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
            dz = np.where(m, dz, 0)
            dW_ih += gemm(dz.T, inp[:, t])
            dW_hh += gemm(dz.T, s["h_prev"])
            db += dz.sum(axis=0)
            d_inp[:, t] += gemm(dz, W_ih)
            dh_prev = gemm(dz, W_hh)
            if layer["h_mask"] is not None:
                dh_prev = dh_prev * layer["h_mask"]
            dh_next = np.where(m, dh_prev, dh_next)
            dc_next = np.where(m, dc * s["f"], dc_next)
        grads[f"lstm.bias_ih_l{k}{suffix}"] = db
        grads[f"lstm.bias_hh_l{k}{suffix}"] = db.copy()
        dh0[n], dc0[n] = dh_next, dc_next
        if d == 0:
            if k > 0 and cache["between_masks"]:
                d_inp = d_inp * cache["between_masks"][k - 1]
            d_out = np.split(d_inp, D, axis=2) if k > 0 else d_out
            dx = d_inp
    return grads, dx, np.stack(dh0), np.stack(dc0)


def loss(outputs, y, kind, sample_weight=None):
    """Weighted mean loss over the batch and its gradient w.r.t. ``outputs``.

    Each sample's loss ``l_i`` is weighted by ``sample_weight`` (one non-negative
    weight per sample; ``None``: all 1), as scikit-learn weights samples: the loss is
    ``sum_i w_i l_i / sum_i w_i``.  Weights that sum to zero give a loss of 0 and a
    zero gradient: such a batch carries no loss.

    ``cross_entropy``: softmax cross-entropy, ``y`` holds class indices.
    ``squared_error``: ``l_i = sum((outputs_i - y_i) ** 2) / 2 / n_outputs``, so that
    without weights the loss is ``mean((outputs - y) ** 2) / 2`` over every element,
    as scikit-learn's ``MLPRegressor``; ``y`` has the shape of ``outputs``.
    """
    B, K = outputs.shape
    w = np.ones(B, outputs.dtype) if sample_weight is None else \
        np.asarray(sample_weight, dtype=outputs.dtype)
    if kind == "cross_entropy":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(B)
        per_sample = -log_p[rows, y]
        grad = np.exp(log_p)
        grad[rows, y] -= 1
    elif kind == "squared_error":
        diff = outputs - y
        per_sample = 0.5 * (diff * diff).sum(axis=1) / K
        grad = diff / K
    else:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    total = w.sum()
    if not total > 0:
        return outputs.dtype.type(0), np.zeros_like(outputs)
    return (w * per_sample).sum() / total, grad * (w / total)[:, None]


def loss_and_grad(params, x, y, kind, h0=None, c0=None, lengths=None, sample_weight=None,
                  between_masks=None, recurrent_masks=None, precision="float32"):
    """Forward, loss (weighted by ``sample_weight``, see :func:`loss`) and backward in one call
    (the other arguments as :func:`forward`).

    Returns ``(loss, grads, dx, dh0, dc0, outputs)``.
    """
    outputs, cache = forward(params, x, h0, c0, lengths, between_masks, recurrent_masks,
                             precision)
    value, doutputs = loss(outputs, y, kind, sample_weight)
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
