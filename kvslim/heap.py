"""The CPU process's heap during a prompt: large activations as mappings of their own.

A prompt's activations (tens of MB each on a 1B model) are freed after each layer, and
glibc's allocator keeps freed memory for reuse: once a large block has been freed it
raises its mapping threshold to that size, later blocks come from the heap, and the heap
does not shrink. A 512-token prompt on the synthetic Llama-3.2-1B Q4_K_M left the process
at 1.4-1.9 GB where 1.1 GB was in use (``benchmarks/README.md``, "Heap memory during
prefill"). So on CPU an engine sets glibc's mapping threshold to ``MMAP_THRESHOLD`` once
(``mallopt``; this also fixes glibc's trim threshold): a block that large is mapped on
allocation and unmapped on free. Each such block's pages fault in fresh, which cost 15-18%
of prefill speed in 4 KiB pages; torch maps its blocks of 2 MiB and more in huge pages
when ``THP_MEM_ALLOC_ENABLE`` is set, which ``kvslim/__init__`` sets by default (it takes
effect where kvslim is imported before torch allocates, as the CLI always is).

Blocks below the threshold (a layer's smaller activations, numpy temporaries, Python
objects) still come from glibc's heaps, which keep what a prompt freed: 18-31 MB after a
512-token prompt of that 1B model. ``trim`` hands such free pages back (``malloc_trim``,
2-4 ms); the engine calls it after a step that evaluated ``TRIM_MIN_ROWS`` prompt rows
or more.

``KVSLIM_HEAP=glibc`` leaves the allocator as it is (all three); ``mapped`` (the
default) is the above.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["ENV", "MODES", "MMAP_THRESHOLD", "TRIM_MIN_ROWS", "mode", "tune", "trim",
           "huge_pages_default"]

ENV = "KVSLIM_HEAP"
MODES = ("mapped", "glibc")
MMAP_THRESHOLD = 4 << 20  # bytes; 1 MiB measured no lower, 16 MiB kept ~300 MB more
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
TRIM_MIN_ROWS = 64  # prompt rows in a step from which the engine trims after it
_DONE: list[int] = []


def _setting() -> str:
    return os.environ.get(ENV, "").strip().lower() or "mapped"


def mode() -> str:
    """``KVSLIM_HEAP``: mapped (the default) or glibc."""
    raw = _setting()
    if raw not in MODES:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: choose from {', '.join(MODES)}")
    return raw


def huge_pages_default() -> None:
    """``THP_MEM_ALLOC_ENABLE=1`` unless the user set it or ``KVSLIM_HEAP=glibc`` (run at
    ``import kvslim``, before torch allocates; a bad setting is reported by ``tune``)."""
    if _setting() != "glibc":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def tune(device: str = "cpu") -> int | None:
    """On CPU under glibc, unless ``KVSLIM_HEAP=glibc``: blocks of ``MMAP_THRESHOLD``
    bytes and more are mapped of their own from now on in this process. Returns the
    threshold set (now or by an earlier call), None where nothing was set."""
    if str(device).split(":")[0] != "cpu" or mode() != "mapped" or not sys.platform.startswith("linux"):
        return None
    if not _DONE:
        libc = _glibc()
        if libc is None or not libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            return None
        _DONE.append(MMAP_THRESHOLD)
    return _DONE[0]


def trim(device: str = "cpu") -> bool:
    """Give the free pages of glibc's heaps back to the system (``malloc_trim(0)``) where
    ``tune`` applies: CPU, glibc, ``KVSLIM_HEAP`` mapped. Whether it ran."""
    if tune(device) is None:
        return False
    _glibc().malloc_trim(0)
    return True


@functools.cache
def _glibc():
    """glibc's libc with mallopt, or None (musl, another libc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only  # noqa: B018
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None
