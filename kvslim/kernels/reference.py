"""The oracle: dequantize each sequence's whole K/V, then float32 SDPA.

Slow on purpose and obviously right. Every faster path is tested against it. It is
also the classic (non-flash) path that a quantized K can run on when the fused
kernels are unavailable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def attention(q: torch.Tensor, cache: KVCache, layer: int, meta, scale: float) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence (meta.q_offsets) -> [N, Hq, Dv] float32."""
    out = q.new_empty(q.shape[0], q.shape[1], cache.v_head_dim, dtype=torch.float32)
    for b, seq in enumerate(meta.seqs):
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        k, v = cache.read(layer, seq)  # [Hkv, L, D] float32
        out[lo:hi] = attend_one(q[lo:hi].float(), k, v, scale)
    return out


def available(device: torch.device, type_k: str, type_v: str) -> str | None:
    """Runs wherever torch runs, for every type."""
    return None
