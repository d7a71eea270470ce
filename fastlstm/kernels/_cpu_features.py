"""What the CPU Numba compiles for can do: it sets the register blocking of :mod:`.gemm_cpu`."""

import functools


@functools.lru_cache(maxsize=None)
def target_features():
    """The CPU features enabled in Numba's target machine, as a set of LLVM names.

    Numba's own target is read, so ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``
    (building for another CPU) are respected; Numba's cache is keyed on the same
    features, so a cached kernel always matches these.
    """
    from numba.core.registry import cpu_target
    features = getattr(cpu_target.target_context.codegen(), "_tm_features", None)
    if features is None:  # a Numba without this attribute: ask LLVM about the host
        import llvmlite.binding as llvm
        return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)
    return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))


def vector_bits():
    """Widest SIMD register of the target: 512 with AVX-512F, 256 with AVX, else 128."""
    features = target_features()
    if "avx512f" in features:
        return 512
    if "avx" in features:
        return 256
    return 128


def has_fma():
    """Whether the target has fused multiply-add instructions."""
    return "fma" in target_features()
