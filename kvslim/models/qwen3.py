"""Qwen 3 (``qwen3`` GGUFs): the llama-family decoder with q and k RMS-normalized per head.

Beside ``Llama``: q and k are each RMS-normalized over head_dim (``attn_q_norm`` /
``attn_k_norm``, plain weights) before RoPE; no q/k/v biases; head_dim comes from
``attention.key_length`` (128), independent of d_model. RoPE is NEOX-style.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvslim.models.common import apply_rope
from kvslim.models.llama import Layer, Llama

__all__ = ["Qwen3"]


@dataclass
class Qwen3Layer(Layer):
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None  # [D]


class Qwen3(Llama):
    """Weights and forward of one Qwen 3 model (``Llama`` with q/k norms)."""

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Qwen3Layer:
        p = f"blk.{i}."
        q_norm, k_norm = w.pop(p + "attn_q_norm.weight"), w.pop(p + "attn_k_norm.weight")
        base = super()._layer(w, i)
        return Qwen3Layer(**vars(base), q_norm=self._w(q_norm), k_norm=self._w(k_norm))

    def _attention(self, h, i, layer, step, cos, sin):
        n, hq, hkv, dim = h.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        eps = self.config.rms_eps
        qkv = layer.wqkv(h).view(n, hq + 2 * hkv, dim)
        q = F.rms_norm(qkv[:, :hq], (dim,), layer.q_norm, eps)  # [N, H, D]
        k = F.rms_norm(qkv[:, hq:hq + hkv], (dim,), layer.k_norm, eps)  # [N, Hkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self._attend(q, k, qkv[:, hq + hkv:], i, step, layer.wo)
