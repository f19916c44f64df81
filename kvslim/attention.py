"""Attention over the paged cache: per-step metadata, backend choice, the f16 fallback.

The rule, as Ollama and llama.cpp have it:

* a quantized V needs the fused (flash-style) path: the classic path multiplies by a
  transposed V, which cannot be stored in 32-value blocks as tokens arrive;
* a quantized K works on either path;
* when the fused path is unavailable (``flash_attn="off"``, no kernel for the device or
  type, or a head_dim that 32 does not divide) a block-quantized type falls back to f16,
  and one warning names the reason and the type actually used.

``plan_attention`` decides once per model load; callers read the effective types and
the reason from the returned ``AttentionPlan`` (the engine and server report them).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

import torch

from kvslim import formats
from kvslim.cache import KVCache, PageTable

log = logging.getLogger("kvslim")

FLASH_MODES = ("auto", "on", "off")

# backend name -> module exposing `attention(q, cache, layer, meta, scale)` and
# `available(device, type_k, type_v) -> str | None` (None when usable, else the reason).
BACKENDS = {
    "reference": "kvslim.kernels.reference",
    "cpu": "kvslim.kernels.cpu",
    "triton": "kvslim.kernels.triton",
    "tiled": "kvslim.kernels.tiled",
}


@dataclass
class AttnMeta:
    """What every layer needs for one forward step; built once per step.

    Query rows of all sequences are packed: rows q_offsets[b]:q_offsets[b+1] belong to
    seqs[b], and its i-th row sits at position kv_lens[b] - q_lens[b] + i (causal).
    """

    seqs: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    q_offsets: list[int]
    slots: torch.Tensor  # [N] int64 slots of this step's new rows, packed like q
    page_table: PageTable | None = None
    extra: dict = field(default_factory=dict)  # per-backend scratch built once per step

    @property
    def n_rows(self) -> int:
        return self.q_offsets[-1]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @classmethod
    def prepare(cls, cache: KVCache, seqs: list[int], q_lens: list[int]) -> "AttnMeta":
        """Reserve this step's slots in ``cache`` (all or nothing) and build the metadata."""
        done: list[tuple[int, int]] = []
        try:
            slots = []
            for s, n in zip(seqs, q_lens):
                before = cache.length(s)
                slots.append(cache.reserve(s, n))
                done.append((s, before))
        except BaseException:
            for s, before in done:  # undo the sequences already extended
                cache.trim(s, before)
            raise
        offsets = [0]
        for n in q_lens:
            offsets.append(offsets[-1] + n)
        kv_lens = [cache.length(s) for s in seqs]
        return cls(list(seqs), list(q_lens), kv_lens, offsets, torch.cat(slots),
                   cache.page_table(list(seqs)))

    def rollback(self, cache: KVCache) -> None:
        """Undo ``prepare`` after a failed step so the cache holds only complete tokens."""
        for s, n, total in zip(self.seqs, self.q_lens, self.kv_lens):
            if s in cache.sequences and cache.length(s) == total:
                cache.trim(s, total - n)


@dataclass
class AttentionPlan:
    """Which attention path runs and which cache types are actually stored."""

    device: str
    requested_k: str
    requested_v: str
    effective_k: str
    effective_v: str
    flash_attn: str  # the mode asked for
    fused: bool  # True when a flash-style path reads the blocks directly
    backend: str
    reason: str | None = None  # why types fell back, if they did

    @property
    def fell_back(self) -> bool:
        return (self.effective_k, self.effective_v) != (self.requested_k, self.requested_v)


def _backend_problem(name: str, device: torch.device, k: str, v: str) -> str | None:
    try:
        mod = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        return f"the {name} kernels cannot be imported ({e})"
    return mod.available(device, k, v)


def _fused_backend(device: torch.device, k: str, v: str) -> tuple[str | None, str | None]:
    """The fused backend for a device and type pair, or (None, reason)."""
    candidates = {"cpu": ["cpu", "tiled"], "cuda": ["triton", "tiled"], "mps": ["tiled"]}
    problems = []
    for name in candidates.get(device.type, ["tiled"]):
        problem = _backend_problem(name, device, k, v)
        if problem is None:
            return name, None
        problems.append(problem)
    return None, "; ".join(problems) or f"no fused kernel for device {device.type}"


