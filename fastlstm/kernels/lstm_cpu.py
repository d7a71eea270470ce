"""Numba kernels of the LSTM recurrence of one layer over one chunk of batch rows.

The CPU backend splits a batch into chunks of rows and runs the chunks on
separate threads, each with single-threaded BLAS: the rows of an LSTM never
interact, so no thread waits for another inside the time loop.

Per time step the input and the previous hidden state sit side by side in one
row ``xh[t] = [x_t, h_{t-1}]``, so one GEMM against ``[W_ih, W_hh]^T`` gives all
four gate pre-activations (no separate input projection is written to memory
and read back); then one fused pass computes the gates and the cell, and a
second one the hidden state, with the float32 non-linearities of
:mod:`.activations_cpu`, which vectorise.  (Two passes, because one iteration
of a single pass is a chain of two exp-divide sequences too long for the
out-of-order window to overlap enough iterations: inference ran faster split;
``python benchmarks/forward_backward.py`` times it.)  Backwards, one fused
pass per step gives the gradient of the pre-activations and accumulates the
bias gradient; the weight gradients are then ONE GEMM over all steps,
``xh^T @ dz``, by the caller.  The step GEMMs are :func:`.gemm_cpu.gemm` or
BLAS (``blocked``).

Shapes: ``R`` rows in the chunk, ``T`` steps, ``I`` inputs, ``H`` hidden units,
``G = 4H`` gates (order i, f, g, o), ``K = I + H``.
"""

import numpy as np
from numba import njit

from ._fastmath import NO_REASSOC
from .activations_cpu import sigmoid, tanh
from .gemm_cpu import matmul

_ONE = np.float32(1.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, z, h0_zero, blocked):
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
        ``xh[0, :, I:]`` holds ``h0`` on entry (unless ``h0_zero``).  Row ``xh[t]`` receives
        ``[x_t, h_{t-1}]``.  With ``S = T + 1`` every step is kept (training:
        the weight gradients need them all); with ``S = 2`` the slots are used
        in turn and ``h_T`` ends in ``xh[T % 2, :, I:]``.
    c : (S, R, H) array
        Cell states, ``c[0]`` holds ``c0`` on entry; slots as ``xh``.
    gates : (T, R, G) array or None
        Output: the gate activations of every step (training), or None
        (inference: the gate pass then stores only ``c``, ``h`` and the output
        gate, over ``z``, and runs faster for it; timed beside training by
        ``python benchmarks/microbench.py --ops forward-train forward-infer``).
    hseq : (R, T, H) or (R, 0, H) array
        Output: the hidden state of every step, batch-major (the input of the
        layer above), or nothing.
    z : (R, G) array
        Scratch: the GEMM's output.
    h0_zero : bool
        ``h0`` is zero: the first step's GEMM then takes the input part only, and
        ``xh[0, :, I:]`` is not read (nor need it be filled).
    blocked : bool
        Step GEMMs by :func:`.gemm_cpu.gemm` (else BLAS).
    """
    R, T, I = x.shape
    S, _, K = xh.shape
    H = K - I
    keep_h = hseq.shape[1] > 0
    bi, bf, bg, bo = bias[:H], bias[H:2 * H], bias[2 * H:3 * H], bias[3 * H:]
    for t in range(T):
        cur = xh[t % S]
        nxt = xh[(t + 1) % S]
        for r in range(R):
            cur[r, :I] = x[r, t]
        if t == 0 and h0_zero:
            matmul(np.ascontiguousarray(x[:, 0]), w_cat_t[:I], z, blocked)
        else:
            matmul(cur, w_cat_t, z, blocked)
        if gates is not None:  # a branch Numba drops when compiling for None
            gt = gates[t]
        for r in range(R):
            # 1-D views per row: indexing them vectorises, 2-D indexing does not
            zr = z[r]
            zi, zf, zg, zo = zr[:H], zr[H:2 * H], zr[2 * H:3 * H], zr[3 * H:]
            go = zo  # the output gate, kept for the second pass: over its input in inference
            if gates is not None:
                gr = gt[r]
                gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
            c_prev, c_new, h_new = c[t % S, r], c[(t + 1) % S, r], nxt[r, I:]
            for j in range(H):
                a_i = sigmoid(zi[j] + bi[j])
                a_f = sigmoid(zf[j] + bf[j])
                a_g = tanh(zg[j] + bg[j])
                go[j] = sigmoid(zo[j] + bo[j])
                if gates is not None:
                    gi[j] = a_i
                    gf[j] = a_f
                    gg[j] = a_g
                c_new[j] = a_f * c_prev[j] + a_i * a_g
            for j in range(H):
                h_new[j] = go[j] * tanh(c_new[j])
            if keep_h:
                hseq[r, t] = h_new


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def backward_layer(gates, c, w_hh, dh_seq, dz, dh, dc, db, need_dh0, blocked):
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
    blocked : bool
        Step GEMMs by :func:`.gemm_cpu.gemm` (else BLAS).
    """
    T, R, G = gates.shape
    H = G // 4
    has_seq = dh_seq.shape[0] > 0
    for t in range(T - 1, -1, -1):
        for r in range(R):
            gr, dzr = gates[t, r], dz[t, r]
            gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
            d_i, d_f, d_g, d_o = dzr[:H], dzr[H:2 * H], dzr[2 * H:3 * H], dzr[3 * H:]
            c_new, c_prev, dh_r, dc_r = c[t + 1, r], c[t, r], dh[r], dc[r]
            if has_seq:
                seq = dh_seq[t, r]
                for j in range(H):
                    dh_r[j] += seq[j]
            for j in range(H):
                tc = tanh(c_new[j])
                grad_h = dh_r[j]
                grad_c = dc_r[j] + grad_h * go[j] * (_ONE - tc * tc)
                d_i[j] = grad_c * gg[j] * gi[j] * (_ONE - gi[j])
                d_f[j] = grad_c * c_prev[j] * gf[j] * (_ONE - gf[j])
                d_g[j] = grad_c * gi[j] * (_ONE - gg[j] * gg[j])
                d_o[j] = grad_h * tc * go[j] * (_ONE - go[j])
                dc_r[j] = grad_c * gf[j]
            # explicit loops: Numba's in-place array operators cost more than the loop itself
            for q in range(G):
                db[q] += dzr[q]
        if t > 0 or need_dh0:
            matmul(dz[t], w_hh, dh, blocked)
