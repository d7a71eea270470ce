"""A register-blocked GEMM for the products inside the LSTM's time loop.

At one time step's shapes (a training chunk of 16 rows times a 156 x 512
weight matrix, or 16 x 512 times 512 x 128 backwards, and inference's 128
rows) OpenBLAS on one core is slowest where the chunks are smallest; this
kernel runs the same products, and the weight gradient, faster on the
project's machines (an AMD EPYC of CPU family 26, Zen 5, and an Intel Xeon of
family 6, model 207).  ``python benchmarks/blas_peak.py`` times both at the
backend's shapes.

An output block of ``MR`` rows by ``NR`` columns is accumulated in ``MR``
SIMD vectors of ``NR`` lanes across the whole inner dimension: per ``k``, one
contiguous load of ``NR`` values of ``B``, ``MR`` broadcasts of ``A`` and
``MR`` fused multiply-adds.  The block is written by hand as LLVM IR
(:func:`_make_block`) because the accumulators must stay in registers, and
LLVM kept a Numba array of accumulators in registers only for some block
shapes and targets (the others ran many times slower).  ``A`` may have any
strides (the weight gradient reads a transposed view); ``B`` and the output
need contiguous rows.  Columns past the last full panel of ``NR`` go through a
zero-padded copy, the rows past the last full block through one block of as many
rows (:func:`make_whole_panels`).

:func:`gemm` reads ``B`` where it lies; :func:`gemm_panels` reads it packed
(:func:`pack_panels`: each panel of ``NR`` columns one contiguous run), as the
step GEMMs read the weights, which stay the same over the whole time loop:
packed once per batch, a panel stays in L1 while the row blocks pass (the rows
of ``B``, kilobytes apart, fall in a few cache sets).  The weight gradient's
``B`` changes with every call: packing it in the call was no faster where tried
(on the Intel Xeon, timed against :func:`gemm` round by round at a chunk's weight
gradient), so :func:`gemm` does not pack.

``MR x NR`` follows the vector width Numba compiles for: 8 x 32 floats are
16 AVX-512 registers of accumulators, 6 x 16 are 12 AVX2 ones.  Whether the LSTM
kernels use it or BLAS is measured on each CPU (:mod:`fastlstm.backends.cpu_choices`);
:data:`PAYS_OFF` is the rule where nothing was measured.
"""

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu_features import has_fma, vector_bits
from ._fastmath import REASSOC

#: rows and columns of the register block, for the SIMD width of the target
MR, NR = {512: (8, 32), 256: (6, 16)}.get(vector_bits(), (4, 8))
#: the builtin rule (:func:`fastlstm.backends.cpu_choices.builtin_choices`): whether
#: :func:`gemm` beats BLAS at the LSTM's step shapes on this target.  It does with
#: AVX-512, and with AVX2 and FMA: built for AVX2 on an AVX-512 machine, and on an
#: AVX2-only AMD EPYC (Zen 3), OpenBLAS on its Haswell kernels there, it was slower than
#: BLAS at a chunk's weight gradient timed alone, but faster at the step GEMMs, over a
#: training step and in inference (the calibration chose it on both).
#: ``python benchmarks/blas_peak.py`` compares the two.
PAYS_OFF = vector_bits() >= 256 and has_fma()
#: rows of ``b`` per pass: a longer inner dimension is cut into slices, so that the
#: ``KC x NR`` panel of ``b`` stays in L1/L2 while every row block of ``a`` passes (it
#: sped up the 1792-long weight gradient of 64-row chunks, and 256 did best there)
KC = 256


def element_ptr(context, builder, arr_ty, arr_v, row, col, elem_ty):
    """IR: a pointer of type ``elem_ty*`` to element ``[row, col]`` of a 2-D Numba array."""
    arr = context.make_array(arr_ty)(context, builder, arr_v)
    s0, s1 = cgutils.unpack_tuple(builder, arr.strides)
    offset = builder.add(builder.mul(row, s0), builder.mul(col, s1))
    i8p = ir.IntType(8).as_pointer()
    return builder.bitcast(builder.gep(builder.bitcast(arr.data, i8p), [offset]),
                           elem_ty.as_pointer())


