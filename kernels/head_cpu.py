"""Numba kernels of the head: bias, softmax, and the two losses with their gradients.

The head's GEMMs (``h_T @ W^T`` forwards, two small ones backwards) go to BLAS.
"""

import math

from numba import njit


@njit(cache=True)
def add_bias(outputs, bias):
    """``outputs += bias`` row by row, in place."""
    for r in range(outputs.shape[0]):
        for k in range(outputs.shape[1]):
            outputs[r, k] += bias[k]


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


@njit(cache=True)
def cross_entropy(logits, y, dlogits):
    """Mean softmax cross-entropy; writes its gradient w.r.t. ``logits`` into ``dlogits``.

    ``y`` holds class indices.  Returns the loss (float64 accumulation).
    """
    B, K = logits.shape
    total = 0.0
    for r in range(B):
        top = logits[r, 0]
        for k in range(1, K):
            top = max(top, logits[r, k])
        s = 0.0
        for k in range(K):
            s += math.exp(logits[r, k] - top)
        log_s = math.log(s)
        for k in range(K):
            dlogits[r, k] = math.exp(logits[r, k] - top - log_s) / B
        dlogits[r, y[r]] -= 1.0 / B
        total += log_s - (logits[r, y[r]] - top)
    return total / B


@njit(cache=True)
def squared_error(outputs, y, doutputs):
    """``mean((outputs - y) ** 2) / 2`` over every element; writes its gradient into ``doutputs``."""
    n = outputs.size
    total = 0.0
    for r in range(outputs.shape[0]):
        for k in range(outputs.shape[1]):
            d = outputs[r, k] - y[r, k]
            total += d * d
            doutputs[r, k] = d / n
    return 0.5 * total / n
