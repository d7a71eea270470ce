"""Numba kernel of the Adam update over the one flat parameter buffer."""

import math

from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, grad_scale, step):
    """One fused pass of ``torch.optim.Adam`` (L2 ``weight_decay``, bias-corrected).

    The gradient used is ``grad_scale * grads + weight_decay * params``; ``step``
    is the 1-based count of this update.  The arithmetic is in the dtype of
    ``params``, as in PyTorch and the NumPy reference (float64 arithmetic on
    float32 buffers was much slower: its square roots and divisions run on half
    as many lanes; ``python benchmarks/microbench.py --ops adam`` times it).
    """
    real = params.dtype.type
    step_size = real(lr / (1.0 - beta1 ** step))
    bias_correction2_sqrt = real(math.sqrt(1.0 - beta2 ** step))
    b1, b2, eps_, wd, scale = real(beta1), real(beta2), real(eps), real(weight_decay), real(grad_scale)
    one = real(1.0)
    for n in range(params.shape[0]):
        g = scale * grads[n] + wd * params[n]
        m_n = b1 * m[n] + (one - b1) * g
        v_n = b2 * v[n] + (one - b2) * g * g
        m[n] = m_n
        v[n] = v_n
        params[n] -= step_size * m_n / (math.sqrt(v_n) / bias_correction2_sqrt + eps_)
