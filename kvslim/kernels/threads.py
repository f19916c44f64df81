"""Helper threads of the fused CPU kernels (attention, quantized matmuls).

Daemon threads join the calling thread in one nogil work loop per job; the loop claims
items with ``ggml.fetch_add``. Unlike an OpenMP parallel region, nobody waits for a thread
that has not started: on a busy machine a late helper finds the items gone. One pool
serves every kernel family (their jobs never nest, and one set of threads is all a
machine's cores can run), started on first use and dropped in a forked child (which has
none of the threads, and maybe a lock a thread held).

A decode step runs a few hundred short jobs (a layer's matmuls and attention, tens to
hundreds of microseconds each) with a little Python between them. Waking a sleeping
thread for each costs about as much as a small job (a futex wake, and on a virtual
machine an idle vCPU to bring back), so after a job a helper first spins, GIL-free, on
the job counter for ``KVSLIM_SPIN_US`` microseconds (default ``SPIN_US``; 0: sleep at
once) and only then sleeps on the condition. Between requests the helpers sleep. A job
that torch's own threads follow (a prefill tile dequantized for torch's GEMM) is run with
``linger=False``: its helpers sleep at once, leaving the cores to the GEMM.

A helper runs Python between jobs (taking the job, calling the kernel), and Python needs
the GIL, which the caller holds through its own Python between kernels. A helper that
wanted it then slept in the GIL's queue and woke tens of microseconds after the job had
begun (measured: a job of 8 x 50 us items took 255 us on two threads, not 200). So the
hand-over happens while the caller is inside a kernel, GIL-free: a job function takes
``(flag, gen, linger)`` before its own arguments, calls ``job_begins(flag, gen)`` first,
which makes the job visible to the spinning helpers only then, and ``job_ends(flag, gen,
linger)`` last, where a helper (``linger`` > 0; the caller passes 0) waits, GIL-free, for
the next job's ``job_begins`` before it returns to Python (the same job: 221 us).
"""
from __future__ import annotations

import os
import threading
import time

import numba
import numpy as np
from numba import njit

from kvslim import jit  # noqa: F401 - before any kernel compiles (kvslim.jit)
from kvslim.kernels.ggml import fetch_add, load_acquire

__all__ = ["Helpers", "pool", "threads", "job_begins", "job_ends", "first_in", "claims_first", "prepared", "first_done",
           "SPIN_US"]

SPIN_US = 300.0
SPIN_ENV = "KVSLIM_SPIN_US"


@njit(nogil=True, cache=True)
def _spin(flag, seen, iters):
    """Up to ``iters`` atomic reads of flag[0] while it equals ``seen``; the last value."""
    v = load_acquire(flag, 0)
    i = 0
    while v == seen and i < iters:
        v = load_acquire(flag, 0)
        i += 1
    return v


@njit(inline="always")
def job_begins(flag, gen):
    """A job function's first statement: job ``gen`` (0: one with no helpers) is visible
    to the spinning helpers from here, where its caller no longer holds the GIL."""
    if gen > load_acquire(flag, 0):
        flag[0] = gen


@njit(inline="always")
def first_in(counters):
    """Whether this thread is the job's first (counters[2]): it prepares what every item
    reads, then calls ``first_done``; any other thread waits here until it has (counters[3])
    and gets False. A job using it has four counters (0, 1: its items')."""
    if claims_first(counters):
        return True
    while not prepared(counters):
        pass
    return False


@njit(inline="always")
def claims_first(counters):
    """``first_in``'s claim: whether this thread is the first to arrive (it prepares)."""
    return fetch_add(counters, 2) == 0


@njit(inline="always")
def prepared(counters):
    """Whether the first thread has called ``first_done`` (what ``first_in``'s others wait for)."""
    return load_acquire(counters, 3) != 0


@njit(inline="always")
def first_done(counters):
    """The first thread's preparation is done: the waiting threads go on."""
    fetch_add(counters, 3)


