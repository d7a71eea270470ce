"""Numba kernels of the LSTM recurrence of one layer over one chunk of batch rows.

The CPU backend splits a batch into chunks of rows and runs the chunks on
separate threads, each with single-threaded BLAS: the rows of an LSTM never
interact, so no thread waits for another inside the time loop.

Per time step the input and the previous hidden state sit side by side in one
row ``[x_t, h_{t-1}]`` of ``xh``, so one GEMM against ``[W_ih, W_hh]^T`` gives all
four gate pre-activations (no separate input projection is written to memory
and read back); then one fused pass computes the gates and the cell, and a
second one the hidden state, with the float32 non-linearities of
:mod:`.activations_cpu`, which vectorise.  (Two passes, because one iteration
of a single pass is a chain of two exp-divide sequences too long for the
out-of-order window to overlap enough iterations: inference ran faster split;
``python benchmarks/forward_backward.py`` times it.)  Backwards, one fused
pass per step gives the gradient of the pre-activations and accumulates the
bias gradient; the weight gradients are then ONE GEMM over all steps,
``xh^T @ dz``, by the caller.  The step GEMMs are :func:`.gemm_cpu.gemm_panels` on
the weights packed once per call (``w_panels``), or BLAS, or in bfloat16
:func:`.gemm_bf16_cpu.gemm` where the caller passes the weights packed for it
(:func:`.gemm_bf16_cpu.matmul`: the same call site for all three).

Each layer kernel comes twice, the same code: ``forward_layer`` and
``forward_layer_full_width`` (``backward_layer`` likewise), the first with its loops
vectorised in 256-bit registers, the second at 512 bits, on targets with AVX-512
(:func:`._cpu_features.prefer_vector_bits`; elsewhere both are the same);
:func:`layer_kernels` picks by hidden size.

Shapes: ``R`` rows in the chunk, ``T`` steps, ``I`` inputs, ``H`` hidden units,
``G = 4H`` gates (order i, f, g, o), ``K = I + H``.
"""

import functools

import numpy as np
from numba import njit

from ._fastmath import NO_REASSOC
from .activations_cpu import sigmoid, tanh
from .dropout_cpu import unit_scale
from .gemm_bf16_cpu import matmul
from ._cpu_features import prefer_vector_bits

_ONE = np.float32(1.0)


