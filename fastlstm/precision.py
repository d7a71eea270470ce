"""The precisions a network may compute in, and what ``"bfloat16"`` rounds: the one rule
that :mod:`fastlstm.reference` and the bfloat16 CPU kernels both follow.

``"float32"`` computes everything in the parameters' dtype.  ``"bfloat16"`` rounds the two
operands of the LSTM's GEMMs to bfloat16 and accumulates their products in float32
(``vdpbf16ps``); nothing else changes.  The GEMMs whose operands are rounded, per layer
and direction, with ``x_t`` and ``h_{t-1}`` as the recurrence reads them (``x_t`` after
the dropout between layers, ``h_{t-1}`` after the recurrent dropout mask):

* forward, each step: ``z_t = x_t W_ih^T + h_{t-1} W_hh^T`` (the bias is added after, in
  float32);
* backward, each step: ``dz_t W_hh`` (the gradient w.r.t. ``h_{t-1}``, before its mask)
  and ``dz_t W_ih`` (w.r.t. the layer's input);
* the weight gradients, ``dW_ih = sum_t dz_t^T x_t`` and ``dW_hh = sum_t dz_t^T h_{t-1}``.

The head (one small GEMM per batch, forward and backward), the biases, the gates and
cell state, the loss and its gradient, the optimizer state and the parameters stay in
float32: the parameters are float32, and rounded only where a GEMM reads them.  The
order in which the float32 sums are taken is not part of the rule (a kernel's blocking
decides it), so kernels match the reference up to float32 rounding of the sums.

A float32 value ``v`` is rounded as ``vcvtne2ps2bf16`` does (:func:`round_bf16`): to the
nearest bfloat16, ties to even; denormals become a zero of their sign (the instruction
treats them as zero); infinities stay; a NaN stays a (quiet) NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PRECISIONS", "check_precision", "round_bf16", "bf16_bits"]

#: the precisions a user may ask for; ``"auto"`` is float32 (see :func:`check_precision`)
PRECISIONS = ("float32", "bfloat16", "auto")


def check_precision(precision):
    """``precision`` as the backend computes it: ``"float32"`` or ``"bfloat16"``.

    ``"auto"`` is ``"float32"``: lowering the precision changes the results, so it is
    never chosen for the user.

    Raises
    ------
    ValueError
        ``precision`` is none of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "float32" if precision == "auto" else precision


def bf16_bits(a):
    """The bfloat16 nearest to each float32 of ``a`` (see the module docstring), as the
    ``uint16`` bit patterns the kernels store."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    exponent = bits & np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = exponent == np.uint32(0x7F800000)
    nan &= (bits & np.uint32(0x007FFFFF)) != 0
    out = np.where(exponent == 0, bits >> np.uint32(16) & np.uint32(0x8000), rounded)
    out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), out)
    return out.astype(np.uint16)


def round_bf16(a):
    """``a`` rounded to bfloat16 as :func:`bf16_bits`, in ``a``'s floating dtype (a float64
    ``a`` is first rounded to float32, the dtype the kernels read)."""
    a = np.asarray(a)
    values = (bf16_bits(a).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values.astype(a.dtype, copy=False)
