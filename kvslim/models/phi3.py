"""Phi 3 (``phi3`` GGUFs): the llama-family decoder with fused projections.

Beside ``Llama``: q, k and v come from one ``attn_qkv`` matrix and the FFN's gate and
up rows from one ``ffn_up`` matrix (gate first), which is the layout ``Llama`` fuses
them into anyway; RoPE is NEOX-style and may rotate only the first
``rope.dimension_count`` dims of each head (partial rotary, handled by ``apply_rope``).

Not run: LongRoPE (``rope_factors_long`` / ``rope_factors_short`` tensors), refused at
load by name. A ``sliding_window`` in the GGUF is ignored, as llama.cpp ignores it for
Phi 3 (its converters do not record which layers use it).
"""
from __future__ import annotations

import torch

from kvslim.gguf_loader import GGUFError, ModelConfig
from kvslim.models.llama import Layer, Llama

__all__ = ["Phi3"]

_LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")


class Phi3(Llama):
    """Weights and forward of one Phi 3 model (``Llama`` with fused weights in the file)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        found = [n for n in _LONGROPE if n in weights]
        if found:
            raise GGUFError(f"LongRoPE (tensor '{found[0]}') is not supported")
        super().__init__(config, weights, device, dtype)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"blk.{i}."
        lin = lambda t: self._linear([t])  # noqa: E731
        return Layer(
            attn_norm=self._w(w.pop(p + "attn_norm.weight")),
            wqkv=lin(w.pop(p + "attn_qkv.weight")),  # [(H + 2 Hkv) * D, d]
            wo=lin(w.pop(p + "attn_output.weight")),
            ffn_norm=self._w(w.pop(p + "ffn_norm.weight")),
            w13=lin(w.pop(p + "ffn_up.weight")),  # [2F, d]: gate rows then up rows
            w2=lin(w.pop(p + "ffn_down.weight")),
        )
