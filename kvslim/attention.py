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
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvslim import formats
from kvslim.cache import KVCache, PageTable

log = logging.getLogger("kvslim")

FLASH_MODES = ("auto", "on", "off")

# backend name -> module exposing ``Backend`` (the class of an object as the ``Backend``
# protocol below says) and ``available(device, type_k, type_v) -> str | None`` (None when
# usable, else the reason).
BACKENDS = {
    "reference": "kvslim.kernels.reference",
    "cpu": "kvslim.kernels.cpu",
    "triton": "kvslim.kernels.triton",
    "tiled": "kvslim.kernels.tiled",
}


class Backend(Protocol):
    """What every backend in ``BACKENDS`` provides (kernels/*.py ``Backend``).

    ``prepare`` runs once per step, before any layer, and may leave per-step scratch in
    ``step.scratch``; ``write`` stores a layer's k [N, Hkv, D], v [N, Hkv, Dv] (model
    coordinates; the cache's codec applied) into ``step.slots``, all or nothing;
    ``attend`` returns q [N, Hq, D] (cache coordinates) -> [N, Hq, Dv], each query row
    seeing its last ``window`` keys (0: all before it) with scores soft-capped by
    ``softcap`` (0: none). A backend may also have ``write_attend(q, k, v, cache, layer,
    step, scale, window=, softcap=)``: all of ``Attention.__call__`` (the write, the
    codec's query coding, the attention, its restore; model coordinates in and out) in
    one call.
    """

    name: str

    def prepare(self, step: "Step") -> None: ...

    def write(self, cache: KVCache, layer: int, step: "Step", k: torch.Tensor,
              v: torch.Tensor) -> None: ...

    def attend(self, q: torch.Tensor, cache: KVCache, layer: int, step: "Step",
               scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor: ...


@dataclass
class Step:
    """What every layer needs for one forward step: built once per step by the engine
    (``Attention.begin``), then read by the model's layers and the backend.

    Query rows of all sequences are packed: rows q_offsets[b]:q_offsets[b+1] belong to
    cache sequence cache_ids[b], and its i-th row sits at position
    kv_lens[b] - q_lens[b] + i (causal).
    """

    cache: KVCache
    cache_ids: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    q_offsets: list[int]
    slots: torch.Tensor  # [N] int64 slots of this step's new rows in group 0, packed like q
    positions: torch.Tensor  # [N] int64 position of each row, on the CPU
    page_table: PageTable  # group 0's
    attn: "Attention | None" = None  # the model's layers call it
    scratch: Any = None  # the backend's, set by its prepare(step)
    group_slots: list[torch.Tensor] | None = None  # slots per cache group (None: group 0's only)
    tables: list[PageTable] | None = None  # page table per cache group

    def layer_slots(self, layer: int) -> torch.Tensor:
        """[N] slots of this step's rows in the pages of ``layer``'s group."""
        return self.group_slots[self._group(layer)] if self.group_slots else self.slots

    def layer_table(self, layer: int) -> PageTable:
        """The page table of ``layer``'s group (a window group's holds -1 for pages out of
        the window: only the keys a query sees are live)."""
        return self.tables[self._group(layer)] if self.tables else self.page_table

    def _group(self, layer: int) -> int:
        return self.cache.group_index(layer)

    @property
    def n_rows(self) -> int:
        return self.q_offsets[-1]

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)

    @classmethod
    def reserve(cls, cache: KVCache, cache_ids: list[int], q_lens: list[int]) -> "Step":
        """Reserve this step's slots in ``cache`` (all or nothing) and build the metadata."""
        done: list[tuple[int, int]] = []
        try:
            slots = []
            for cid, n in zip(cache_ids, q_lens):
                before = cache.length(cid)
                slots.append(cache.reserve(cid, n))
                done.append((cid, before))
        except BaseException:
            for cid, before in done:  # undo the sequences already extended
                cache.trim(cid, before)
            raise
        offsets = [0]
        for n in q_lens:
            offsets.append(offsets[-1] + n)
        kv_lens = [cache.length(cid) for cid in cache_ids]
        if all(n == 1 for n in q_lens):  # decode: one row each, at the last position
            positions = torch.tensor([kv - 1 for kv in kv_lens])
        else:
            positions = torch.cat([torch.arange(kv - n, kv) for kv, n in zip(kv_lens, q_lens)])
        ids = list(cache_ids)
        step = cls(cache, ids, list(q_lens), kv_lens, offsets,
                   slots[0] if len(slots) == 1 else torch.cat(slots), positions,
                   cache.page_table(ids))
        if len(cache.groups) > 1:  # the other groups' slots and tables
            step.group_slots = [step.slots] + [
                torch.cat([cache.slots(cid, kv - n, kv, g) for cid, n, kv in zip(ids, q_lens, kv_lens)])
                for g in range(1, len(cache.groups))]
            step.tables = [step.page_table] + [cache.page_table(ids, g)
                                               for g in range(1, len(cache.groups))]
        return step

    def rollback(self) -> None:
        """Undo ``reserve`` after a failed step so the cache holds only complete tokens."""
        for cid, n, total in zip(self.cache_ids, self.q_lens, self.kv_lens):
            if cid in self.cache.sequences and self.cache.length(cid) == total:
                self.cache.trim(cid, total - n)


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


