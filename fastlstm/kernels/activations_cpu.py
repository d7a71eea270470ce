"""Gate non-linearities for the Numba kernels: exact in float64, vectorisable in float32.

``sigmoid`` and ``tanh`` are typed by their argument.  For float64 they are the
exact library functions (``math.exp``, ``math.tanh``), so float64 results match
the NumPy reference to rounding.  For float32 they are our own branch-free
polynomial approximations, accurate to a few ulp, written only with float32
arithmetic so that LLVM turns a loop of them into SIMD code: the library calls
do not vectorise (pip's llvmlite has no vector math library), and they cost
more than the GEMMs around them.

float32 ``exp`` (of arguments <= 0 only, all the gates need): ``exp(x) =
2**n * exp(r)`` with ``n = round(x / ln 2)``, ``|r| <= ln(2)/2`` (Cody-Waite
reduction with ``ln 2`` split in two), ``exp(r) = 1 + r + r**2 q(r)`` with a
degree-4 ``q`` fitted by least squares on Chebyshev nodes (relative error of
the polynomial 4e-9, below float32's ulp) and evaluated in Estrin's scheme
(three dependent operations, not Horner's four); the product with ``2**n`` is
rounded once, so that subnormal results come out right: by ``ldexp`` where the
target has AVX-512 (one ``vscalefps`` in place of shifts, adds and two
products), else by two powers of two built in the exponent bits (there
``ldexp`` is a library call per lane).  Both give the same bits.
``sigmoid(z) = (1 or e) / (1 + e)`` with ``e = exp(-|z|)``: the
numerator is chosen by the sign before the one division.

The callers must not let LLVM reassociate (fastmath flag ``reassoc``): it
folds ``(x - n ln2_hi) - n ln2_lo`` into one product with a rounded ``ln 2``,
and sigmoid was then 4.5 ulp off near -87.  The LSTM kernels compile with
:data:`._fastmath.NO_REASSOC`, which keeps FMA contraction.  What the gate
math costs beside the GEMMs: ``python benchmarks/blas_peak.py`` (an inference
chunk split into its GEMMs and the rest).

float32 ``tanh(x) = -m / (2 + m)`` with ``m = expm1(-2|x|)``, the sign of ``x``
copied: ``m`` comes from the same reduction, ``expm1(y) = 2**n expm1(r) +
(2**n - 1)``, where ``expm1(r) = r + r**2 q(r)`` keeps its relative accuracy
near 0 and ``2**n - 1`` is exact, so small ``|x|`` need no branch of their own
(2.5 ulp at most, and faster than a polynomial branch for small ``|x|``
beside the exp-based one).  ``tests/test_activations.py`` checks both against
float64 over a dense grid, compiled with the kernels' flags.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._cpu_features import vector_bits

F32 = np.float32
_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693359375)           # few mantissa bits: n * _LN2_HI is exact
_LN2_LO = F32(-2.12194440e-4)
_EXP_Q = (F32(0.49999988079071045), F32(0.166665181517601), F32(0.04166953265666962),
          F32(0.008368915878236294), F32(0.0013751407386735082))
_EXP_MIN = F32(-104.0)              # exp(-104) rounds to 0 in float32
_TANH_Y_MIN = F32(-40.0)            # expm1(-40) rounds to -1: tanh(20) is 1 in float32
_ZERO, _HALF, _ONE, _TWO = F32(0.0), F32(0.5), F32(1.0), F32(2.0)
#: ``llvm.ldexp`` becomes one vector instruction (``vscalefps``) with AVX-512 only
_LDEXP_VECTORISES = vector_bits() >= 512


@intrinsic
def _bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (an LLVM bitcast: vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _ldexp_f32(typingctx, x, n):
    """``x * 2**n`` rounded once (LLVM's ``ldexp``, which the loop vectoriser knows)."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.IntType(32)]),
            "llvm.ldexp.f32.i32")
        return builder.call(fn, args)
    return types.float32(types.float32, types.int32), codegen


@njit(inline="always")
def _reduce(x):
    """``n``, ``r`` and ``q(r)`` with ``x = n ln 2 + r``, ``|r| <= ln(2)/2`` and
    ``exp(r) = 1 + r + r**2 q(r)``."""
    n = np.floor(x * _LOG2E + _HALF)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    r2 = r * r
    q = (_EXP_Q[0] + _EXP_Q[1] * r) + r2 * ((_EXP_Q[2] + _EXP_Q[3] * r) + r2 * _EXP_Q[4])
    return n, r, q


@njit(inline="always")
def exp_nonpositive_f32(x):
    """``exp(x)`` in float32 for ``x <= 0``, few ulp, subnormal results included; NaN stays NaN."""
    xc = _EXP_MIN if x < _EXP_MIN else x
    n, r, q = _reduce(xc)
    p = _ONE + r + r * r * q
    k = np.int32(n)
    if _LDEXP_VECTORISES:
        return _ldexp_f32(p, k)
    # 2**n as two normal powers of two, so that a subnormal result is rounded once, at the end
    k1 = k >> np.int32(1)
    s1 = _bits_as_float32(np.int32((k1 + np.int32(127)) << np.int32(23)))
    s2 = _bits_as_float32(np.int32((k - k1 + np.int32(127)) << np.int32(23)))
    return p * s1 * s2


@njit(inline="always")
def sigmoid_f32(z):
    e = exp_nonpositive_f32(-abs(z))
    return (_ONE if z >= _ZERO else e) / (_ONE + e)


@njit(inline="always")
def tanh_f32(z):
    y = -_TWO * abs(z)
    n, r, q = _reduce(_TANH_Y_MIN if y < _TANH_Y_MIN else y)
    # 2**n for n >= -58: a normal number, built in the exponent bits
    s = _bits_as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    m = s * (r + r * r * q) + (s - _ONE)
    return np.copysign(-m / (_TWO + m), z)


def sigmoid(z):
    """Logistic function that never overflows (exp is only taken of -|z|)."""
    e = math.exp(-abs(z))
    return 1.0 / (1.0 + e) if z >= 0 else e / (1.0 + e)


def tanh(z):
    """Hyperbolic tangent."""
    return math.tanh(z)


@overload(sigmoid)
def _sigmoid_overload(z):
    if z == types.float32:
        return lambda z: sigmoid_f32(z)
    return sigmoid


@overload(tanh)
def _tanh_overload(z):
    if z == types.float32:
        return lambda z: tanh_f32(z)
    return tanh