def _make_block(rows):
    """An intrinsic computing one ``rows x NR`` block of ``A @ B`` into (or onto) ``out``.

    ``block(a, r0, b, c0, out, o_r0, o_c0, accumulate)``::

        out[o_r0:o_r0+rows, o_c0:o_c0+NR] (+)= a[r0:r0+rows, :K] @ b[:, c0:c0+NR]

    with ``K = b.shape[0]``.  No bounds are checked: the caller guarantees them.  Each
    output is one chain of fused multiply-adds over ``k`` in order, whatever the block's
    rows, so a row's results do not depend on the block it falls in.
    """
    @intrinsic
    def block(typingctx, a, r0, b, c0, out, o_r0, o_c0, accumulate):
        def codegen(context, builder, sig, args):
            a_ty, _, b_ty, _, out_ty = sig.args[:5]
            a_v, r0_v, b_v, c0_v, out_v, o_r0_v, o_c0_v, acc_v = args
            fty = context.get_data_type(a_ty.dtype)
            vty = ir.VectorType(fty, NR)
            i8p = ir.IntType(8).as_pointer()

            def ptr(arr_ty, arr_v, row, col, elem_ty):
                return element_ptr(context, builder, arr_ty, arr_v, row, col, elem_ty)

            a_arr = context.make_array(a_ty)(context, builder, a_v)
            a_k_stride = cgutils.unpack_tuple(builder, a_arr.strides)[1]
            b_arr = context.make_array(b_ty)(context, builder, b_v)
            b_k_stride = cgutils.unpack_tuple(builder, b_arr.strides)[0]
            k_count = cgutils.unpack_tuple(builder, b_arr.shape)[0]
            zero = context.get_constant(types.intp, 0)
            a_rows = [builder.bitcast(
                ptr(a_ty, a_v, builder.add(r0_v, context.get_constant(types.intp, i)), zero, fty),
                i8p) for i in range(rows)]
            b_panel = builder.bitcast(ptr(b_ty, b_v, zero, c0_v, fty), i8p)

            suffix = "f32" if a_ty.dtype == types.float32 else "f64"
            fma_intrinsic = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{NR}{suffix}")

            def fma(x, y, z):
                if has_fma():
                    return builder.call(fma_intrinsic, [x, y, z])
                return builder.fadd(builder.fmul(x, y), z)  # a library call per lane otherwise
            i32 = ir.IntType(32)
            splat = ir.Constant(ir.VectorType(i32, NR), [0] * NR)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * NR))
                    for _ in range(rows)]
            with cgutils.for_range(builder, k_count) as loop:
                k = loop.index
                b_row = builder.load(builder.bitcast(
                    builder.gep(b_panel, [builder.mul(k, b_k_stride)]), vty.as_pointer()), align=1)
                for i in range(rows):
                    a_ik = builder.load(builder.bitcast(
                        builder.gep(a_rows[i], [builder.mul(k, a_k_stride)]), fty.as_pointer()))
                    a_vec = builder.insert_element(ir.Constant(vty, ir.Undefined), a_ik,
                                                   ir.Constant(i32, 0))
                    a_vec = builder.shuffle_vector(a_vec, ir.Constant(vty, ir.Undefined), splat)
                    builder.store(fma(a_vec, b_row, builder.load(accs[i])), accs[i])
            for i in range(rows):
                row = builder.add(o_r0_v, context.get_constant(types.intp, i))
                dst = ptr(out_ty, out_v, row, o_c0_v, vty)
                value = builder.load(accs[i])
                added = builder.fadd(builder.load(dst, align=1), value)
                builder.store(builder.select(acc_v, added, value), dst, align=1)
            return context.get_dummy_value()
        return types.void(a, r0, b, c0, out, o_r0, o_c0, accumulate), codegen
    return block


