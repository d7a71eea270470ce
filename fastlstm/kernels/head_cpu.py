"""Numba kernels of the head: the linear layer and its gradients, softmax, the two losses
and their gradients.

The head's GEMM backwards to the LSTM (``doutputs @ W``) goes to BLAS.
"""

import math

from numba import njit

from ._fastmath import REASSOC


@njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
def linear(inputs, weight, bias, outputs):
    """``outputs = inputs @ weight.T + bias``, one dot product per output.

    Every row is computed by the same instructions, so a row's outputs do not
    depend on where it sits in the batch (BLAS treats the rows of a block's
    edge differently: predictions of shuffled samples differed by an ulp).
    """
    zero = inputs.dtype.type(0)
    for r in range(inputs.shape[0]):
        x = inputs[r]
        for o in range(weight.shape[0]):
            w = weight[o]
            total = zero
            for j in range(x.shape[0]):
                total += x[j] * w[j]
            outputs[r, o] = total + bias[o]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
def linear_gradients(doutputs, inputs, grad_weight, grad_bias):
    """The weight and bias gradients of :func:`linear`: ``doutputs^T @ inputs`` and the
    column sums of ``doutputs``, added over the rows in order."""
    grad_weight[:, :] = 0
    grad_bias[:] = 0
    for r in range(doutputs.shape[0]):
        x = inputs[r]
        for o in range(doutputs.shape[1]):
            d = doutputs[r, o]
            grad_bias[o] += d
            w = grad_weight[o]
            for j in range(x.shape[0]):
                w[j] += d * x[j]


@njit(cache=True, nogil=True, error_model="numpy")
def softmax(logits, probs):
    """Row-wise softmax of ``logits`` into ``probs`` (max-shifted: no overflow)."""
    for r in range(logits.shape[0]):
        top = logits[r, 0]
        for k in range(1, logits.shape[1]):
            top = max(top, logits[r, k])
        total = 0.0
        for k in range(logits.shape[1]):
            e = math.exp(logits[r, k] - top)
            probs[r, k] = e
            total += e
        for k in range(logits.shape[1]):
            probs[r, k] /= total


@njit(cache=True, nogil=True)
def cross_entropy(logits, y, weights, dlogits, weight_sum):
    """Softmax cross-entropy of these rows, each times its weight, summed and divided by
    ``weight_sum``.

    Writes the gradient w.r.t. ``logits`` into ``dlogits``.  ``y`` holds class
    indices; ``weights`` is one float64 per row, or ``None``: every row weighs 1.
    With ``weight_sum`` the sum of the batch's weights this is the weighted batch
    mean; passing the whole batch's sum serves a chunk of it.  Each row's terms are
    multiplied by its weight before the division, so weights of 1 (or none) and
    ``weight_sum = len(batch)`` give the plain mean bit for bit.  Returns the loss
    (float64 accumulation).
    """
    B, K = logits.shape
    total = 0.0
    for r in range(B):
        w = 1.0 if weights is None else weights[r]
        top = logits[r, 0]
        for k in range(1, K):
            top = max(top, logits[r, k])
        s = 0.0
        for k in range(K):
            s += math.exp(logits[r, k] - top)
        log_s = math.log(s)
        for k in range(K):
            dlogits[r, k] = w * math.exp(logits[r, k] - top - log_s) / weight_sum
        dlogits[r, y[r]] -= w / weight_sum
        total += w * (log_s - (logits[r, y[r]] - top))
    return total / weight_sum


@njit(cache=True, nogil=True)
def squared_error(outputs, y, weights, doutputs, weight_sum):
    """Half the squared error of these rows, each row's sum times its weight, divided by
    ``weight_sum`` times the outputs per row.

    Writes its gradient into ``doutputs``.  ``weights`` and ``weight_sum`` as in
    :func:`cross_entropy`: without weights and with ``weight_sum = len(batch)`` this is
    the mean over every element.
    """
    n = weight_sum * outputs.shape[1]
    total = 0.0
    for r in range(outputs.shape[0]):
        w = 1.0 if weights is None else weights[r]
        for k in range(outputs.shape[1]):
            d = outputs[r, k] - y[r, k]
            total += w * (d * d)
            doutputs[r, k] = w * d / n
    return 0.5 * total / n
