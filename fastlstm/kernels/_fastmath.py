"""The fast-math flags of the Numba kernels: one set per kind of kernel, named by what it allows.

Neither set lets LLVM assume away NaN or infinity (``nnan``, ``ninf``): a
diverging step must still come out non-finite, so that it is seen and undone.

Numba's cache does not key a kernel on its flags, only on its own bytecode;
this file is one of the kernel sources whose hash stamps every cached kernel
(:mod:`._numba_cache`), so editing a set here recompiles them.
"""

#: Kernels that inline :mod:`.activations_cpu`'s float32 sigmoid and tanh (the LSTM layers).
#: LLVM may contract into FMAs, ignore the sign of zero, use reciprocals and approximate
#: library functions, but not reassociate: that folds the two-part ``ln 2`` of the
#: activations' range reduction into one rounded product (``tests/test_activations.py``
#: compiles them with this set and bounds their error).
NO_REASSOC = {"nsz", "arcp", "contract", "afn"}

#: Kernels with no exp in them (the GEMM, the head's dot products): reassociating is safe
#: there, and the dot products vectorise only where LLVM may reorder their sums.
REASSOC = NO_REASSOC | {"reassoc"}