@njit(inline="always")
def _forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, h_last, z, h_init, c_init, active,
                   slot, cslot, h0_zero, reverse, w_panels, h_mask, out_keys, out_drop, w16, a16):
    I = x.shape[2]
    K = xh.shape[1]
    H = K - I
    S = active.shape[0] - 1
    keep_h = hseq.shape[1] > 0
    masked_h = h_mask.shape[0] > 0
    drop_out = out_keys.shape[0] > 0
    threshold, scale, unit0, width = out_drop
    bi, bf, bg, bo = bias[:H], bias[H:2 * H], bias[2 * H:3 * H], bias[3 * H:]
    for s in range(S):
        t = S - 1 - s if reverse else s
        m = active[s]
        carried = min(m, active[s - 1]) if s > 0 else 0  # rows whose state comes from step s-1
        nxt_m = active[s + 1]
        cur = xh[slot[s]:slot[s] + m]
        for r in range(m):
            cur[r, :I] = x[r, t]
        first = s == 0 and h0_zero
        if not first:
            for r in range(carried, m):  # rows that start here
                hr = cur[r, I:]
                for j in range(H):
                    hr[j] = 0 if h0_zero else h_init[r, j]
                if masked_h and not h0_zero:
                    for j in range(H):
                        hr[j] *= h_mask[r, j]
        if first:
            # in bfloat16 the pair of rows I - 1, I of an odd I meets a zero of the padded x
            matmul(np.ascontiguousarray(x[:m, t]), w_cat_t[:I], w_panels[:, :I],
                   w16[:(I + 1) // 2], a16, z[:m])
        else:
            matmul(cur, w_cat_t, w_panels, w16, a16, z[:m])
        for r in range(m):
            # 1-D views per row: indexing them vectorises, 2-D indexing does not
            zr = z[r]
            zi, zf, zg, zo = zr[:H], zr[H:2 * H], zr[2 * H:3 * H], zr[3 * H:]
            go = zo  # the output gate, kept for the second pass: over its input in inference
            if gates is not None:  # a branch Numba drops when compiling for None
                gr = gates[slot[s] + r]
                gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
            c_prev = c[cslot[s] + r] if r < carried else c_init[r]
            c_new = c[cslot[s + 1] + r]
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
            h_new = xh[slot[s + 1] + r, I:] if r < nxt_m else h_last[r]
            for j in range(H):
                h_new[j] = go[j] * tanh(c_new[j])
            if keep_h:
                if drop_out:
                    hs, key, base = hseq[r, t], out_keys[r], t * width + unit0
                    for j in range(H):
                        hs[j] = h_new[j] * unit_scale(key, base + j, threshold, scale)
                else:
                    hseq[r, t] = h_new
            if masked_h and r < nxt_m:  # what the next step's GEMM reads
                hm = h_mask[r]
                for j in range(H):
                    h_new[j] *= hm[j]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, h_last, z, h_init, c_init, active, slot,
                  cslot, h0_zero, reverse, w_panels, h_mask, out_keys, out_drop, w16, a16):
    """Run one layer in one direction over all steps for one chunk of rows.

    The rows are sorted by length, longest first, so the rows still active at a
    step are a prefix of the chunk: each step computes only those (the others are
    skipped, not masked), and its buffers hold only those, packed (as PyTorch's
    ``PackedSequence``).  ``S = len(active) - 1`` steps are run, step ``s`` reading
    time step ``t = s`` (or ``S - 1 - s`` where ``reverse``: from each row's last
    valid step back to its first).

    Parameters
    ----------
    x : (R, T, I) array
        Input of the layer, batch-major (``T >= S``).
    w_cat_t : (K, G) array
        ``[W_ih, W_hh]`` transposed.
    bias : (G,) array
        ``b_ih + b_hh``.
    xh : (rows, K) array
        Row ``slot[s] + r`` receives ``[x_t, h_prev]`` of row ``r`` at step ``s``.
    c : (rows, H) array
        Row ``cslot[s + 1] + r`` receives the cell state of row ``r`` after step ``s``;
        ``cslot[s] + r`` is read back at step ``s`` for rows that were active at
        step ``s - 1``.  Training keeps every step (``slot`` and ``cslot`` pack the
        steps one after another); inference alternates between two slots of ``R``
        rows, ``slot[s] = cslot[s] = (s % 2) R``.
    gates : (rows, G) array or None
        Output: the gate activations of every step, rows as ``xh`` (training), or
        None (inference: the gate pass then stores only ``c``, ``h`` and the
        output gate, over ``z``, and runs faster for it; timed beside training by
        ``python benchmarks/microbench.py --ops forward-train forward-infer``).
    hseq : (R, T, H) or (R, 0, H) array
        Output: the hidden state of every valid step, batch-major (the input of
        the layer above), or nothing.
    h_last : (R, H) array
        Output: each row's hidden state after its last step.
    z : (R, G) array
        Scratch: the GEMM's output.
    h_init, c_init : (R, H) arrays
        The initial states a row starts from (``h_init`` is not read if ``h0_zero``).
    active : (S + 1,) int array
        Rows active at each step (``active[S] = 0``): falling where forward, rising
        where ``reverse``.
    slot, cslot : (S + 1,) int arrays
        Where each step's rows start in ``xh`` (and ``gates``) and in ``c``.
    h0_zero : bool
        ``h0`` is zero: the first step's GEMM then takes the input part only, and
        its ``h`` part of ``xh`` is neither written nor read.
    reverse : bool
    w_panels : (panel_count(G), K, NR) or (0, 0, NR) array
        ``w_cat_t`` packed by :func:`.gemm_cpu.pack_panels`: the step GEMMs by
        :func:`.gemm_cpu.gemm_panels`; no panels (:func:`.gemm_cpu.no_panels`): by BLAS.
    h_mask : (R, H) or (0, 0) array
        Recurrent dropout: ``h_{t-1}`` is read times this where the recurrence reads it
        (so ``xh`` holds the masked state, which the weight gradient then sees too);
        ``hseq`` and ``h_last`` hold the state itself.  No rows: no recurrent dropout.
    out_keys : (R,) or (0,) uint64 array
        Dropout on ``hseq`` (as the layer above reads it): each row's key of
        :func:`.dropout_cpu.unit_scale`; none: no dropout.
    out_drop : tuple
        ``(threshold, scale, unit0, width)`` of that dropout: a unit's number is
        ``t * width + unit0 + j`` (``width``: both directions' units of the output).
    w16, a16 : uint32 arrays
        bfloat16 step GEMMs: ``w_cat_t`` packed by :func:`.gemm_bf16_cpu.pack_panels`, and
        a scratch of ``(R, pairs(K))`` for ``xh``'s rows packed; both without rows (as
        :data:`.gemm_bf16_cpu.FLOAT32`): float32.

    Its loops are vectorised in 256-bit registers even where the target has 512-bit ones
    (:func:`forward_layer_full_width` uses those; :func:`layer_kernels` picks).
    """
    prefer_vector_bits(256)
    _forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, h_last, z, h_init, c_init, active,
                   slot, cslot, h0_zero, reverse, w_panels, h_mask, out_keys, out_drop, w16, a16)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def forward_layer_full_width(x, w_cat_t, bias, xh, c, gates, hseq, h_last, z, h_init, c_init,
                             active, slot, cslot, h0_zero, reverse, w_panels, h_mask, out_keys,
                             out_drop, w16, a16):
    """:func:`forward_layer` with its loops in 512-bit registers where the target has them
    (:func:`._cpu_features.prefer_vector_bits`): the same results, bit for bit."""
    prefer_vector_bits(512)
    _forward_layer(x, w_cat_t, bias, xh, c, gates, hseq, h_last, z, h_init, c_init, active,
                   slot, cslot, h0_zero, reverse, w_panels, h_mask, out_keys, out_drop, w16, a16)


