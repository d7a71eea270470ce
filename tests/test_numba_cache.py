"""Numba's cache of the CPU kernels is keyed on every kernel source, not each file alone."""

import os

from numba.core.registry import CPUDispatcher

from fastlstm.kernels import _numba_cache, activations_cpu, adam_cpu, gemm_cpu, head_cpu, lstm_cpu


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


def test_the_stamp_follows_the_content_of_any_source(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = _numba_cache.sources_stamp([a, b])
    os.utime(b, (0, 0))  # a new time alone changes nothing
    assert _numba_cache.sources_stamp([b, a]) == before
    b.write_text("y = 3\n")
    assert _numba_cache.sources_stamp([a, b]) != before
