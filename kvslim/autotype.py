"""``--kv-cache-type auto``: the K/V type pair chosen from measured quality (torch-free).

``calibration.quality_table`` measures the KLD vs an f16 cache of candidate pairs once
per model and machine; ``choose_auto`` picks from such a table: the fewest bytes per
token within a KLD budget, or with a memory budget the best quality that fits. The
server, ``LLM`` and ``kvslim plan`` all choose through it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_KLD", "AutoChoice", "NothingFits", "choose_auto", "parse_max_kld"]

# The KLD vs an f16 cache that ``auto`` allows by default: q8_0-class caches stay well
# inside it, 4-bit ones outside (README "The K/V cache").
DEFAULT_MAX_KLD = 0.005


class NothingFits(ValueError):
    """No K/V type pair within the KLD budget fits the memory budget."""


@dataclass(frozen=True)
class AutoChoice:
    """The pair ``auto`` picked, its measured KLD vs f16 and what it was picked under."""

    type_k: str
    type_v: str
    kld: float  # measured on the calibration text (calibration.quality_table)
    max_kld: float
    bytes_per_token: int
    candidates: int  # pairs measured, f16 included
    max_bytes_per_token: int | None = None  # the memory budget per token, if any

    def describe(self) -> dict:
        return {"kv_auto": True, "kv_max_kld": self.max_kld, "kv_measured_kld": self.kld,
                "kv_auto_candidates": self.candidates}


def parse_max_kld(value) -> float:
    """A KLD budget: a finite number >= 0 (text from flags and the environment too)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"kv_max_kld must be a number, got {value!r}") from None
    if not (x >= 0 and x != float("inf")):
        raise ValueError(f"kv_max_kld must be a finite number >= 0, got {value!r}")
    return x


def choose_auto(table: dict[str, float], max_kld: float, bytes_per_token,
                max_bytes_per_token: int | None = None) -> AutoChoice:
    """The pair for ``--kv-cache-type auto`` from a quality table {"k/v": KLD vs f16}
    (f16/f16 counts as 0 whether listed or not).

    Without a memory budget: the fewest bytes per token within ``max_kld`` (the lower
    KLD on a tie). With one (``max_bytes_per_token``): the lowest KLD within ``max_kld``
    that fits it (the fewer bytes on a tie); NothingFits says what the smallest within
    the budget needs. bytes_per_token(k, v) -> int.
    """
    table = {**table, "f16/f16": 0.0}
    rows = []
    for name, kld in table.items():
        if kld is None or kld > max_kld:
            continue
        k, v = name.split("/")
        rows.append((k, v, float(kld), int(bytes_per_token(k, v))))
    if max_bytes_per_token is None:
        k, v, kld, b = min(rows, key=lambda r: (r[3], r[2]))
    else:
        fits = [r for r in rows if r[3] <= max_bytes_per_token]
        if not fits:
            k, v, kld, b = min(rows, key=lambda r: (r[3], r[2]))
            raise NothingFits(
                f"no K/V cache within a KLD of {max_kld:g} fits: the smallest, K {k} / V {v} "
                f"(KLD {kld:.5f}), needs {b:,} bytes per token and the memory allows "
                f"{max_bytes_per_token:,}; raise the memory, lower the context or the "
                f"parallel sequences, or allow a larger kv_max_kld")
        k, v, kld, b = min(fits, key=lambda r: (r[2], r[3]))
    return AutoChoice(k, v, kld, max_kld, b, len(table), max_bytes_per_token)
