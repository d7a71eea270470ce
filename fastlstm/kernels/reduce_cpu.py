"""Numba kernels that add up the CPU threads' partial weight gradients into the gradient buffer.

Each thread leaves the weight gradient of its rows transposed (``[x, h]^T @ dz``,
the shape the GEMM gives); the gradient buffer holds ``W_ih`` and ``W_hh`` in
PyTorch's layout.  One pass per output row sums the threads' parts in thread
order and writes the row, in less time than NumPy's in-place sum and
transposed copies took in the training step, which
``python benchmarks/forward_backward.py`` times.
"""

from numba import njit


@njit(cache=True, nogil=True)
def sum_transposed(parts, out):
    """``out[g, k] = parts[0, k, g] + parts[1, k, g] + ...`` (added in that order).

    ``parts`` is ``(W, K, G)``, its rows best padded off a power of two in length
    (the reads walk its columns); ``out`` is ``(G, K)``.
    """
    W, K, G = parts.shape
    for g in range(G):
        row = out[g]
        for k in range(K):
            row[k] = parts[0, k, g]
        for w in range(1, W):
            for k in range(K):
                row[k] += parts[w, k, g]


@njit(cache=True, nogil=True)
def sum_rows(parts, out):
    """``out = parts[0] + parts[1] + ...`` (added in that order) for ``(W, N)`` ``parts``."""
    W, N = parts.shape
    for n in range(N):
        out[n] = parts[0, n]
    for w in range(1, W):
        for n in range(N):
            out[n] += parts[w, n]
