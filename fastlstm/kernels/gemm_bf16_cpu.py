"""A register-blocked bfloat16 GEMM with float32 accumulation, on ``vdpbf16ps`` (AVX512-BF16).

The products of :mod:`fastlstm.precision`'s rule: both operands rounded to bfloat16
(:func:`to_bf16`, the rounding of ``vcvtne2ps2bf16``), their products summed in float32.
``vdpbf16ps acc, a, b`` adds to each float32 lane ``i`` of ``acc`` the two products
``a[2i] b[2i] + a[2i+1] b[2i+1]``: the inner dimension goes by pairs, so the operands
are packed with each pair of ``k`` side by side:

* ``A`` (:func:`pack_rows`): ``(M, pairs)`` of ``uint32``, element ``[i, p]`` the pair
  ``(a[i, 2p], a[i, 2p+1])`` of bfloat16 (the first in the low half), broadcast to every
  lane by the kernel;
* ``B`` (:func:`pack_panels`): ``(pairs, N)`` of ``uint32``, element ``[p, n]`` the pair
  ``(b[2p, n], b[2p+1, n])``, columns padded with zeros to whole panels of :data:`NR`.

An odd inner dimension is padded with a zero.  The ``A`` of a weight gradient, ``X^T``,
is ``pack_panels(X)`` read transposed (:func:`gemm_xt`): its pairs are already those of
the inner dimension, so nothing is transposed.

An output block of ``MR`` rows by ``NR = 32`` columns is ``2 MR`` vectors of 16 float32
accumulators kept in registers over the whole inner dimension; per pair of ``k``: two
loads of ``B``, ``MR`` broadcasts of ``A`` and ``2 MR`` ``vdpbf16ps``.  As in
:mod:`.gemm_cpu`, the block is written as LLVM IR (:func:`_make_block`), which keeps the
accumulators in registers.

Exactness: a product of two bfloat16 values is exact in float32 (8 + 8 significant
bits), so the kernel differs from a float64 product of the same bfloat16 values only by
the float32 roundings of the sums (and the instruction's flushing of denormal sums to
zero): at most ``gamma_K * sum_k |a_ik b_kj|``, ``gamma_K = K u / (1 - K u)``,
``u = 2^-24``, in whatever order the sums are taken (``tests/test_bf16.py`` checks that
bound, and exact results where every sum is exact).

Only for targets with ``avx512bf16`` (:func:`available`); compiled on first call, so
that importing this module is harmless elsewhere.  No AMX (``tdpbf16ps``) path: no
machine of the project has AMX to test one on.
"""

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import gemm_cpu
from ._cpu_features import target_features
from ._fastmath import REASSOC
from .gemm_cpu import element_ptr

#: rows of the register block and float32 lanes of a vector: 8 rows of 2 x 16 lanes are
#: 16 of the 32 AVX-512 registers, the blocking of :mod:`.gemm_cpu` at float32
MR, LANES = 8, 16
#: columns of the register block (and of a panel of :func:`pack_panels`)
NR = 2 * LANES
#: pairs of the inner dimension per pass: as :data:`.gemm_cpu.KC` values of float32 (the same
#: bytes of a panel of ``B``), so that a long inner dimension (a weight gradient over many
#: steps) keeps the panel in L1/L2 while every row block of ``A`` passes
KC_PAIRS = 256
#: the instruction set this module needs, as LLVM and ``/proc/cpuinfo`` name it
FEATURE, CPUINFO_FLAG = "avx512bf16", "avx512_bf16"


def available():
    """Whether Numba's target has AVX512-BF16 (``vdpbf16ps``)."""
    return FEATURE in target_features()


class _BFloat(ir.Type):
    """LLVM's ``bfloat``, which ``llvmlite.ir`` does not have."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash(_BFloat)


def _bf16_vector():
    """The type the intrinsic takes its bfloat16 operands as: ``<32 x bfloat>`` since LLVM 17
    (which turned the ``<16 x i32>`` of older versions into real bfloat16 vectors)."""
    if llvm.llvm_version_info >= (17,):
        return ir.VectorType(_BFloat(), 2 * LANES)
    return ir.VectorType(ir.IntType(32), LANES)


@intrinsic
def _float_bits(typingctx, value):
    """The bits of a float32, as a uint32 (a bit cast: no instruction)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@njit(inline="always")