def head_dim_fallback(head_dim: int, v_head_dim: int, type_k: str,
                      type_v: str) -> tuple[str, str, str | None]:
    """(K type, V type, reason): block types become f16 when 32 does not divide the head
    dims (a row must be whole blocks). The device-free part of ``plan_attention``, which
    ``kvslim plan`` applies for any machine."""
    whole_blocks = head_dim % formats.QK == 0 and v_head_dim % formats.QK == 0
    if whole_blocks or not (formats.is_quantized(type_k) or formats.is_quantized(type_v)):
        return type_k, type_v, None
    reason = f"head_dim {head_dim}/{v_head_dim} is not a multiple of {formats.QK}"
    k, v = ("f16" if formats.is_quantized(t) else t for t in (type_k, type_v))
    return k, v, reason


def plan_attention(device, head_dim: int, cache_type_k: str = "f16", cache_type_v: str = "f16",
                   flash_attn: str = "auto", v_head_dim: int | None = None,
                   warn: bool = True) -> AttentionPlan:
    """Decide the attention path and the effective cache types for one model."""
    device = torch.device(device)
    k, v = formats.get_format(cache_type_k).name, formats.get_format(cache_type_v).name
    if flash_attn not in FLASH_MODES:
        raise ValueError(f"flash_attn must be one of {', '.join(FLASH_MODES)}, got {flash_attn!r}")
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    eff_k, eff_v, reason = head_dim_fallback(head_dim, v_head_dim, k, v)
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


def make_backend(name: str) -> Backend:
    """A fresh backend object of one of ``BACKENDS``."""
    return importlib.import_module(BACKENDS[name]).Backend()


class Attention:
    """Attention for one plan; its backend owns both the K/V write and the read.

    ``begin(cache, cache_ids, q_lens)`` reserves and prepares a step;
    ``attn(q, k, v, layer, step, scale)`` writes the step's k, v and attends.
    """

    def __init__(self, plan: AttentionPlan):
        self.plan = plan
        self.backend = make_backend(plan.backend)

    def begin(self, cache: KVCache, cache_ids: list[int], q_lens: list[int]) -> Step:
        """Reserve the step's slots (all or nothing; ``Step.rollback`` undoes it) and let
        the backend build its per-step scratch once for every layer."""
        step = Step.reserve(cache, cache_ids, q_lens)
        step.attn = self
        try:
            self.backend.prepare(step)
        except BaseException:
            step.rollback()
            raise
        return step

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                 step: Step, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        """Write this step's k [N, Hkv, D], v [N, Hkv, Dv] into ``step.slots`` and attend
        q [N, Hq, D] -> [N, Hq, Dv], all in the model's coordinates (float32 on CPU; the
        compute dtype on GPU).

        The cache's codec (rotation, centering; ``kvslim.codec``) is applied here and in
        the backend's write only: k, v are coded as they are written, q before the read
        and the output restored after, so only the stored blocks hold coded values.
        window: a sliding-window layer's keys per query (0: all); softcap: soft-capping
        of the scores (0: none).
        """
        cache = step.cache
        fused = getattr(self.backend, "write_attend", None)
        if fused is not None:  # one kernel job: the write, q's coding, attention, restore (CPU)
            return fused(q, k, v, cache, layer, step, scale, window=window, softcap=softcap)
        codec = cache.codec
        self.backend.write(cache, layer, step, k, v)
        if codec is not None:
            q = codec.transform_q(layer, q)
        o = self._attend(q, cache, layer, step, scale, window, softcap)
        return o if codec is None else codec.restore(layer, o)

    def _attend(self, q, cache, layer, step, scale, window, softcap):
        # every backend honours a window and soft-capping itself
        return self.backend.attend(q, cache, layer, step, scale, window=window, softcap=softcap)