@njit(inline="always")
def _backward_layer(gates, c, c_init, w_hh, dh_seq, dz, dh, dc, db, active, slot, cslot,
                    need_dh0, w_hh_panels, reverse, h_mask, out_keys, out_drop, w_hh16, a16):
    G = gates.shape[1]
    H = G // 4
    S = active.shape[0] - 1
    has_seq = dh_seq.shape[0] > 0
    masked_h = h_mask.shape[0] > 0
    drop_out = out_keys.shape[0] > 0
    threshold, scale, unit0, width = out_drop
    for s in range(S - 1, -1, -1):
        m = active[s]
        carried = min(m, active[s - 1]) if s > 0 else 0
        for r in range(m):
            row = slot[s] + r
            gr, dzr = gates[row], dz[row]
            gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
            d_i, d_f, d_g, d_o = dzr[:H], dzr[H:2 * H], dzr[2 * H:3 * H], dzr[3 * H:]
            c_new = c[cslot[s + 1] + r]
            c_prev = c[cslot[s] + r] if r < carried else c_init[r]
            dh_r, dc_r = dh[r], dc[r]
            if has_seq:
                seq = dh_seq[row]
                if drop_out:
                    t = S - 1 - s if reverse else s
                    key, base = out_keys[r], t * width + unit0
                    for j in range(H):
                        dh_r[j] += seq[j] * unit_scale(key, base + j, threshold, scale)
                else:
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
        # the gradient w.r.t. the hidden state each row had before this step: for the rows
        # that came from step s - 1, and for the rows that started here only if asked
        n = m if need_dh0 else carried
        if n > 0:
            matmul(dz[slot[s]:slot[s] + n], w_hh, w_hh_panels, w_hh16, a16, dh[:n])
            if masked_h:
                for r in range(n):
                    dh_r, hm = dh[r], h_mask[r]
                    for j in range(H):
                        dh_r[j] *= hm[j]


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def backward_layer(gates, c, c_init, w_hh, dh_seq, dz, dh, dc, db, active, slot, cslot,
                   need_dh0, w_hh_panels, reverse, h_mask, out_keys, out_drop, w_hh16, a16):
    """Backpropagate through one layer in one direction for one chunk of rows.

    The steps, rows and buffers are those of :func:`forward_layer`, walked back.

    Parameters
    ----------
    gates : (rows, G) array
        Gate activations saved by :func:`forward_layer`.
    c : (rows, H) array
        Cell states saved by :func:`forward_layer`.
    c_init : (R, H) array
        The initial cell states.
    w_hh : (G, H) array
    dh_seq : (rows, H) or (0, H) array
        Gradient w.r.t. each step's hidden state from the layer above, rows as
        ``gates``, or nothing for the top layer, whose gradient comes in ``dh``.
    dz : (rows, G) array
        Output: gradient w.r.t. the gate pre-activations of every step, rows as ``gates``.
    dh, dc : (R, H) arrays
        On entry the gradients w.r.t. each row's last hidden and cell state.  On
        return ``dc`` holds the gradient w.r.t. each row's initial cell state,
        and ``dh`` the one w.r.t. its initial hidden state if ``need_dh0`` (else
        those products are skipped).
    db : (G,) array
        The bias gradient of these rows is ADDED to it.
    active, slot, cslot : (S + 1,) int arrays
        As in :func:`forward_layer`.
    need_dh0 : bool
    w_hh_panels : (panel_count(H), G, NR) or (0, 0, NR) array
        As ``w_panels`` of :func:`forward_layer`, for ``w_hh``.
    reverse, h_mask, out_keys, out_drop
        As in :func:`forward_layer`: ``dh_seq`` is the gradient w.r.t. the masked
        output, ``dz @ W_hh`` the one w.r.t. the masked ``h_{t-1}``.
    w_hh16, a16 : uint32 arrays
        As ``w16`` and ``a16`` of :func:`forward_layer`, for ``w_hh`` and ``(R, pairs(G))``.

    Its loops are vectorised in 256-bit registers, as :func:`forward_layer`'s
    (:func:`backward_layer_full_width`: 512-bit ones).
    """
    prefer_vector_bits(256)
    _backward_layer(gates, c, c_init, w_hh, dh_seq, dz, dh, dc, db, active, slot, cslot,
                    need_dh0, w_hh_panels, reverse, h_mask, out_keys, out_drop, w_hh16, a16)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=NO_REASSOC)
