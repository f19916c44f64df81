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


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[q_len, kv_len] bool, True where allowed: query i sits at position kv_len - q_len + i."""
    pos_q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= pos_q


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D], k [Hkv, L, D], v [Hkv, L, Dv] -> [n, Hq, Dv], causal, GQA by repetition."""
    n, hq, _ = q.shape
    group = hq // k.shape[0]
    k = k.repeat_interleave(group, dim=0).to(q.dtype)  # [Hq, L, D]
    v = v.repeat_interleave(group, dim=0).to(q.dtype)
    mask = causal_mask(n, k.shape[1], q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)  # [n, Hq, Dv]


def attention(q: torch.Tensor, cache: "KVCache", layer: int, step: "Step",
              scale: float) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence (step.q_offsets) -> [N, Hq, Dv] float32."""
    out = q.new_empty(q.shape[0], q.shape[1], cache.v_head_dim, dtype=torch.float32)
    for b, cid in enumerate(step.cache_ids):
        lo, hi = step.q_offsets[b], step.q_offsets[b + 1]
        k, v = cache.read(layer, cid)  # [Hkv, L, D] float32
        out[lo:hi] = attend_one(q[lo:hi].float(), k, v, scale)
    return out


def write(cache: "KVCache", layer: int, step: "Step", k: torch.Tensor, v: torch.Tensor) -> None:
    """The plain-torch write: k, v coded as the cache's codec says, then ``cache.write``."""
    if cache.codec is not None:
        k, v = cache.codec.transform_kv(layer, k, v)
    cache.write(layer, step.slots, k, v)


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
