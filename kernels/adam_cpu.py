"""Numba kernel of the Adam update over the one flat parameter buffer."""

import math

from numba import njit


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, grad_scale, step):
    """One fused pass of ``torch.optim.Adam`` (L2 ``weight_decay``, bias-corrected).

    The gradient used is ``grad_scale * grads + weight_decay * params``; ``step``
    is the 1-based count of this update.
    """
    step_size = lr / (1.0 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for n in range(params.shape[0]):
        g = grad_scale * grads[n] + weight_decay * params[n]
        m_n = beta1 * m[n] + (1.0 - beta1) * g
        v_n = beta2 * v[n] + (1.0 - beta2) * g * g
        m[n] = m_n
        v[n] = v_n
        params[n] -= step_size * m_n / (math.sqrt(v_n) / bias_correction2_sqrt + eps)