def backward_layer_full_width(gates, c, c_init, w_hh, dh_seq, dz, dh, dc, db, active, slot,
                              cslot, need_dh0, w_hh_panels, reverse, h_mask, out_keys, out_drop,
                              w_hh16, a16):
    """:func:`backward_layer` with its loops in 512-bit registers where the target has them
    (:func:`._cpu_features.prefer_vector_bits`): the same results, bit for bit."""
    prefer_vector_bits(512)
    _backward_layer(gates, c, c_init, w_hh, dh_seq, dz, dh, dc, db, active, slot, cslot,
                    need_dh0, w_hh_panels, reverse, h_mask, out_keys, out_drop, w_hh16, a16)


#: hidden sizes from which the LSTM layers run on the ``_full_width`` kernels (512-bit
#: loops), below which on the others (256-bit): with 16 float32 lanes (and LLVM's
#: interleaving) the loops over ``H`` units left most of a small layer's units to their
#: scalar remainder.  On the Intel Xeon (family 6, model 207) 512 bits were slower at H=8
#: and H=40, and from H=64 faster in inference and about even in training (``python
#: benchmarks/vector_width.py --hidden H`` times both at a given size); not measured on an
#: AMD Zen, where LLVM's own choice had been 512 bits at every size
FULL_WIDTH_FROM_HIDDEN = 64


def layer_kernels(hidden):
    """``(forward, backward)``: the kernels for layers of ``hidden`` units (see
    :data:`FULL_WIDTH_FROM_HIDDEN`)."""
    if hidden >= FULL_WIDTH_FROM_HIDDEN:
        return forward_layer_full_width, backward_layer_full_width
    return forward_layer, backward_layer


@njit(cache=True, nogil=True)
def add_steps(dst, dst_slot, src, src_slot, active, reverse_src):
    """``dst`` (packed by :func:`forward_layer`'s ``slot``) += ``src`` packed in the other
    time order: step ``s`` of ``dst`` is step ``S - 1 - s`` of ``src`` where ``reverse_src``.

    Sums the two directions' parts of a gradient w.r.t. one sequence.
    """
    S = active.shape[0] - 1
    for s in range(S):
        u = S - 1 - s if reverse_src else s
        for r in range(active[s]):
            d, v = dst[dst_slot[s] + r], src[src_slot[u] + r]
            for j in range(d.shape[0]):
                d[j] += v[j]


@njit(cache=True, nogil=True)
def packed_steps(lengths, rows, ring, reverse):
    """``(active, slot, cslot)`` of :func:`forward_layer` for a chunk of ``rows`` rows of
    ``lengths`` (longest first): training packs the steps one after another, inference
    (``ring``) alternates two slots of ``rows``.

    One compiled call per chunk and direction, without the GIL: as a few small NumPy calls,
    run by two threads at once, it took longer than the copy of the chunk's input (``python
    benchmarks/ragged.py`` times the epoch it is part of).
    """
    S = lengths[0] if lengths.shape[0] > 0 else 0
    active = np.zeros(S + 1, np.int64)
    n = lengths.shape[0]
    for s in range(S):  # rows longer than s: a prefix, as the lengths fall
        while n > 0 and lengths[n - 1] <= s:
            n -= 1
        active[S - 1 - s if reverse else s] = n
    slot, cslot = np.zeros(S + 1, np.int64), np.zeros(S + 1, np.int64)
    for s in range(S + 1):
        if ring:
            slot[s] = cslot[s] = (s % 2) * rows
        elif s > 0:
            slot[s] = slot[s - 1] + active[s - 1]
            cslot[s] = slot[s - 1]
    return active, slot, cslot


@njit(cache=True, nogil=True)
def gather_rows(x, rows, out):
    """``out[r] = x[rows[r]]`` (a chunk's rows of a reordered batch), without the GIL."""
    for r in range(rows.shape[0]):
        out[r] = x[rows[r]]


@functools.lru_cache(maxsize=None)
def _no_dropout(dtype):
    return np.empty((0, 0), dtype), np.empty(0, np.uint64), (np.uint64(0), dtype.type(0), 0, 0)


def no_dropout(dtype):
    """``(h_mask, out_keys, out_drop)`` of :func:`forward_layer` and :func:`backward_layer`
    for a layer without dropout, in ``dtype`` (shared, empty arrays: never written)."""
    return _no_dropout(np.dtype(dtype))
