"""kvslim: an LLM runtime whose K/V cache is stored in ggml block formats.

Submodules are imported lazily so that `import kvslim` stays cheap and a
CLI verb only pays for what it uses.
"""
from __future__ import annotations

import os

# torch's OpenMP (libgomp on Linux) keeps an idle thread spinning for 300,000 rounds by
# default. With as many threads as cores and any other busy process, a spinning thread
# holds the core its partner needs, and a SmolLM2 decode step took 230-980 ms instead of
# 19 ms (benchmarks/README.md, "Threads on a shared machine"); 1,000 rounds cost <= 5% on
# an idle machine and kept it at 36-52 ms. Only a default: it has effect when kvslim is
# imported before torch (the CLI always is), and a user's GOMP_SPINCOUNT or
# OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# torch maps its CPU blocks of 2 MiB and more in transparent huge pages when this is set:
# the large activations kvslim.heap has glibc map afresh then fault in 2 MiB at a time,
# not 4 KiB (a 1B model's prompt: 15-18% slower prefill without, about as fast as glibc's
# defaults with it; benchmarks/README.md, "Heap memory during prefill"). Only a default,
# read when torch first allocates; KVSLIM_HEAP=glibc leaves it unset.
from kvslim.heap import huge_pages_default  # noqa: E402

huge_pages_default()

from kvslim.version import __version__  # noqa: E402

__all__ = ["LLM", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from kvslim.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvslim' has no attribute {name!r}")
