"""A team of threads that run one job together, handed over by spinning instead of sleeping.

The CPU backend runs each training step (and each inference call) as one job
on all its threads.  With a thread pool that sleeps between jobs, the second
thread of a step started about 90 us after the first (an OS wake-up, on the
project's machine): 1% of a step.  Here the helpers spin on a flag
(:mod:`fastlstm.kernels.spin_cpu`, no GIL held) for a while after each job,
and only then sleep on a condition; the caller likewise spins for the helpers
to finish.  Spinning is bounded (:data:`SPIN_ROUNDS`), so an idle team uses no
CPU.
"""

from __future__ import annotations

import os
import threading
import weakref

from ..kernels import spin_cpu

#: spin rounds before sleeping: about a millisecond (x86 ``pause`` takes 30-150
#: cycles).  That covers the serial end of a training step and the estimator's
#: work between two steps, so the helpers of a training loop never sleep.
SPIN_ROUNDS = 30_000


class _Shared:
    """What the caller and the helper threads share (the helpers hold no reference to the team,
    so that dropping the team stops them)."""

    def __init__(self, size):
        self.go = spin_cpu.new_flags(size)       # job count handed to each helper
        self.done = spin_cpu.new_flags(size)     # job count each helper has finished
        self.job = None
        self.errors = [None] * size
        self.stop = False
        self.wake = threading.Condition()
        self.finished = threading.Condition()


def _serve(shared, worker):
    """A helper's life: wait for the next job (spin, then sleep), run its part, report."""
    count = 0
    while True:
        count += 1
        flag = shared.go[worker]
        if not spin_cpu.wait_for(flag, count, SPIN_ROUNDS):
            with shared.wake:
                while spin_cpu.read(flag) < count:
                    shared.wake.wait()
        if shared.stop:
            return
        try:
            shared.job(worker)
        except BaseException as exc:  # handed to the caller, which raises it
            shared.errors[worker] = exc
        spin_cpu.publish(shared.done[worker], count)
        with shared.finished:
            shared.finished.notify_all()


def _stop(shared, threads):
    shared.stop = True
    for worker in range(1, len(threads) + 1):
        spin_cpu.publish(shared.go[worker], spin_cpu.read(shared.go[worker]) + 1)
    with shared.wake:
        shared.wake.notify_all()


class Team:
    """The calling thread and ``size - 1`` helper threads, started on first use.

    ``run(job)`` calls ``job(worker)`` for ``worker`` in ``range(size)``, worker 0
    on the calling thread, and returns when all have returned; an exception
    raised by any part is raised again by ``run``.  One job at a time: a
    caller that finds the team busy (another thread of the program is running
    a job) runs every part itself, one after the other.  After a ``fork`` the
    child starts its own helpers.
    """

    def __init__(self, size):
        self.size = int(size)
        self._lock = threading.Lock()
        self._pid = None
        self._shared = None
        self._count = 0

    def _start(self):
        shared = _Shared(self.size)
        threads = [threading.Thread(target=_serve, args=(shared, w), daemon=True,
                                    name=f"fastlstm-{w}") for w in range(1, self.size)]
        for thread in threads:
            thread.start()
        weakref.finalize(self, _stop, shared, threads)
        self._shared, self._pid, self._count = shared, os.getpid(), 0

    def run(self, job):
        if self.size == 1 or not self._lock.acquire(blocking=False):
            for worker in range(self.size):
                job(worker)
            return
        try:
            if self._pid != os.getpid():  # first use, or a forked child: no helpers yet
                self._start()
            shared = self._shared
            self._count += 1
            count = self._count
            shared.job = job
            for worker in range(1, self.size):
                spin_cpu.publish(shared.go[worker], count)
            with shared.wake:
                shared.wake.notify_all()
            error = None
            try:
                job(0)
            except BaseException as exc:
                error = exc
            for worker in range(1, self.size):
                flag = shared.done[worker]
                if not spin_cpu.wait_for(flag, count, SPIN_ROUNDS):
                    with shared.finished:
                        while spin_cpu.read(flag) < count:
                            shared.finished.wait()
            shared.job = None
            for worker in range(1, self.size):
                error = error or shared.errors[worker]
                shared.errors[worker] = None
            if error is not None:
                raise error
        finally:
            self._lock.release()
