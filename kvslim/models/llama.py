"""The llama family (llama, mistral, qwen2): one decoder forward over the paged K/V cache.

RoPE, GQA, RMSNorm, SwiGLU, tied or separate output head, optional q/k/v bias (qwen2).
Weights come from ``gguf_loader.load_weights(neox_qk=True)``, so q/k come out in
Hugging Face order and every architecture uses the NEOX ("rotate half") rotation. Every
matrix and the token table are built through ``kvslim.weights`` (``linear``,
``Embedding``): GGUF blocks read in place, or tensors dequantized at load.

Shapes: N = rows of this step packed over sequences (``Step.q_offsets``),
d = d_model, H = query heads, Hkv = kv heads, D = head_dim, F = ffn_dim, V = vocab.

Per layer the forward runs few large ops: one fused qkv matmul, one rotation of q and
k together (they are adjacent in the fused output), the cache write, attention, one
fused gate+up matmul, and each residual add fused with the norm after it (``self.ops``:
``kernels.rowops``, one numba call per op on CPU). Logits are computed only for the rows
asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvslim.attention import Step
from kvslim.gguf_loader import GGUFError, ModelConfig
from kvslim.models.common import Decoder, Rope, apply_rope, rope_inv_freq
from kvslim.models.fused import FusedLayers
from kvslim.weights import Linear, QLinear, sampled_rows

__all__ = ["Llama", "apply_rope"]

# RoPE scalings this forward implements (rope.scaling.type); others are refused at load.
_ROPE_SCALINGS = (None, "none", "linear")

@dataclass
class Layer:
    attn_norm: torch.Tensor  # [d]
    wqkv: Linear | QLinear  # [(H + 2 Hkv) * D, d]: q, k, v rows stacked (+ bias for qwen2)
    wo: Linear | QLinear  # [d, H * D]
    ffn_norm: torch.Tensor  # [d]
    w13: Linear | QLinear  # [2F, d]: gate rows then up rows
    w2: Linear | QLinear  # [d, F]


class Llama(Decoder):
    """Weights and forward of one llama-family model on one device and dtype."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # Llama 3.x scaling is the rope_freqs.weight tensor (per-frequency divisors);
        # a GGUF that names it without the tensor cannot be run as it says.
        llama3 = config.rope_scaling_type == "llama3" and config.rope_freq_factors
        if config.rope_scaling_type not in _ROPE_SCALINGS and not llama3:
            raise GGUFError(f"rope scaling '{config.rope_scaling_type}' is not supported "
                            f"(supported: linear, llama3 with rope_freqs.weight)")
        self._setup(config, weights, device, dtype)
        self.layers = [self._layer(weights, i) for i in range(config.n_layers)]
        self.rope = Rope(self._rope_inv_freq(weights.pop("rope_freqs.weight", None)),
                         self.device, dtype)
        # a decode step as one kernel job (CPU; models.fused): for this forward
        # only, not a subclass's own attention (qwen3's q/k norms)
        self.fused = FusedLayers.build(self) if type(self)._attention is Llama._attention \
            else None

    # ---------------------------------------------------------------- loading

    def _layer(self, w: dict, i: int) -> Layer:
        p = f"blk.{i}."
        qkv = [w.pop(p + f"attn_{x}.weight") for x in "qkv"]
        bias = [w.pop(p + f"attn_{x}.bias") for x in "qkv"] if self.config.qkv_bias else None
        return Layer(
            attn_norm=self._w(w.pop(p + "attn_norm.weight")),
            wqkv=self._linear(qkv, bias),
            wo=self._linear([w.pop(p + "attn_output.weight")]),
            ffn_norm=self._w(w.pop(p + "ffn_norm.weight")),
            w13=self._linear([w.pop(p + "ffn_gate.weight"), w.pop(p + "ffn_up.weight")]),
            w2=self._linear([w.pop(p + "ffn_down.weight")]),
        )

    def _rope_inv_freq(self, freq_factors: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        factor = c.rope_scaling_factor if c.rope_scaling_type == "linear" else None
        inv = rope_inv_freq(c.rope_base, c.rope_dim)
        if freq_factors is not None:  # llama-3.1 style: per-frequency divisors
            inv = inv / freq_factors.to("cpu", torch.float64)
        return inv / factor if factor else inv  # [R/2] float64; linear: positions / factor

    def _rope(self, layer: int) -> Rope:
        return self.rope  # every layer has the same RoPE

    # ---------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step,
                logit_rows: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Run one step, appending its K/V to ``step.cache`` through ``step.attn``.

        tokens [N] (packed like ``step.q_lens``), logit_rows [R] row indices or None for
        all -> logits [R, V] float32, or with ``hidden`` the final normed hidden states
        [R, d] float32 (what embeddings pool). The step's slots are reserved already
        (``Attention.begin``); on an error the caller rolls the step back.
        """
        eps, ops = self.config.rms_eps, self.ops
        cos, sin = self.rope.at(step.positions.to(self.device))  # [N, 1, R], every layer's
        x = self.embed(tokens.to(self.device))  # [N, d]: the residual stream
        if self.fused is not None and self.fused.applies(step, x.shape[0]):
            x, y = self.fused.run(x, step, cos, sin)  # the same loop as one kernel job
        else:
            x, y = self._layers(x, step, cos, sin)
        if logit_rows is not None:  # the last residual add and the norm on those rows only
            rows = logit_rows.to(self.device)
            x, y = x[rows], y[rows]  # [R, d]
        _, h = ops.add_norm(x, y, self.output_norm, eps)  # [R, d]
        if hidden:
            return h.float()  # [R, d]
        with sampled_rows(h.shape[0]):
            return self.output(h).float()  # [R, V]

    def _layers(self, x, step, cos, sin):
        """Every layer on x [N, d] -> (x, y): the residual stream before the last layer's
        output y [N, d] is added."""
        eps, ops, layers = self.config.rms_eps, self.ops, self.layers
        h = ops.norm(x, layers[0].attn_norm, eps)
        for i, layer in enumerate(layers):
            x, h = ops.add_norm(x, self._attention(h, i, layer, step, cos, sin),
                                layer.ffn_norm, eps)
            y = layer.w2(layer.w13.gated(h, ops.silu_mul))  # [N, d]: [N, 2F] -> [N, F] -> [N, d]
            if i + 1 < len(layers):
                x, h = ops.add_norm(x, y, layers[i + 1].attn_norm, eps)
        return x, y

    def _attention(self, h, i, layer, step, cos, sin):
        n, hq, hkv, dim = h.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = layer.wqkv(h).view(n, hq + 2 * hkv, dim)
        qkv = self.ops.rope(qkv, hq + hkv, cos, sin)  # q and k rotated, v as it was
        return self._attend(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], i, step, layer.wo)
