"""Helper threads of the fused CPU kernels (attention, quantized matmuls).

Daemon threads join the calling thread in one nogil work loop per job; the loop claims
items with ``ggml.fetch_add``. Unlike an OpenMP parallel region, nobody waits for a thread
that has not started: on a busy machine a late helper finds the items gone. One pool per
kernel family, started on first use and dropped in a forked child (which has none of the
threads, and maybe a lock a thread held).
"""
from __future__ import annotations

import os
import threading

import numba

__all__ = ["Helpers", "pool", "threads"]


class Helpers:
    """Daemon threads that join the caller in one nogil work loop per job."""

    def __init__(self, n: int, name: str):
        self.n = n
        self._cond = threading.Condition()
        self._job, self._gen = None, 0
        self._lock = threading.Lock()  # one job at a time: callers on several threads queue
        for _ in range(n):
            threading.Thread(target=self._loop, daemon=True, name=name).start()

    def _loop(self) -> None:
        seen = 0
        while True:
            with self._cond:
                while self._gen == seen:
                    self._cond.wait()
                seen, (fn, args) = self._gen, self._job
            fn(*args)

    def run(self, fn, args: tuple, helpers: int, finish, finish_args: tuple) -> None:
        """fn(*args) on the caller's thread and up to ``helpers`` more (waking only threads
        the work can use), then finish(*finish_args) on the caller's."""
        with self._lock:
            if helpers > 0:
                with self._cond:
                    self._job, self._gen = (fn, args), self._gen + 1
                    self._cond.notify(helpers)
            fn(*args)
            finish(*finish_args)


_POOLS: dict[str, Helpers] = {}
os.register_at_fork(after_in_child=_POOLS.clear)


def threads() -> int:
    """Threads a kernel job runs on: numba's thread count (the caller included)."""
    return max(1, numba.config.NUMBA_NUM_THREADS)


def pool(name: str) -> Helpers:
    """The helper threads of one kernel family: ``threads() - 1`` besides the caller."""
    if name not in _POOLS:
        _POOLS[name] = Helpers(threads() - 1, f"kvslim-{name}")
    return _POOLS[name]
