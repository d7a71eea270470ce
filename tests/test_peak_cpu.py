"""The per-instruction peak probes, and what the CPU backend tells a user from them."""

import os
import subprocess
import sys
import threading
import warnings

import pytest

from fastlstm.backends.cpu import CPUBackend
from fastlstm.kernels import gemm_bf16_cpu, peak_cpu

needs_bf16 = pytest.mark.skipif(not gemm_bf16_cpu.available(),
                                reason="this CPU (Numba's target) lacks AVX512-BF16 (vdpbf16ps)")


def _built_for(cpu, script, on, avx512=True):
    """What ``script`` prints, run by a Python whose Numba builds for ``cpu`` with the
    host's features, those in ``on`` added (``avx512=False``: every AVX-512 one removed
    first).  Compiled only: this machine need not be that CPU."""
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not avx512:
        for name in [name for name in features if name.startswith("avx512")]:
            features[name] = False
    for name in on:
        features[name] = True
    env = {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features.flatten()}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout

PROBE_ASM = """
from numba import types
from fastlstm.kernels.peak_cpu import CHAINS, _probe
run = _probe({op!r}, 16)
run.compile((types.int64,))
asm = "\\n".join(run.inspect_asm().values())
ops = [line for line in asm.splitlines() if {mnemonic!r} in line]
print(len(ops), sum("zmm" in line for line in ops), CHAINS)
"""


@pytest.mark.parametrize("op, mnemonic, feature", [("fma", "vfmadd", "avx512f"),
                                                   ("dpbf16", "vdpbf16ps", "avx512bf16")])
def test_the_probes_use_whole_registers_where_llvm_prefers_halves(op, mnemonic, feature):
    """Built for an Intel server core (LLVM's vectoriser prefers 256-bit vectors there), each
    probe still computes in 512-bit registers only, at least one instruction per chain (LLVM
    unrolls the rounds).  Compiled only, never run: this machine need not be that CPU."""
    out = _built_for("sapphirerapids", PROBE_ASM.format(op=op, mnemonic=mnemonic),
                     on=("avx512f", "avx512bw", "avx512vl", feature))
    count, full_width, chains = map(int, out.split())
    assert count == full_width >= chains


PROBE_STACK = """
from numba import types
from fastlstm.kernels.peak_cpu import CHAINS, _probe
run = _probe("fma", {lanes})
run.compile((types.int64,))
asm = "\\n".join(run.inspect_asm().values()).splitlines()
print(sum("vfmadd" in line for line in asm),
      sum("(%rsp)" in line and ("ymm" in line or "zmm" in line) for line in asm), CHAINS)
"""


@pytest.mark.parametrize("cpu, avx512, lanes", [("haswell", False, 8), ("znver3", False, 8),
                                                ("sapphirerapids", True, 16)])
def test_the_fma_probe_keeps_its_chains_in_registers(cpu, avx512, lanes):
    """Built for AVX2 (16 vector registers) and for AVX-512 (32), the probe's accumulators
    are never moved to or from the stack: a spilled probe times the stores, and read half
    of a Zen 3 core's peak.  Compiled only, never run."""
    on = ("avx", "avx2", "fma") + (("avx512f", "avx512bw", "avx512vl", "avx512dq") if avx512
                                   else ())
    out = _built_for(cpu, PROBE_STACK.format(lanes=lanes), on=on, avx512=avx512)
    fmas, stack_moves, chains = map(int, out.split())
    assert fmas >= chains and stack_moves == 0


def test_the_fma_peak_is_a_rate():
    assert 1 < peak_cpu.peak_gflops("fma", samples=3, seconds=0.005) < 1e5


def test_threads_at_once_each_run_the_probe_together():
    # no ratio of rates is asserted (machines share cores): each thread runs it once, and
    # none finishes before every one has started
    started, lock = [], threading.Lock()
    barrier = threading.Barrier(3, timeout=10)

    def run(rounds):
        with lock:
            started.append(threading.get_ident())
        barrier.wait()  # fails unless all three run at the same time
    assert peak_cpu._seconds(run, 1, threads=3) >= 0
    assert len(set(started)) == 3
    assert 1 < peak_cpu.peak_gflops("fma", samples=3, seconds=0.005, threads=3) < 1e5


def test_an_error_in_a_thread_of_the_probe_is_raised():
    def run(rounds):
        raise RuntimeError("probe failed")
    with pytest.raises(RuntimeError, match="probe failed"):
        peak_cpu._seconds(run, 1, threads=2)


VECTOR_BITS_ASM = """
from numba import njit, types
from fastlstm.kernels._cpu_features import prefer_vector_bits
from fastlstm.kernels._fastmath import NO_REASSOC
from fastlstm.kernels.activations_cpu import sigmoid

def narrow(z, out):
    prefer_vector_bits(256)
    for j in range(z.shape[0]):
        out[j] = sigmoid(z[j])

def wide(z, out):
    prefer_vector_bits(512)
    for j in range(z.shape[0]):
        out[j] = sigmoid(z[j])

for fn in (narrow, wide):
    kernel = njit(fastmath=NO_REASSOC, error_model="numpy")(fn)  # as the kernels are
    kernel.compile((types.float32[::1], types.float32[::1]))
    divisions = [line for line in "\\n".join(kernel.inspect_asm().values()).splitlines()
                 if "vdivps" in line]
    print(sum("zmm" in line for line in divisions), sum("ymm" in line for line in divisions))
"""


@pytest.mark.parametrize("cpu", ["sapphirerapids", "znver4"])
def test_prefer_vector_bits_sets_the_width_of_the_gate_math(cpu):
    """A loop of sigmoids (the LSTM kernels' gate math) in 256-bit registers with
    ``prefer_vector_bits(256)``, in 512-bit ones with 512, on an Intel server core (whose
    tuning LLVM has prefer 256) and on AMD's Zen 4 (512).  Compiled only, never run."""
    out = _built_for(cpu, VECTOR_BITS_ASM, on=("avx512f", "avx512bw", "avx512vl", "avx512dq"))
    (narrow_zmm, narrow_ymm), (wide_zmm, wide_ymm) = (map(int, line.split())
                                                      for line in out.split("\n")[:2])
    assert narrow_zmm == 0 < narrow_ymm and wide_ymm == 0 < wide_zmm


@needs_bf16
def test_the_bf16_peak_is_a_rate_and_compared_with_float32s():
    assert 1 < peak_cpu.peak_gflops("dpbf16", samples=3, seconds=0.005) < 1e5
    assert 0 < peak_cpu.bf16_over_float32() < 10


def test_without_avx512_bf16_there_is_no_bf16_peak(monkeypatch):
    monkeypatch.setattr(gemm_bf16_cpu, "available", lambda: False)
    with pytest.raises(ValueError, match="AVX512-BF16"):
        peak_cpu.peak_gflops("dpbf16")


@needs_bf16
@pytest.mark.parametrize("ratio, warns", [(0.45, True), (1.9, False)])
def test_bfloat16_where_it_cannot_be_faster_says_so(ratio, warns, monkeypatch):
    monkeypatch.setattr(peak_cpu, "bf16_over_float32", lambda: ratio)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CPUBackend(1, precision="bfloat16")
        CPUBackend(1)  # float32: nothing to say
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        assert len(said) == 1 and "0.45x" in said[0] and "precision='float32'" in said[0]
    else:
        assert not said
