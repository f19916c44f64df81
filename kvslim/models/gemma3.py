"""Gemma 3 and Gemma 2 (``gemma3``, ``gemma2`` GGUFs): decoders whose layers mostly
attend over a sliding window.

What differs from the llama family (``llama.py``):

* the embedding is scaled by sqrt(d_model);
* RMSNorm multiplies by (1 + w) in Hugging Face's weights; llama.cpp's converter stores
  w + 1 in the GGUF (transformers' GGUF loader subtracts the 1 again), so here the
  stored weight multiplies as it is;
* q and k are RMS-normalized per head (over head_dim) before RoPE;
* each sublayer's output is normalized again before the residual add (post-attention
  and post-FFN norms), besides the usual pre-norms;
* the FFN is GeGLU: down(gelu_tanh(gate x) * up x);
* head_dim (``attention.key_length``, 256) is independent of d_model, and the query
  scale is 1/sqrt(query_pre_attn_scalar) = 1/sqrt(key_length);
* five of every six layers attend over a sliding window (``ModelConfig.swa_layers``:
  position p sees keys p-window+1..p) and use RoPE base 10,000; the global layers use
  the GGUF's base, with its linear scaling if it declares one;
* optional final-logit soft-capping (``final_logit_softcapping``).

Gemma 2 is the same decoder without the q/k norms, with attention-logit soft-capping
(``attn_logit_softcapping``, 50), final-logit soft-capping (30), every other layer on
a window of 4,096 and one RoPE base for all layers; ``ModelConfig`` carries all of it.

Shapes as in ``llama.py``: N rows packed over sequences, d = d_model, H / Hkv query and
kv heads, D = head_dim, F = ffn_dim, V = vocab.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvslim.attention import Step
from kvslim.gguf_loader import GGUFError, ModelConfig
from kvslim.models.common import Decoder, Rope, rope_inv_freq
from kvslim.weights import Linear, QLinear, sampled_rows

__all__ = ["Gemma3"]

_ROPE_SCALINGS = (None, "none", "linear")


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [d]
    wqkv: Linear | QLinear  # [(H + 2 Hkv) * D, d]: q, k, v rows stacked
    q_norm: torch.Tensor | None  # [D] (gemma3; None in gemma2)
    k_norm: torch.Tensor | None  # [D]
    wo: Linear | QLinear  # [d, H * D]
    post_attn_norm: torch.Tensor  # [d]
    ffn_norm: torch.Tensor  # [d]
    w13: Linear | QLinear  # [2F, d]: gate rows then up rows
    w2: Linear | QLinear  # [d, F]
    post_ffn_norm: torch.Tensor  # [d]
    window: int  # keys per query on a sliding window, 0 for a global layer


class Gemma3(Decoder):
    """Weights and forward of one Gemma 3 (or Gemma 2) model on one device and dtype."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if config.rope_scaling_type not in _ROPE_SCALINGS:
            raise GGUFError(f"rope scaling '{config.rope_scaling_type}' is not supported "
                            f"for {config.arch} (supported: linear)")
        self._setup(config, weights, device, dtype)
        c = config
        # Hugging Face multiplies by sqrt(d) rounded to the compute dtype
        self.embed_scale = torch.tensor(math.sqrt(c.d_model), dtype=dtype).item()
        self.layers = [self._layer(weights, i) for i in range(c.n_layers)]
        factor = c.rope_scaling_factor if c.rope_scaling_type == "linear" else None
        self.rope_global = Rope(rope_inv_freq(c.rope_base, c.rope_dim, factor), self.device, dtype)
        self.rope_local = Rope(rope_inv_freq(c.rope_base_local, c.rope_dim), self.device, dtype)

    # ---------------------------------------------------------------- loading

    def _layer(self, w: dict, i: int) -> Layer:
        p = f"blk.{i}."
        lin = lambda t: self._linear([t])  # noqa: E731
        norm = lambda name: self._w(w.pop(p + name + ".weight"))  # noqa: E731
        qk_norms = p + "attn_q_norm.weight" in w
        return Layer(
            attn_norm=norm("attn_norm"),
            wqkv=self._linear([w.pop(p + f"attn_{x}.weight") for x in "qkv"]),
            q_norm=norm("attn_q_norm") if qk_norms else None,
            k_norm=norm("attn_k_norm") if qk_norms else None,
            wo=lin(w.pop(p + "attn_output.weight")),
            post_attn_norm=norm("post_attention_norm"),
            ffn_norm=norm("ffn_norm"),
            w13=self._linear([w.pop(p + "ffn_gate.weight"), w.pop(p + "ffn_up.weight")]),
            w2=lin(w.pop(p + "ffn_down.weight")),
            post_ffn_norm=norm("post_ffw_norm"),
            window=self.config.layer_window(i),
        )

    def _rope(self, layer: int) -> Rope:
        return self.rope_local if self.layers[layer].window else self.rope_global

    # ---------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step,
                logit_rows: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Run one step, appending its K/V to ``step.cache`` through ``step.attn`` (as
        ``Llama.forward``): tokens [N], logit_rows [R] or None -> logits [R, V] float32
        (``hidden``: the final normed hidden states [R, d])."""
        return self._forward(tokens.to(self.device), step, logit_rows, hidden)

    def _forward(self, tokens, step, logit_rows, hidden=False):
        eps, ops, layers = self.config.rms_eps, self.ops, self.layers
        pos = step.positions.to(self.device)  # [N]
        ropes = {"local": self.rope_local.at(pos), "global": self.rope_global.at(pos)}
        x = self.embed(tokens) * self.embed_scale  # [N, d]: the residual stream
        h = ops.norm(x, layers[0].attn_norm, eps)
        for i, layer in enumerate(layers):
            cos, sin = ropes["local" if layer.window else "global"]  # [N, 1, D] each
            a = self._attention(h, i, layer, step, cos, sin)  # [N, d]
            x, h = ops.norm_add_norm(x, a, layer.post_attn_norm, layer.ffn_norm, eps)
            f = layer.w2(layer.w13.gated(h, ops.gelu_mul))  # [N, 2F] -> [N, F] -> [N, d]
            # the post-FFN norm into the residual, then the next layer's (or the output) norm
            nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else self.output_norm
            x, h = ops.norm_add_norm(x, f, layer.post_ffn_norm, nxt, eps)
        if logit_rows is not None:
            h = h[logit_rows.to(self.device)]  # [R, d]
        if hidden:
            return h.float()  # [R, d]
        with sampled_rows(h.shape[0]):
            logits = self.output(h).float()  # [R, V]
        cap = self.config.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def _attention(self, h, i, layer, step, cos, sin):
        n, hq, hkv, dim, eps = h.shape[0], self.n_heads, self.n_kv_heads, self.head_dim, \
            self.config.rms_eps
        qkv = layer.wqkv(h).view(n, hq + 2 * hkv, dim)  # [N, H + 2 Hkv, D]: q, k, v heads
        if layer.q_norm is not None:
            qkv = self.ops.head_norm(qkv, hq, layer.q_norm, layer.k_norm, hkv, eps)
        qkv = self.ops.rope(qkv, hq + hkv, cos, sin)  # q and k rotated, v as it was
        return self._attend(qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], i, step,
                            layer.wo, window=layer.window, softcap=self.config.attn_softcap)
