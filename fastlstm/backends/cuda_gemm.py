"""GEMMs of the CUDA backend: row-major operands in device memory, one interface.

Every implementation has ``gemm(c, a, b, ta=False, tb=False, accumulate=False)``:
``c = op(a) @ op(b)`` (``c += ...`` where ``accumulate``), ``op`` transposing where ``ta`` /
``tb``, on :class:`Mat` views, on CuPy's current stream, in the operands' precision (float32
accumulates in float32, no TF32).
"""

from __future__ import annotations

__all__ = ["Mat"]


class Mat:
    """A row-major matrix in device memory: pointer, shape and leading dimension (in elements)."""

    __slots__ = ("ptr", "rows", "cols", "ld")

    def __init__(self, ptr, rows, cols, ld):
        self.ptr, self.rows, self.cols, self.ld = int(ptr), int(rows), int(cols), int(ld)

    @classmethod
    def of(cls, a, rows=None, cols=None, ld=None, offset=0):
        """``a`` (C-contiguous, any shape) seen as ``rows x cols`` with ``ld``, from ``offset``."""
        if rows is None:
            rows, cols = a.shape
        return cls(a.data.ptr + offset * a.itemsize, rows, cols, cols if ld is None else ld)

    def shape(self, trans):
        return (self.cols, self.rows) if trans else (self.rows, self.cols)
