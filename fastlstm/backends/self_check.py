"""A backend's self-check: a tiny forward and backward against the NumPy reference.

``get_backend("cuda")`` and ``get_backend("auto")`` run it once per process before they hand
out the CUDA backend, so that a GPU stack that loads but computes wrongly (a driver, CuPy or
NVRTC that miscompiles or mislaunches our kernels) is caught before a model trains on it:
``"cuda"`` then raises with the reason, ``"auto"`` warns with it and runs on the CPU.

The reference (plain NumPy, the project's oracle) is the other side rather than the Numba
backend, because it needs no compilation: the check takes milliseconds, cold or warm.  The
problem is small but walks every kind of kernel a training step launches: two layers (the
second reads the first's states), one of them bidirectional, ragged lengths (packed steps,
the sorted rows), a partial warp of rows.
"""

from __future__ import annotations

import numpy as np

from ..model import ModelSpec

__all__ = ["self_check", "TOLERANCE"]

#: relative error allowed in float32 (the reference runs in float64); the backends' parity
#: tests hold float32 to 1e-4 as well
TOLERANCE = 1e-4


def _relative_error(got, want):
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale


def _run(backend, spec, params, x, y, lengths, dtype):
    p = backend.asarray(params.astype(dtype))
    outputs, cache = backend.forward(spec, p, backend.asarray(x.astype(dtype)), train=True,
                                     lengths=lengths)
    loss, doutputs = backend.loss(outputs, backend.asarray(y), "cross_entropy")
    grads = backend.backward(spec, p, cache, doutputs)
    return dict(outputs=backend.to_host(outputs), loss=np.asarray(float(loss)),
                gradients=backend.to_host(grads.params))


def self_check(backend):
    """``None`` where ``backend`` agrees with the reference on a tiny problem, else why not.

    Returns
    -------
    str or None
        A sentence saying what failed or disagreed (and by how much), or ``None``.
    """
    from .reference import ReferenceBackend

    rng = np.random.default_rng(0)
    spec = ModelSpec(input_size=3, hidden_size=5, num_layers=2, output_size=3,
                     bidirectional=True)
    params = spec.layout.init(0, np.float64)
    x = rng.standard_normal((5, 4, 3))
    y = np.array([0, 2, 1, 1, 0])
    lengths = np.array([4, 2, 3, 1, 4])
    want = _run(ReferenceBackend(), spec, params, x, y, lengths, np.float64)
    try:
        got = _run(backend, spec, params, x, y, lengths, np.float32)
    except Exception as exc:
        return f"its self-check failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    for name, expected in want.items():
        error = _relative_error(got[name], expected)
        if not error <= TOLERANCE:  # NaN too
            return (f"its self-check disagrees with the NumPy reference: {name} off by "
                    f"{error:.1e} (relative; allowed {TOLERANCE:.0e})")
    return None
