"""Sizes in bytes from text ("8GiB", "512M"), for ``kvslim plan`` and the server's
memory settings. Imports nothing of kvslim and not torch: the CLI parser uses it.
"""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["parse_memory"]

# Units are case-insensitive. A bare letter (512M, 8G) means binary units, as in
# docker/llama.cpp memory flags; "GB" is decimal and "GiB" binary.
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(size: str | int) -> int:
    """Bytes in a size like "8GiB", "8GB", "8192MiB", "512M" or a plain byte count."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"memory size must be positive, got {size}")
        return size
    text = str(size)
    if text.strip().startswith("-"):
        raise ValueError(f"memory size must be positive, got {text!r}")
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad memory size {text!r}: expected a number and a unit, like 8GiB, 8GB or 512MiB")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"bad memory size {text!r}: unknown unit {m.group(2)!r} "
                         "(use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or K, M, G, T)")
    n = int(Fraction(m.group(1)) * _UNITS[unit])  # exact: "1.5GiB" is 1610612736
    if n <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return n
