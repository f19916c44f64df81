"""The oracle: dequantize each sequence's whole K/V, then float32 SDPA.

Slow on purpose and obviously right. Every faster path is tested against it. It is
also the classic (non-flash) path that a quantized K can run on when the fused
kernels are unavailable.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvslim.attention import Step
    from kvslim.cache import KVCache


def causal_mask(q_len: int, kv_len: int, device=None, window: int = 0,
                start: int = 0) -> torch.Tensor:
    """[q_len, kv_len - start] bool, True where allowed: query i sits at position
    kv_len - q_len + i, key j at start + j.

    With a window, query p sees keys p-window+1..p only (Hugging Face's and llama.cpp's
    sliding window: itself and the window-1 keys before it)."""
    pos_q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    pos_k = torch.arange(start, kv_len, device=device)[None, :]
    allowed = pos_k <= pos_q
    return allowed & (pos_k > pos_q - window) if window else allowed


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               window: int = 0, softcap: float = 0.0, start: int = 0) -> torch.Tensor:
    """q [n, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv] -> [n, Hq, Dv], causal, GQA by repetition;
    the keys are positions start .. start + L - 1, the queries the last n of them.

    softcap: scores s -> softcap * tanh(s / softcap) before the softmax (gemma2)."""
    n, hq, _ = q.shape
    group = hq // k.shape[0]
    k = k.repeat_interleave(group, dim=0).to(q.dtype)  # [Hq, L, D]
    v = v.repeat_interleave(group, dim=0).to(q.dtype)
    mask = causal_mask(n, start + k.shape[1], q.device, window, start)
    if not softcap:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
        return out.transpose(0, 1)  # [n, Hq, Dv]
    s = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale  # [Hq, n, L]
    s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(p, v).transpose(0, 1)  # [n, Hq, Dv]


def attention(q: torch.Tensor, cache: "KVCache", layer: int, step: "Step",
              scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence (step.q_offsets) -> [N, Hq, Dv] float32.

    window: a sliding-window layer's keys per query (0: all); softcap: soft-capping of
    the scores (0: none)."""
    out = q.new_empty(q.shape[0], q.shape[1], cache.v_head_dim, dtype=torch.float32)
    for b, cid in enumerate(step.cache_ids):
        lo, hi = step.q_offsets[b], step.q_offsets[b + 1]
        # a window layer's first query sees keys from here on; the cache may hold no earlier one
        start = max(0, step.kv_lens[b] - (hi - lo) - window + 1) if window else 0
        k, v = cache.read(layer, cid, start)  # [Hkv, L - start, D] float32
        out[lo:hi] = attend_one(q[lo:hi].float(), k, v, scale, window, softcap, start)
    return out


def write(cache: "KVCache", layer: int, step: "Step", k: torch.Tensor, v: torch.Tensor) -> None:
    """The plain-torch write: k, v coded as the cache's codec says, then ``cache.write``."""
    if cache.codec is not None:
        k, v = cache.codec.transform_kv(layer, k, v)
    cache.write(layer, step.layer_slots(layer), k, v)


class Backend:
    """Dequantize-then-SDPA attention over plain-torch writes."""

    name = "reference"

    def prepare(self, step: "Step") -> None:
        """Nothing to build: every call reads whole sequences."""

    write = staticmethod(write)
    attend = staticmethod(attention)


def available(device: torch.device, type_k: str, type_v: str) -> str | None:
    """Runs wherever torch runs, for every type."""
    return None