def plan_attention(device, head_dim: int, cache_type_k: str = "f16", cache_type_v: str = "f16",
                   flash_attn: str = "auto", v_head_dim: int | None = None,
                   warn: bool = True) -> AttentionPlan:
    """Decide the attention path and the effective cache types for one model."""
    device = torch.device(device)
    k, v = formats.get_format(cache_type_k).name, formats.get_format(cache_type_v).name
    if flash_attn not in FLASH_MODES:
        raise ValueError(f"flash_attn must be one of {', '.join(FLASH_MODES)}, got {flash_attn!r}")
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    eff_k, eff_v, reason = k, v, None
    dims_ok = head_dim % formats.QK == 0 and v_head_dim % formats.QK == 0
    if not dims_ok and (formats.is_quantized(k) or formats.is_quantized(v)):
        reason = f"head_dim {head_dim}/{v_head_dim} is not a multiple of {formats.QK}"
        eff_k = "f16" if formats.is_quantized(k) else k
        eff_v = "f16" if formats.is_quantized(v) else v
    backend, problem = (None, "flash attention is off") if flash_attn == "off" else \
        _fused_backend(device, eff_k, eff_v)
    if backend is None:
        if formats.is_quantized(eff_v):
            reason = f"{problem}: a quantized V cache needs flash attention"
            eff_v = "f16"
        backend = "reference"
    plan = AttentionPlan(str(device), k, v, eff_k, eff_v, flash_attn, backend != "reference",
                         backend, reason)
    if warn and plan.fell_back:
        log.warning("K/V cache falls back: %s; using K %s / V %s (asked for %s / %s)",
                    reason, eff_k, eff_v, k, v)
    elif warn and flash_attn == "on" and backend == "reference":
        log.warning("flash attention was asked for but is unavailable: %s", problem)
    return plan


class Attention:
    """Attention for one plan: ``attn.forward(q, k, v, cache, layer, meta, scale)`` stores
    a step's K/V and attends; ``attn(q, cache, layer, meta, scale)`` only attends."""

    def __init__(self, plan: AttentionPlan):
        self.plan = plan
        self._impl = importlib.import_module(BACKENDS[plan.backend]).attention

    def __call__(self, q: torch.Tensor, cache: KVCache, layer: int, meta: AttnMeta,
                 scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        """q [N, Hq, D] -> [N, Hq, Dv] (float32 on CPU; the compute dtype on GPU).

        q in the cache's coordinates: rotated already when the cache's codec rotates.
        window: a sliding-window layer's keys per query (0: all); softcap: soft-capping
        of the scores (0: none)."""
        if not (window or softcap):
            return self._impl(q, cache, layer, meta, scale)
        if self.plan.backend in ("reference", "tiled"):
            return self._impl(q, cache, layer, meta, scale, window=window, softcap=softcap)
        if self.plan.backend == "cpu" and not softcap:  # it honours a window itself
            return self._impl(q, cache, layer, meta, scale, window=window)
        # The Triton kernels attend to every key without soft-capping, and the CPU kernel
        # does not soft-cap: a window that a sequence has outgrown, or a soft-cap, goes to
        # the tiled path, which honours both on any device.
        if softcap or max(meta.kv_lens) > window:
            return _tiled_attention(q, cache, layer, meta, scale, window, softcap)
        return self._impl(q, cache, layer, meta, scale)  # the window holds every key

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                layer: int, meta: AttnMeta, scale: float, window: int = 0,
                softcap: float = 0.0) -> torch.Tensor:
        """Write this step's k [N, Hkv, D], v [N, Hkv, Dv] into ``meta.slots`` and attend
        q [N, Hq, D] -> [N, Hq, Dv], all in the model's coordinates.

        The cache's codec (rotation, centering; ``kvslim.codec``) is applied here and
        only here: rows are encoded before the write and the output decoded after, so
        the stored blocks hold rotated (centered) values and nothing else sees them.
        """
        codec = cache.codec
        if codec is None:
            cache.write(layer, meta.slots, k, v)
            return self(q, cache, layer, meta, scale, window, softcap)
        q = codec.store(cache, layer, meta.slots, q, k, v)  # coded q; coded k, v written
        return codec.decode(layer, self(q, cache, layer, meta, scale, window, softcap))


def _tiled_attention(q, cache, layer, meta, scale, window, softcap):
    from kvslim.kernels import tiled

    return tiled.attention(q, cache, layer, meta, scale, window=window, softcap=softcap)
