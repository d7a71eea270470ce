"""What the CPU Numba compiles for can do: it sets the register blocking of :mod:`.gemm_cpu`."""

import functools

from numba import types
from numba.extending import intrinsic


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


@intrinsic(prefer_literal=True)
def prefer_vector_bits(typingctx, bits):
    """Let LLVM's loop vectoriser use vectors of ``bits`` bits (a constant: 256 or 512) in
    the function being compiled (a call to this is the first statement of a kernel).

    LLVM tunes for Intel's server cores with AVX-512 (Skylake-X to Emerald Rapids) to
    *prefer* 256-bit vectors, against the frequency drop of heavy 512-bit code on the
    oldest of them, and for AMD's Zen 4 and 5 to prefer 512: the LSTM's gate math ran in
    256-bit registers beside the GEMM's 512-bit ones on the one, and small layers left
    most of their units to the loops' scalar remainder on the other.  The function
    attribute ``prefer-vector-width`` overrides the tuning for one function, and the
    loops inlined into it; set only where the target has AVX-512 (with at most 256 bits
    there is no choice).  ``python benchmarks/vector_width.py`` times the LSTM kernels
    at both widths; ``tests/test_peak_cpu.py`` checks the registers each width compiles to.
    """
    if not isinstance(bits, types.IntegerLiteral) or bits.literal_value not in (256, 512):
        return None  # a typing error: only the constants 256 and 512
    width = bits.literal_value

    def codegen(context, builder, sig, args):
        if vector_bits() >= 512:
            # a string attribute, which llvmlite's checked ``add`` does not know
            set.add(builder.function.attributes, f'"prefer-vector-width"="{width}"')
        return context.get_dummy_value()
    return types.void(bits), codegen