@njit(inline="always")
def job_ends(flag, gen, linger):
    """A job function's last statement: on a helper (``linger`` > 0), up to ``linger``
    reads of the flag while no later job has begun (the helpers' own spin)."""
    _spin(flag, gen, linger)


def spin_us() -> float:
    """Microseconds a helper spins for the next job (``KVSLIM_SPIN_US``, else ``SPIN_US``)."""
    raw = os.environ.get(SPIN_ENV)
    try:
        us = SPIN_US if raw is None or not raw.strip() else float(raw)
    except ValueError:
        us = -1.0
    if not us >= 0:  # negative, NaN or not a number
        raise ValueError(f"{SPIN_ENV}={raw!r}: a number of microseconds (0: no spinning)")
    return us


def _iters_per_us() -> float:
    """Spin iterations per microsecond on this CPU (a 2 ms sample)."""
    flag = np.zeros(1, np.int64)
    _spin(flag, 0, 10)  # compile or load
    n = 200_000
    for _ in range(8):  # grow until the sample is long enough to time
        t0 = time.perf_counter()
        _spin(flag, 0, n)
        dt = time.perf_counter() - t0
        if dt > 2e-3:
            break
        n *= 4
    return n / max(dt * 1e6, 1e-3)


class Helpers:
    """Daemon threads that join the caller in one nogil work loop per job."""

    def __init__(self, n: int, name: str, spin: float = 0.0):
        self.n = n
        self._cond = threading.Condition()
        self._job, self._gen = None, 0
        self._flag = np.zeros(1, np.int64)  # the job counter, as the spinning helpers read it
        self._spin_iters = int(spin * _iters_per_us()) if spin > 0 and n > 0 else 0
        self._lock = threading.Lock()  # one job at a time: callers on several threads queue
        for _ in range(n):
            threading.Thread(target=self._loop, daemon=True, name=name).start()

    def _loop(self) -> None:
        seen, linger = 0, False
        while True:
            if linger:
                _spin(self._flag, seen, self._spin_iters)
            with self._cond:
                while self._gen == seen:
                    self._cond.wait()
                seen, (fn, args, linger) = self._gen, self._job
            linger = linger and self._spin_iters > 0
            fn(self._flag, seen, self._spin_iters if linger else 0, *args)

    def run(self, fn, args: tuple, helpers: int, finish, finish_args: tuple,
            linger: bool = True) -> None:
        """fn(flag, gen, 0, *args) on the caller's thread and fn(flag, gen, linger, *args)
        on up to ``helpers`` more (waking only threads the work can use; a spinning one
        may join any job and find its items taken), then finish(*finish_args) on the
        caller's. fn begins with ``job_begins`` and ends with ``job_ends``.

        linger=False: the helpers go to sleep when this job is done instead of spinning
        for the next one, for a job that torch's own threads follow (a prefill tile is
        dequantized, then multiplied by torch's GEMM): a helper spinning on one of the
        cores would take it from the GEMM (measured: SmolLM2's 512-token prefill 8-11%
        slower with the spin)."""
        with self._lock:
            gen = 0
            if helpers > 0:
                with self._cond:
                    self._gen += 1
                    gen, self._job = self._gen, (fn, args, linger)
                    self._cond.notify(helpers)
            fn(self._flag, gen, 0, *args)
            finish(*finish_args)


_POOL: list[Helpers] = []
os.register_at_fork(after_in_child=_POOL.clear)


def threads() -> int:
    """Threads a kernel job runs on: numba's thread count (the caller included)."""
    return max(1, numba.config.NUMBA_NUM_THREADS)


def pool() -> Helpers:
    """The kernels' helper threads: ``threads() - 1`` besides the caller, every family's."""
    if not _POOL:
        _POOL.append(Helpers(threads() - 1, "kvslim-kernels", spin_us()))
    return _POOL[0]