def to_bf16(value):
    """The bits of the bfloat16 nearest to float32 ``value``, as ``vcvtne2ps2bf16`` rounds
    (:func:`fastlstm.precision.bf16_bits` in NumPy): ties to even, denormals to zero.
    Selects, not branches, so that loops over it vectorise."""
    bits = _float_bits(np.float32(value))
    exponent = bits & np.uint32(0x7F800000)
    top = bits >> np.uint32(16)
    nearest = (bits + np.uint32(0x7FFF) + (top & np.uint32(1))) >> np.uint32(16)
    nan = exponent == np.uint32(0x7F800000) and (bits & np.uint32(0x007FFFFF)) != 0
    out = top | np.uint32(0x0040) if nan else nearest
    return np.uint16(top & np.uint32(0x8000) if exponent == 0 else out)


def pairs(k):
    """Pairs of the inner dimension that ``k`` values take (the last one padded)."""
    return (k + 1) // 2


def panel_columns(n):
    """Columns that :func:`pack_panels` stores for ``n``: whole panels of :data:`NR`."""
    return -(-n // NR) * NR


@njit(inline="always")
def _pair(first, second):
    """Two float32 values as the bfloat16 pair ``vdpbf16ps`` reads: ``first`` in the low half."""
    return np.uint32(to_bf16(first)) | (np.uint32(to_bf16(second)) << np.uint32(16))


@njit(cache=True, nogil=True, error_model="numpy")
def pack_rows(a, out):
    """``out[i, p]`` = the pair ``(a[i, 2p], a[i, 2p + 1])`` rounded to bfloat16
    (:func:`to_bf16`; a zero past ``K``): the ``A`` operand of :func:`gemm`.

    Parameters
    ----------
    a : (M, K) float32 array, any strides
    out : (M, >= pairs(K)) uint32 array
    """
    M, K = a.shape
    zero = np.float32(0)
    for i in range(M):
        row, dst = a[i], out[i]
        for p in range(K // 2):
            dst[p] = _pair(row[2 * p], row[2 * p + 1])
        if K % 2:
            dst[K // 2] = _pair(row[K - 1], zero)


@njit(cache=True, nogil=True, error_model="numpy")
def pack_panels(b, out):
    """``out[p, n]`` = the pair ``(b[2p, n], b[2p + 1, n])`` rounded to bfloat16, zeros past
    ``b``'s rows and columns: the ``B`` operand of :func:`gemm`.

    Parameters
    ----------
    b : (K, N) float32 array, any strides
    out : (pairs(K), panel_columns(N)) uint32 array
    """
    K, N = b.shape
    zero = np.float32(0)
    for p in range((K + 1) // 2):
        dst = out[p]
        if 2 * p + 1 < K:
            first, second = b[2 * p], b[2 * p + 1]
            for n in range(N):
                dst[n] = _pair(first[n], second[n])
        else:
            first = b[2 * p]
            for n in range(N):
                dst[n] = _pair(first[n], zero)
        for n in range(N, out.shape[1]):
            dst[n] = 0


def _make_block(rows):
    """An intrinsic computing one ``rows x NR`` block of the product into (or onto) ``out``.

    ``block(a, r0, b, c0, out, o_r0, o_c0, accumulate)``, ``a`` and ``b`` packed ``uint32``::

        out[o_r0:o_r0+rows, o_c0:o_c0+NR] (+)= A[r0:r0+rows] @ B[:, c0:c0+NR]

    with ``A`` and ``B`` packed as :func:`pack_rows` and :func:`pack_panels` do, over the
    ``b.shape[0]`` pairs of ``B``; ``out`` has contiguous rows.  No bounds are checked: the
    caller guarantees them.
    """
    @intrinsic
    def block(typingctx, a, r0, b, c0, out, o_r0, o_c0, accumulate):
        def codegen(context, builder, sig, args):
            if FEATURE not in target_features():  # the target's own, as the cache is keyed
                # The kernels that may call this (the LSTM's, through matmul) are compiled on
                # every CPU, and LLVM cannot select vdpbf16ps for a target without it.  It is
                # never run there (the backend refuses bfloat16): a trap, should it ever be.
                trap = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap")
                builder.call(trap, [])
                return context.get_dummy_value()
            a_ty, _, b_ty, _, out_ty = sig.args[:5]
            a_v, r0_v, b_v, c0_v, out_v, o_r0_v, o_c0_v, acc_v = args
            f32, i32 = ir.FloatType(), ir.IntType(32)
            acc_ty, bf_ty, pair_ty = ir.VectorType(f32, LANES), _bf16_vector(), \
                ir.VectorType(i32, LANES)
            dpbf16ps = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(acc_ty, [acc_ty, bf_ty, bf_ty]),
                "llvm.x86.avx512bf16.dpbf16ps.512")
            intp = lambda n: context.get_constant(types.intp, n)  # noqa: E731
            a_pair_stride = cgutils.unpack_tuple(
                builder, context.make_array(a_ty)(context, builder, a_v).strides)[1]
            b_arr = context.make_array(b_ty)(context, builder, b_v)
            b_pair_stride = cgutils.unpack_tuple(builder, b_arr.strides)[0]
            pair_count = cgutils.unpack_tuple(builder, b_arr.shape)[0]
            i8p = ir.IntType(8).as_pointer()
            a_rows = [builder.bitcast(element_ptr(context, builder, a_ty, a_v,
                                                  builder.add(r0_v, intp(i)), intp(0), i32), i8p)
                      for i in range(rows)]
            # two vectors of 16 columns per pair of k
            b_panel = builder.bitcast(element_ptr(context, builder, b_ty, b_v, intp(0), c0_v,
                                                  i32), i8p)
            splat = ir.Constant(pair_ty, [0] * LANES)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_ty, [0.0] * LANES))
                    for _ in range(2 * rows)]
            with cgutils.for_range(builder, pair_count) as loop:
                row_of_b = builder.gep(b_panel, [builder.mul(loop.index, b_pair_stride)])
                halves = [builder.load(builder.bitcast(builder.gep(row_of_b, [intp(64 * h)]),
                                                       bf_ty.as_pointer()), align=1)
                          for h in (0, 1)]
                for i in range(rows):
                    pair = builder.load(builder.bitcast(
                        builder.gep(a_rows[i], [builder.mul(loop.index, a_pair_stride)]),
                        i32.as_pointer()), align=1)
                    spread = builder.insert_element(ir.Constant(pair_ty, ir.Undefined), pair,
                                                    ir.Constant(i32, 0))
                    spread = builder.bitcast(builder.shuffle_vector(
                        spread, ir.Constant(pair_ty, ir.Undefined), splat), bf_ty)
                    for h in (0, 1):
                        acc = accs[2 * i + h]
                        builder.store(builder.call(dpbf16ps, [builder.load(acc), spread,
                                                              halves[h]]), acc)
            for i in range(rows):
                for h in (0, 1):
                    dst = element_ptr(context, builder, out_ty, out_v,
                                      builder.add(o_r0_v, intp(i)),
                                      builder.add(o_c0_v, intp(h * LANES)), acc_ty)
                    value = builder.load(accs[2 * i + h])
                    added = builder.fadd(builder.load(dst, align=1), value)
                    builder.store(builder.select(acc_v, added, value), dst, align=1)
            return context.get_dummy_value()
        return types.void(a, r0, b, c0, out, o_r0, o_c0, accumulate), codegen
    return block


