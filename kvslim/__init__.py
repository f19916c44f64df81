"""kvslim: an LLM runtime whose K/V cache is stored in ggml block formats.

Submodules are imported lazily so that `import kvslim` stays cheap and a
CLI verb only pays for what it uses.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from kvslim.llm import LLM

        return LLM
    raise AttributeError(f"module 'kvslim' has no attribute {name!r}")
