"""Backends: one interface (:class:`Backend`), several implementations.

``get_backend(name)`` with ``name`` one of ``"reference"`` (plain NumPy, the
oracle), ``"cpu"`` (Numba kernels + BLAS), ``"cuda"`` (CUDA kernels through
CuPy) or ``"auto"`` (CUDA where usable, else CPU), computing in ``precision``
(:mod:`fastlstm.precision`): ``"bfloat16"`` is the CPU backend's alone.  The CUDA
backend is handed out only once it has passed its self-check in the process
(:func:`~fastlstm.backends.self_check.self_check`): a GPU stack that loads but
computes wrongly makes ``"cuda"`` raise with the reason, and ``"auto"`` run on
the CPU with a warning that gives it.

The CPU backend is shared per thread count: each call takes the instance for the
calling thread's budget (:func:`.cpu.default_num_threads`), so two tasks of one
process with different budgets (a Dask worker's, a joblib worker's) each keep to
their own.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

from ..precision import check_precision
from .base import LOSSES, AdamConfig, AdamState, Backend, BackendUnavailable, Gradients, get_loss

__all__ = ["AdamConfig", "AdamState", "Backend", "BackendUnavailable", "Gradients", "LOSSES",
           "available_backends", "get_backend", "get_loss", "BACKEND_NAMES"]

BACKEND_NAMES = ("reference", "cpu", "cuda")

_MODULES = {"reference": ("reference", "ReferenceBackend"),
            "cpu": ("cpu", "CPUBackend"),
            "cuda": ("cuda", "CUDABackend")}
#: the precisions each backend computes in (besides float64 parameters where it takes them)
_PRECISIONS = {"reference": ("float32",), "cpu": ("float32", "bfloat16"), "cuda": ("float32",)}
_instances: dict[str | tuple[str, int, str], Backend] = {}
#: why the CUDA backend failed its self-check in this process (it is not run again)
_failed_checks: dict[str, str] = {}
_warned_auto: list[str] = []


def _load(name, **kwargs):
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        if name == "cuda":
            raise BackendUnavailable(
                "the CUDA backend is not available: it needs CuPy and a CUDA GPU "
                "(pip install 'fastlstm[cuda12]' or 'fastlstm[cuda13]'); "
                f"import failed with: {exc}. Use device='cpu'.") from exc
        raise
    return getattr(module, class_name)(**kwargs)


def get_backend(name="auto", precision="float32"):
    """The backend called ``name``, computing in ``precision`` (instances are shared).

    ``"auto"`` is CUDA where usable, else the CPU; asked for ``precision="bfloat16"``, a
    usable CUDA backend refuses it rather than leaving the GPU for the CPU unasked.

    Raises
    ------
    ValueError
        ``name`` is not a backend name, or ``precision`` not one it computes in.
    BackendUnavailable
        ``name`` is ``"cuda"`` and no usable CuPy + GPU was found, or the CUDA backend
        failed its self-check (the message says why), or the CPU lacks the instruction
        set ``precision`` needs.
    """
    if isinstance(name, Backend):
        return name
    precision = check_precision(precision)
    if name == "auto":
        try:
            get_backend("cuda")
        except BackendUnavailable as exc:
            # Silent where there is no GPU stack at all; said once where one is installed but
            # unusable, since the user then expects the GPU.
            if _cupy_installed() and not _warned_auto:
                _warned_auto.append(str(exc))
                warnings.warn(f"fastlstm: device='auto' runs on the CPU: {exc}", RuntimeWarning,
                              stacklevel=2)
            return get_backend("cpu", precision)
        return get_backend("cuda", precision)
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES + ('auto',)}")
    if precision not in _PRECISIONS[name]:
        raise ValueError(f"the {name} backend does not compute in precision={precision!r} "
                         f"(only in {_PRECISIONS[name]}; bfloat16 is the CPU backend's): use "
                         "precision='float32', or the CPU backend")
    if name == "cuda":
        return _checked_cuda()
    key, kwargs = name, {}
    if name == "cpu":  # one instance per thread budget, read at each call, and precision
        from .cpu import default_num_threads
        num_threads = default_num_threads()
        key, kwargs = (name, num_threads, precision), dict(num_threads=num_threads,
                                                           precision=precision)
    if key not in _instances:
        # setdefault: two threads that both load keep one instance
        _instances.setdefault(key, _load(name, **kwargs))
    return _instances[key]


def _cupy_installed():
    try:
        return importlib.util.find_spec("cupy") is not None
    except ValueError:  # a module of that name is loaded without a spec: it is there
        return True


def _checked_cuda():
    """The shared CUDA backend, once it has passed its self-check in this process."""
    if "cuda" in _failed_checks:
        raise BackendUnavailable(_failed_checks["cuda"])
    if "cuda" not in _instances:
        from .self_check import self_check
        backend = _load("cuda")
        reason = self_check(backend)
        if reason is not None:
            _failed_checks["cuda"] = (f"the CUDA backend loads but is not usable here: {reason}. "
                                      "Use device='cpu'.")
            raise BackendUnavailable(_failed_checks["cuda"])
        _instances.setdefault("cuda", backend)
    return _instances["cuda"]


def available_backends():
    """Names of the backends that can run here, reference first."""
    names = []
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names
