"""Numba's on-disk cache, keyed on ALL the Numba kernels of this folder.

Numba keys a cached function on its own source file only, but a kernel's
machine code also holds the kernels it calls from other files (``lstm_cpu``
inlines ``gemm_cpu`` and ``activations_cpu``).  After an edit of
``gemm_cpu.py`` alone, ``lstm_cpu``'s cache would keep running the old GEMM.
The locators installed here give every function of this folder one stamp: the
hash of all its ``*.py`` files, so any change recompiles them all.

They extend Numba's own locators (``NUMBA_CACHE_DIR`` if set, else the package
folder, else the user's cache folder) through ``numba.core.caching``, which is
not a public API: where it differs, nothing is installed and Numba's per-file
stamps apply.
"""

import functools
import hashlib
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent


def sources_stamp(paths):
    """SHA-256 over the names and contents of ``paths``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def kernels_stamp():
    """The stamp of the Numba kernels of this folder (computed once per process)."""
    return sources_stamp(KERNELS_DIR.glob("*.py"))


def _folder_wide(locator_class):
    """``locator_class`` for the functions of this folder, stamped with :func:`kernels_stamp`."""
    class FolderWideLocator(locator_class):
        @classmethod
        def from_function(cls, py_func, py_file):
            if Path(py_file).resolve().parent != KERNELS_DIR:
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return kernels_stamp()

    FolderWideLocator.__name__ = f"FolderWide{locator_class.__name__}"
    return FolderWideLocator


def install():
    """Put a folder-wide variant of each of Numba's source-file locators (``NUMBA_CACHE_DIR``,
    the package folder, the user's cache folder) ahead of them, in their order."""
    try:
        from numba.core.caching import CacheImpl, _SourceFileBackedLocatorMixin
        classes = CacheImpl._locator_classes
        classes[:0] = [_folder_wide(c) for c in classes
                       if issubclass(c, _SourceFileBackedLocatorMixin)]
    except (ImportError, AttributeError):
        pass
