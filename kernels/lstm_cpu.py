"""Numba kernels of the LSTM recurrence of one layer over one chunk of batch rows.

The CPU backend splits a batch into chunks of rows and runs the chunks on
separate threads, each with single-threaded BLAS: the rows of an LSTM never
interact, so no thread waits for another inside the time loop.

Per time step the input and the previous hidden state sit side by side in one
row ``xh[t] = [x_t, h_{t-1}]``, so one GEMM against ``[W_ih, W_hh]^T`` gives all
four gate pre-activations (no separate input projection is written to memory
and read back); then one fused pass computes the gates, the cell and the
hidden state, with the float32 non-linearities of :mod:`.activations_cpu`,
which vectorise.  Backwards, one fused pass per step gives the gradient of the
pre-activations and accumulates the bias gradient; the weight gradients are
then ONE GEMM over all steps, ``dz^T @ xh``, by the caller.

Shapes: ``R`` rows in the chunk, ``T`` steps, ``I`` inputs, ``H`` hidden units,
``G = 4H`` gates (order i, f, g, o), ``K = I + H``.
"""

import numpy as np
from numba import njit

from .activations_cpu import sigmoid, tanh

#: LLVM may reassociate and contract (FMA); NaN and infinities keep their meaning,
#: so a diverging step is still seen as non-finite.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_ONE = np.float32(1.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)
def forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, z):
    """Run one layer over all steps for one chunk of rows.

    Parameters
    ----------
    x : (R, T, I) array
        Input of the layer, batch-major.
    w_cat_t : (K, G) array
        ``[W_ih, W_hh]`` transposed.
    bias : (G,) array
        ``b_ih + b_hh``.
    xh : (S, R, K) array
        ``xh[0, :, I:]`` holds ``h0`` on entry.  Row ``xh[t]`` receives
        ``[x_t, h_{t-1}]``.  With ``S = T + 1`` every step is kept (training:
        the weight gradients need them all); with ``S = 2`` the slots are used
        in turn and ``h_T`` ends in ``xh[T % 2, :, I:]``.
    c : (S, R, H) array
        Cell states, ``c[0]`` holds ``c0`` on entry; slots as ``xh``.
    gates : (T, R, G) or (0, R, G) array
        Output: gate activations of every step (training), or nothing.
    hseq : (R, T, H) or (R, 0, H) array
        Output: the hidden state of every step, batch-major (the input of the
        layer above), or nothing.
    z : (R, G) array
        Scratch.
    """
    R, T, I = x.shape
    S, _, K = xh.shape
    H = K - I
    keep_gates = gates.shape[0] > 0
    keep_h = hseq.shape[1] > 0
    for t in range(T):
        cur = xh[t % S]
        nxt = xh[(t + 1) % S]
        c_prev = c[t % S]
        c_new = c[(t + 1) % S]
        for r in range(R):
            for i in range(I):
                cur[r, i] = x[r, t, i]
        np.dot(cur, w_cat_t, z)
        for r in range(R):
            zr = z[r]
            for j in range(H):
                gi = sigmoid(zr[j] + bias[j])
                gf = sigmoid(zr[H + j] + bias[H + j])
                gg = tanh(zr[2 * H + j] + bias[2 * H + j])
                go = sigmoid(zr[3 * H + j] + bias[3 * H + j])
                cell = gf * c_prev[r, j] + gi * gg
                hv = go * tanh(cell)
                c_new[r, j] = cell
                nxt[r, I + j] = hv
                if keep_gates:
                    gates[t, r, j] = gi
                    gates[t, r, H + j] = gf
                    gates[t, r, 2 * H + j] = gg
                    gates[t, r, 3 * H + j] = go
                if keep_h:
                    hseq[r, t, j] = hv


@njit(cache=True, nogil=True, error_model="numpy", fastmath=FASTMATH)
def backward_layer(gates, c, w_hh, dh_seq, dz, dh, dc, db, need_dh0):
    """Backpropagate through one layer over all steps for one chunk of rows.

    Parameters
    ----------
    gates : (T, R, G) array
        Gate activations saved by :func:`forward_layer`.
    c : (T + 1, R, H) array
        Cell states saved by :func:`forward_layer` (``c[0]`` initial).
    w_hh : (G, H) array
    dh_seq : (T, R, H) or (0, R, H) array
        Gradient w.r.t. each step's hidden state from the layer above (time-
        major), or nothing for the top layer, whose gradient comes in ``dh``.
    dz : (T, R, G) array
        Output: gradient w.r.t. the gate pre-activations of every step.
    dh, dc : (R, H) arrays
        On entry the gradients w.r.t. the last hidden and cell state.  On
        return ``dc`` holds the gradient w.r.t. ``c0``, and ``dh`` the one
        w.r.t. ``h0`` if ``need_dh0`` (else the last GEMM is skipped).
    db : (G,) array
        The bias gradient of these rows is ADDED to it.
    need_dh0 : bool
    """
    T, R, G = gates.shape
    H = G // 4
    has_seq = dh_seq.shape[0] > 0
    for t in range(T - 1, -1, -1):
        for r in range(R):
            gr = gates[t, r]
            dzr = dz[t, r]
            for j in range(H):
                grad_h = dh[r, j]
                if has_seq:
                    grad_h += dh_seq[t, r, j]
                gi = gr[j]
                gf = gr[H + j]
                gg = gr[2 * H + j]
                go = gr[3 * H + j]
                tc = tanh(c[t + 1, r, j])
                grad_c = dc[r, j] + grad_h * go * (_ONE - tc * tc)
                d_i = grad_c * gg * gi * (_ONE - gi)
                d_f = grad_c * c[t, r, j] * gf * (_ONE - gf)
                d_g = grad_c * gi * (_ONE - gg * gg)
                d_o = grad_h * tc * go * (_ONE - go)
                dzr[j] = d_i
                dzr[H + j] = d_f
                dzr[2 * H + j] = d_g
                dzr[3 * H + j] = d_o
                db[j] += d_i
                db[H + j] += d_f
                db[2 * H + j] += d_g
                db[3 * H + j] += d_o
                dc[r, j] = grad_c * gf
        if t > 0 or need_dh0:
            np.dot(dz[t], w_hh, dh)
