"""Numba kernels of the LSTM recurrence: the fused forward step and the backward step.

The input projection of all time steps and the weight gradients are single BLAS
GEMMs done by the caller (:mod:`fastlstm.backends.cpu`); these kernels run the
sequential part.  Per time step: one BLAS GEMM ``h_{t-1} @ W_hh^T`` (or
``dz_t @ W_hh`` backwards), then one fused pass over the batch (``prange``) for
all the pointwise math, so each element is read and written once.

Arrays are time-major: ``(steps, batch, features)``.
"""

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def sigmoid(z):
    """Logistic function that never overflows: exp is only taken of -|z|."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(cache=True, parallel=True)
def forward_recurrence(xg, w_hh_t, bias, h, c, z):
    """Run the recurrence of one layer over all time steps.

    Parameters
    ----------
    xg : (T, B, 4H) array
        On entry the input projection ``x_t @ W_ih^T`` (no bias); on return the
        gate activations ``i, f, g, o`` of every step, which backward needs.
    w_hh_t : (H, 4H) array
        ``W_hh`` transposed.
    bias : (4H,) array
        ``b_ih + b_hh``.
    h, c : (S, B, H) arrays
        ``h[0]``, ``c[0]`` hold the initial states.  With ``S = T + 1`` every
        step's states are kept (training, or a layer feeding another); with
        ``S = 2`` the two slots are used in turn and the last state ends up in
        slot ``T % 2`` (inference keeps nothing per step).
    z : (B, 4H) array
        Scratch for the recurrent GEMM.
    """
    T, B, G = xg.shape
    H = G // 4
    S = h.shape[0]
    for t in range(T):
        h_prev = h[t % S]
        c_prev = c[t % S]
        h_new = h[(t + 1) % S]
        c_new = c[(t + 1) % S]
        np.dot(h_prev, w_hh_t, z)
        for b in prange(B):
            for j in range(H):
                i = sigmoid(z[b, j] + xg[t, b, j] + bias[j])
                f = sigmoid(z[b, H + j] + xg[t, b, H + j] + bias[H + j])
                g = math.tanh(z[b, 2 * H + j] + xg[t, b, 2 * H + j] + bias[2 * H + j])
                o = sigmoid(z[b, 3 * H + j] + xg[t, b, 3 * H + j] + bias[3 * H + j])
                cell = f * c_prev[b, j] + i * g
                c_new[b, j] = cell
                h_new[b, j] = o * math.tanh(cell)
                xg[t, b, j] = i
                xg[t, b, H + j] = f
                xg[t, b, 2 * H + j] = g
                xg[t, b, 3 * H + j] = o


@njit(cache=True, parallel=True)
def backward_recurrence(dh_seq, gates, c, w_hh, dz, dh, dc):
    """Backpropagate through the recurrence of one layer.

    Parameters
    ----------
    dh_seq : (T, B, H) or (0, B, H) array
        Gradient w.r.t. each step's output from the layer above; an empty array
        for the top layer, whose only gradient (from the head) is passed in ``dh``.
    gates : (T, B, 4H) array
        Gate activations saved by :func:`forward_recurrence`.
    c : (T + 1, B, H) array
        Cell states saved by :func:`forward_recurrence` (``c[0]`` initial).
    w_hh : (4H, H) array
    dz : (T, B, 4H) array
        Output: gradient w.r.t. the gate pre-activations of every step; the
        caller turns it into weight gradients with one GEMM over all steps.
    dh, dc : (B, H) arrays
        On entry the gradients w.r.t. the last hidden and cell state; on return
        the gradients w.r.t. the initial states ``h0`` and ``c0``.
    """
    T, B, G = gates.shape
    H = G // 4
    has_seq = dh_seq.shape[0] > 0
    for t in range(T - 1, -1, -1):
        for b in prange(B):
            for j in range(H):
                grad_h = dh[b, j]
                if has_seq:
                    grad_h += dh_seq[t, b, j]
                i = gates[t, b, j]
                f = gates[t, b, H + j]
                g = gates[t, b, 2 * H + j]
                o = gates[t, b, 3 * H + j]
                tc = math.tanh(c[t + 1, b, j])
                grad_c = dc[b, j] + grad_h * o * (1.0 - tc * tc)
                dz[t, b, j] = grad_c * g * i * (1.0 - i)
                dz[t, b, H + j] = grad_c * c[t, b, j] * f * (1.0 - f)
                dz[t, b, 2 * H + j] = grad_c * i * (1.0 - g * g)
                dz[t, b, 3 * H + j] = grad_h * tc * o * (1.0 - o)
                dc[b, j] = grad_c * f
        np.dot(dz[t], w_hh, dh)