_whole_panels = gemm_cpu.make_whole_panels(_make_block, MR, NR)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=REASSOC)
def gemm(a, b, out, accumulate):
    """``out (+)= A @ B`` in bfloat16 with float32 sums, single-threaded, on operands packed
    by :func:`pack_rows` (``a``) and :func:`pack_panels` (``b``).

    ``A = X^T`` (a weight gradient's) needs no transposition: ``pack_panels(X).T`` is it, a
    view whose pairs lie a row of the packed ``X`` apart (``a`` may have any strides).

    Parameters
    ----------
    a : (M, >= P) uint32 array, any strides
    b : (P, >= panel_columns(N)) uint32 array, rows contiguous
        ``P`` pairs of the inner dimension.
    out : (M, N) float32 array, rows contiguous; must not overlap ``a`` or ``b``
    accumulate : bool
        Add to ``out`` instead of overwriting it.
    """
    M, N = out.shape
    P = b.shape[0]
    if a.shape[0] != M or a.shape[1] < P or b.shape[1] < -(-N // NR) * NR:
        raise ValueError("gemm_bf16: shapes do not match")
    if b.strides[1] != 4 or out.strides[1] != 4:
        raise ValueError("gemm_bf16: b and out need contiguous rows")
    for p0 in range(0, max(P, 1), KC_PAIRS):
        p1 = min(P, p0 + KC_PAIRS)
        _gemm_slice(a[:, p0:p1], b[p0:p1], out, accumulate or p0 > 0)


@njit(inline="always")
def _gemm_slice(a, b, out, accumulate):
    M, N = out.shape
    full = N - N % NR
    _whole_panels(a, b, out, full, accumulate)
    if full < N:  # the last, partial panel of B is zero-padded: through a tile
        tile = np.empty((M, NR), np.float32)
        _whole_panels(a, b[:, full:], tile, NR, False)
        gemm_cpu.store_tile(tile, out, full, accumulate)


@njit(cache=True, nogil=True, error_model="numpy")
def gemm_xt(x, y, x16, y16, out, accumulate):
    """``out (+)= x^T @ y`` in bfloat16 with float32 sums (a weight gradient), packing both
    into the scratch ``x16`` and ``y16`` first (one call: the packing and the product).

    The scratch is flat, and each packed operand a contiguous prefix of it: packing into a
    2-D view with longer rows than it needs was slower, because Numba then indexes a
    strided array (``python benchmarks/bf16.py`` times the training epoch that runs it).

    Parameters
    ----------
    x : (P, K) float32 array, any strides
    y : (P, N) float32 array, any strides
    x16, y16 : 1-D uint32 arrays of at least pairs(P) * panel_columns(K) and
        pairs(P) * panel_columns(N) elements
    out : (K, N) float32 array, rows contiguous
    accumulate : bool
    """
    (P, K), N = x.shape, y.shape[1]
    n_pairs = (P + 1) // 2  # pairs(P), and panel_columns(K), panel_columns(N) below
    x16 = x16[:n_pairs * (-(-K // NR) * NR)].reshape(n_pairs, -(-K // NR) * NR)
    y16 = y16[:n_pairs * (-(-N // NR) * NR)].reshape(n_pairs, -(-N // NR) * NR)
    pack_panels(x, x16)
    pack_panels(y, y16)
    gemm(x16.T[:K], y16, out, accumulate)  # x^T: the transposed view of x's pack


@njit(inline="always")
def matmul(a, b, panels, b16, a16, out):
    """``out = a @ b``, in the precision the caller's buffers choose: bfloat16 where ``b16``
    holds ``b`` packed by :func:`pack_panels` (``a`` is packed into the scratch ``a16``, of
    at least ``a``'s rows and ``b16``'s pairs, first), else float32 by
    :func:`.gemm_cpu.matmul` (``b16`` has no rows; ``panels``: ``b`` packed for our GEMM, or
    none for BLAS).  One call site serves both precisions."""
    if b16.shape[0] > 0:
        rows = a16[:a.shape[0]]
        pack_rows(a, rows)
        gemm(rows, b16, out, False)
    else:
        gemm_cpu.matmul(a, b, panels, out)


#: the ``b16`` and ``a16`` of :func:`matmul` that choose float32
FLOAT32 = (np.empty((0, 0), np.uint32), np.empty((0, 0), np.uint32))
