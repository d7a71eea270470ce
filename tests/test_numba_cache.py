"""Numba's cache of the CPU kernels is keyed on every kernel source, not each file alone."""

import os
import subprocess
import sys
from pathlib import Path

from numba.core.registry import CPUDispatcher

from fastlstm.kernels import (_fastmath, _numba_cache, activations_cpu, adam_cpu, gemm_cpu,
                              head_cpu, lstm_cpu)


def cached_kernels():
    for module in (activations_cpu, adam_cpu, gemm_cpu, head_cpu, lstm_cpu):
        for value in vars(module).values():
            if isinstance(value, CPUDispatcher) and value._cache is not None and \
                    hasattr(value._cache, "_impl"):
                yield value


def test_every_cached_kernel_is_stamped_with_all_kernel_sources():
    kernels = list(cached_kernels())
    assert {k.__name__ for k in kernels} >= {"forward_layer", "backward_layer", "gemm",
                                             "adam_update", "cross_entropy"}
    for kernel in kernels:
        locator = kernel._cache._impl._locator
        assert type(locator).__name__.startswith("FolderWide"), kernel
        assert locator.get_source_stamp() == _numba_cache.kernels_stamp()


def test_the_fastmath_flags_are_in_the_stamp():
    # Numba's cache index holds a kernel's bytecode, not its flags: only the stamp sees an edit
    assert Path(_fastmath.__file__).resolve() in set(_numba_cache.KERNELS_DIR.glob("*.py"))


def test_the_stamp_follows_the_content_of_any_source(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = _numba_cache.sources_stamp([a, b])
    os.utime(b, (0, 0))  # a new time alone changes nothing
    assert _numba_cache.sources_stamp([b, a]) == before
    b.write_text("y = 3\n")
    assert _numba_cache.sources_stamp([a, b]) != before


def test_numba_cache_dir_is_still_honoured(tmp_path):
    code = ("from fastlstm.kernels import lstm_cpu; "
            "print(lstm_cpu.forward_layer._cache._impl._locator.get_cache_path())")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().startswith(str(tmp_path))
