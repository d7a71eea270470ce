"""One core's arithmetic peak per instruction: the most a GEMM on that instruction can reach.

:func:`peak_gflops` times a loop of :data:`CHAINS` independent accumulators, each updated
by one instruction per round, in registers: ``"fma"`` (a float32 fused multiply-add in
registers of the target's full width), ``"mul_add"`` (a multiply, then an add: a target
without FMA) or ``"dpbf16"`` (``vdpbf16ps``: two bfloat16 products added to each of 16
float32 lanes, AVX512-BF16).  :func:`bf16_over_float32` compares the last with the first:
where ``vdpbf16ps`` is no faster than float32's multiply-adds, bfloat16's GEMMs cannot beat
float32's (the backend says so when asked for bfloat16 there).
``benchmarks/floor.py`` reports the figures of a run against these peaks.

The loop is written as LLVM vector IR, not as a loop for LLVM to vectorise: on Intel's server
cores LLVM's vectoriser prefers 256-bit vectors even where the registers have 512 bits, and a
loop-written probe measured half the peak there, below OpenBLAS's own rate.
"""

import functools
import threading
import time

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu_features import has_fma, vector_bits

#: independent accumulators: a core with two FMA units of 4 or 5 cycles' latency needs 8 or
#: 10 to keep both busy.  They must fit in the vector registers beside the two constants, or
#: LLVM spills them to the stack and the probe times the stores: 16 in AVX2's 16 registers
#: read half of a Zen 3 core's peak, less than its GEMMs ran at (``benchmarks/RESULTS.md``,
#: 2026-12-02 night).  ``tests/test_peak_cpu.py`` checks that they stay in registers, on
#: AVX2 and AVX-512 (32 registers).
CHAINS = 16 if vector_bits() >= 512 else 12
#: multiply-adds per lane and update, by instruction (``vdpbf16ps``: a pair)
_PRODUCTS = {"fma": 1, "mul_add": 1, "dpbf16": 2}


@functools.lru_cache(maxsize=None)
def _probe(op, lanes):
    """A jitted ``run(rounds)``: the loop of ``op`` on ``lanes`` float32 lanes (see the
    module's docstring)."""
    @intrinsic
    def chains(typingctx, rounds):
        def codegen(context, builder, sig, args):
            vty = ir.VectorType(ir.FloatType(), lanes)
            if op == "dpbf16":
                from .gemm_bf16_cpu import _bf16_vector
                pairs = ir.VectorType(ir.IntType(32), lanes)  # bfloat16 pairs (0.999, 1e-3)
                a, b = (builder.bitcast(ir.Constant(pairs, [bits] * lanes), _bf16_vector())
                        for bits in (0x3F7F3F7F, 0x3A833A83))
                fn = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vty, [vty, a.type, a.type]),
                    "llvm.x86.avx512bf16.dpbf16ps.512")
                update = lambda value: builder.call(fn, [value, a, b])  # noqa: E731
            else:
                a, b = ir.Constant(vty, [0.999] * lanes), ir.Constant(vty, [1e-3] * lanes)
                fn = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{lanes}f32")
                update = (lambda value: builder.call(fn, [value, a, b])) if op == "fma" else \
                    (lambda value: builder.fadd(builder.fmul(value, a), b))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [1 + i / 64] * lanes))
                    for i in range(CHAINS)]
            with cgutils.for_range(builder, args[0]):
                for acc in accs:
                    builder.store(update(builder.load(acc)), acc)
            total = builder.load(accs[0])
            for acc in accs[1:]:  # the result depends on every chain: none is optimised away
                total = builder.fadd(total, builder.load(acc))
            return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
        return types.float32(rounds), codegen

    @njit(nogil=True)  # threads=: several at once
    def run(rounds):
        return chains(rounds)
    return run


def _seconds(run, rounds, threads):
    """Seconds of ``run(rounds)`` on ``threads`` threads started together: from the first
    one's start to the last one's end (an error in one is raised here)."""
    if threads == 1:
        start = time.perf_counter()
        run(rounds)
        return time.perf_counter() - start
    barrier = threading.Barrier(threads)
    spans, errors = [], []

    def work():
        try:
            barrier.wait()
            start = time.perf_counter()
            run(rounds)
            spans.append((start, time.perf_counter()))
        except BaseException as error:  # noqa: B036 (raised again below, in the caller)
            errors.append(error)
            barrier.abort()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def peak_gflops(op="fma", samples=7, seconds=0.02, threads=1):
    """One core's GFLOP/s on ``op`` alone (``"fma"``: ``"mul_add"`` where the target has no
    FMA): the fastest of ``samples`` runs of about ``seconds`` each, after as many untimed
    ones (a core may take a few tenths of a second to reach its full clock; a busy host only
    ever slows a sample down, so the fastest is the nearest to the peak).

    With ``threads`` > 1, the probe runs on that many threads at once and the figure is
    their sum: what the cores give together, which is less than ``threads`` times one
    core's where they share a physical core or a host.

    Raises
    ------
    ValueError
        ``op`` is ``"dpbf16"`` and Numba's target lacks AVX512-BF16.
    """
    if op == "fma" and not has_fma():
        op = "mul_add"
    if op == "dpbf16":
        from .gemm_bf16_cpu import available
        if not available():
            raise ValueError("the peak of vdpbf16ps needs a target with AVX512-BF16")
    lanes = 16 if op == "dpbf16" else max(vector_bits(), 128) // 32
    run = _probe(op, lanes)
    run(1)  # compile
    rounds = 1 << 14
    while True:  # rounds per sample, and the untimed warm-up
        if _seconds(run, rounds, 1) >= seconds:
            break
        rounds *= 2
    for _ in range(samples):
        _seconds(run, rounds, threads)
    fastest = min(_seconds(run, rounds, threads) for _ in range(samples))
    return 2 * CHAINS * lanes * _PRODUCTS[op] * rounds * threads / fastest / 1e9


@functools.lru_cache(maxsize=None)
def bf16_over_float32():
    """``vdpbf16ps``'s peak over float32's multiply-adds' on this core (measured once per
    process: two probes to compile and run), or ``None`` without AVX512-BF16."""
    from .gemm_bf16_cpu import available
    if not available():
        return None
    return peak_gflops("dpbf16") / peak_gflops("fma")