def make_whole_panels(make_block, mr, nr, panel_major=False):
    """``whole_panels(a, b, out, ncols, accumulate)``: ``out[:, :ncols] (+)= A @ B[:, :ncols]``
    for ``ncols`` a multiple of ``nr``, on the register blocks ``make_block(rows)``
    of a GEMM (``mr x nr`` the largest; this module's and :mod:`.gemm_bf16_cpu`'s).
    ``panel_major``: ``B`` is given as its panels of ``nr`` columns, ``b[p]`` the columns
    ``p nr ... (p + 1) nr - 1`` (:func:`pack_panels`), else as its rows.

    The blocks of ``mr`` rows go panel by panel.  The rows left over run as ONE block of
    as many rows, so ``B`` is read once more, not once per block of 4, 2 and 1 rows: with
    few rows a product is bound by reading ``B`` from L2, so a step where one of a block's
    rows had ended cost more than the full block (``python benchmarks/blas_peak.py --rows``
    times every row count).  Each output is one chain of
    multiply-adds over the inner dimension in order, whatever its block, so a row's
    results do not depend on the rows beside it.
    """
    full = make_block(mr)

    if panel_major:
        @njit(inline="always")
        def panel(b, c0):  # the panel of B holding column c0, and c0's column in it
            return b[c0 // nr], 0
    else:
        @njit(inline="always")
        def panel(b, c0):
            return b, c0

    def make_last_rows(most):  # a block of ``rows <= most`` rows, chosen at run time
        if most == 0:
            @njit(inline="always")
            def last_rows(a, b, out, r, rows, ncols, accumulate):
                pass
            return last_rows
        fewer, these = make_last_rows(most - 1), make_block(most)

        @njit(inline="always")
        def last_rows(a, b, out, r, rows, ncols, accumulate):
            if rows == most:
                for c0 in range(0, ncols, nr):
                    bp, bc = panel(b, c0)
                    these(a, r, bp, bc, out, r, c0, accumulate)
            else:
                fewer(a, b, out, r, rows, ncols, accumulate)
        return last_rows

    last_rows = make_last_rows(mr - 1)

    # compiled once per signature, not inlined: inlined, every call site compiled all its
    # blocks anew, which lengthened the first compile of the kernels that call the GEMM
    @njit(nogil=True, error_model="numpy")
    def whole_panels(a, b, out, ncols, accumulate):
        M = out.shape[0]
        whole = M - M % mr
        for c0 in range(0, ncols, nr):
            bp, bc = panel(b, c0)
            for r in range(0, whole, mr):
                full(a, r, bp, bc, out, r, c0, accumulate)
        last_rows(a, b, out, whole, M - whole, ncols, accumulate)
    return whole_panels


_whole_panels = make_whole_panels(_make_block, MR, NR)
_whole_packed_panels = make_whole_panels(_make_block, MR, NR, panel_major=True)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
def gemm(a, b, out, accumulate):
    """``out (+)= a[:, :K] @ b`` with ``K = b.shape[0]``, single-threaded.

    Parameters
    ----------
    a : (M, K') array, any strides, ``K' >= K``
    b : (K, N) array, rows contiguous
    out : (M, N) array, rows contiguous; must not overlap ``a`` or ``b``
    accumulate : bool
        Add to ``out`` instead of overwriting it.
    """
    M, N = out.shape
    K = b.shape[0]
    if a.shape[0] != M or a.shape[1] < K or b.shape[1] != N:
        raise ValueError("gemm: shapes do not match")
    if N >= NR and (b.strides[1] != b.itemsize or out.strides[1] != out.itemsize):
        raise ValueError("gemm: b and out need contiguous rows")
    for k0 in range(0, max(K, 1), KC):
        k1 = min(K, k0 + KC)
        _gemm_slice(a[:, k0:k1], b[k0:k1], out, accumulate or k0 > 0)


@njit(inline="always")
def _gemm_slice(a, b, out, accumulate):
    M, N = out.shape
    K = b.shape[0]
    full = N - N % NR
    _whole_panels(a, b, out, full, accumulate)
    if full < N:
        width = N - full
        padded = np.zeros((K, NR), out.dtype)
        for k in range(K):  # loops, not a slice assignment: that costs seconds of compiling
            for c in range(width):
                padded[k, c] = b[k, full + c]
        tile = np.empty((M, NR), out.dtype)
        _whole_panels(a, padded, tile, NR, False)
        store_tile(tile, out, full, accumulate)


@njit(inline="always")
def store_tile(tile, out, c0, accumulate):
    """``out[:, c0:] (+)= tile[:, :N - c0]``: the last, partial panel of a GEMM, computed
    whole into ``tile``."""
    M, N = out.shape
    for r in range(M):
        if accumulate:
            for c in range(N - c0):
                out[r, c0 + c] += tile[r, c]
        else:
            for c in range(N - c0):
                out[r, c0 + c] = tile[r, c]


def panel_count(n):
    """Panels of :data:`NR` columns that :func:`pack_panels` stores for ``n`` columns."""
    return -(-n // NR)


@njit(cache=True, nogil=True, error_model="numpy")
def pack_panels(b, out):
    """``out[p, k, j] = b[k, p NR + j]``, zeros past ``b``'s columns: ``b`` as the contiguous
    panels :func:`gemm_panels` reads.

    A row of ``b`` is a few kilobytes long, so the rows of one panel of ``b`` fall in a few
    sets of the L1 cache and push each other out before the next block of rows reads them
    again; a panel packed is one contiguous run, which stays in L1.  The LSTM's step GEMMs
    read the same weights at every step: packed once per batch, they are read packed
    ``T`` times (``python benchmarks/blas_peak.py`` times both).

    Parameters
    ----------
    b : (K, N) array, any strides
    out : (panel_count(N), K, NR) array of ``b``'s dtype
    """
    K, N = b.shape
    if out.shape[0] != -(-N // NR) or out.shape[1] != K or out.shape[2] != NR:
        raise ValueError("pack_panels: out must be (panel_count(N), K, NR)")
    for p in range(out.shape[0]):
        c0 = p * NR
        width = min(NR, N - c0)
        for k in range(K):
            src, dst = b[k], out[p, k]
            for j in range(width):
                dst[j] = src[c0 + j]
            for j in range(width, NR):
                dst[j] = 0


@njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
def gemm_panels(a, panels, out, accumulate):
    """``out (+)= a[:, :K] @ B`` with ``B`` packed by :func:`pack_panels` into ``panels``
    (``K = panels.shape[1]``, ``N <= NR panels.shape[0]``), single-threaded; the same sums
    as :func:`gemm`, bit for bit.

    Parameters
    ----------
    a : (M, K') array, any strides, ``K' >= K``
    panels : (P, K, NR) array, each panel's rows of ``NR`` contiguous and adjacent (as
        :func:`pack_panels` writes them, and any slice ``[:, :K]`` of that)
    out : (M, N) array, rows contiguous; must not overlap ``a`` or ``panels``
    accumulate : bool
    """
    M, N = out.shape
    K = panels.shape[1]
    if a.shape[0] != M or a.shape[1] < K or panels.shape[0] * NR < N or panels.shape[2] != NR:
        raise ValueError("gemm_panels: shapes do not match")
    if K > 0 and N > 0 and (panels.strides[2] != panels.itemsize
                            or panels.strides[1] != NR * panels.itemsize):
        raise ValueError("gemm_panels: the panels need contiguous rows of NR")
    if M > 0 and N > 0 and out.strides[1] != out.itemsize:
        raise ValueError("gemm_panels: out needs contiguous rows")
    full = N - N % NR
    for k0 in range(0, max(K, 1), KC):
        k1 = min(K, k0 + KC)
        sliced, acc = panels[:, k0:k1], accumulate or k0 > 0
        _whole_packed_panels(a[:, k0:k1], sliced, out, full, acc)
        if full < N:  # the last panel is zero-padded: through a tile
            tile = np.empty((M, NR), out.dtype)
            _whole_packed_panels(a[:, k0:k1], sliced[full // NR:], tile, NR, False)
            store_tile(tile, out, full, acc)


@njit(inline="always")
def matmul(a, b, panels, out):
    """``out = a @ b`` (``a`` and ``out`` contiguous): :func:`gemm_panels` where ``panels``
    holds ``b`` packed by :func:`pack_panels`, else (``panels`` has no panels) BLAS."""
    if panels.shape[0] > 0:
        gemm_panels(a, panels, out, False)
    else:
        np.dot(a, b, out)


@functools.lru_cache(maxsize=None)
def _no_panels(dtype):
    return np.empty((0, 0, NR), dtype)


def no_panels(dtype):
    """The ``panels`` of :func:`matmul` that choose BLAS, in ``dtype`` (shared, empty)."""
    return _no_panels(np.dtype(dtype))
