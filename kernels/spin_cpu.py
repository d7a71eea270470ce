"""Flags shared between threads, and a bounded spin-wait on them, in code that holds no GIL.

Handing a job to a thread that sleeps on a lock costs an OS wake-up: on the
project's machine a job for two threads lost 67 us to it, and a training step
lost about 90 us before its second thread started.  A thread that expects
work soon spins on a flag instead, for a bounded number of rounds, then falls
back to sleeping (:mod:`fastlstm.backends.team`).

A flag is the first int64 of its own 64-byte row (no two flags share a cache
line).  Flags count up: the publisher stores a new count with release order,
the waiter loads with acquire order until the count reaches what it waits for,
so everything written before the store is seen after the wait.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: int64 slots per flag: one cache line
FLAG_STRIDE = 8
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def new_flags(count):
    """``count`` flags, all at zero: pass ``flags[i]`` to the functions below."""
    return np.zeros((count, FLAG_STRIDE), np.int64)


def _first_element_pointer(context, builder, arr_ty, arr_v):
    arr = context.make_array(arr_ty)(context, builder, arr_v)
    return arr.data


@intrinsic
def _load_acquire(typingctx, flag):
    def codegen(context, builder, signature, args):
        ptr = _first_element_pointer(context, builder, signature.args[0], args[0])
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(flag), codegen


@intrinsic
def _store_release(typingctx, flag, value):
    def codegen(context, builder, signature, args):
        ptr = _first_element_pointer(context, builder, signature.args[0], args[0])
        builder.store_atomic(args[1], ptr, "release", 8)
        return context.get_dummy_value()
    return types.void(flag, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """The spin-loop hint of x86 (``pause``): the core yields to its sibling and saves power."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True, nogil=True)
def publish(flag, count):
    """Set ``flag`` to ``count``; what this thread wrote before is visible to its waiters."""
    _store_release(flag, np.int64(count))


@njit(cache=True, nogil=True)
def read(flag):
    """The count of ``flag`` now."""
    return _load_acquire(flag)


@njit(cache=True, nogil=True)
def wait_for(flag, count, rounds):
    """Spin until ``flag`` reaches ``count``, at most ``rounds`` times; whether it did."""
    for _ in range(rounds):
        if _load_acquire(flag) >= count:
            return True
        _pause()
    return _load_acquire(flag) >= count
