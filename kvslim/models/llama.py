"""The llama family (llama, mistral, qwen2): one decoder forward over the paged K/V cache.

RoPE, GQA, RMSNorm, SwiGLU, tied or separate output head, optional q/k/v bias (qwen2).
Weights come from ``gguf_loader.load_weights(neox_qk=True)``, so q/k come out in
Hugging Face order and every architecture uses the NEOX ("rotate half") rotation. Every
matrix and the token table are built through ``kvslim.weights`` (``linear``,
``Embedding``): GGUF blocks read in place, or tensors dequantized at load.

Shapes: N = rows of this step packed over sequences (``Step.q_offsets``),
d = d_model, H = query heads, Hkv = kv heads, D = head_dim, F = ffn_dim, V = vocab.

Per layer the forward runs few large ops: one fused qkv matmul, one rotation of q and
k together (they are adjacent in the fused output), the cache write, attention, and
one fused gate+up matmul. Logits are computed only for the rows asked for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F

from kvslim.attention import Step
from kvslim.cache import KVCache
from kvslim.gguf_loader import GGUFError, ModelConfig, load_weights
from kvslim.weights import Embedding, QLinear, held_bytes, linear, resolve_mode
from kvslim.weights import Linear  # noqa: F401  (re-exported: the dense path's matmul)

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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotation of the first R dims of each head. x [N, h, D], cos/sin [N, 1, R].

    cos = [cos θ, cos θ], sin = [-sin θ, sin θ] per row, so rotate_half is one roll.
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, torch.roll(x, r // 2, dims=-1), sin)
    rot, rest = x[..., :r], x[..., r:]  # partial rotary: the tail passes through
    return torch.cat([torch.addcmul(rot * cos, torch.roll(rot, r // 2, dims=-1), sin), rest], -1)


class Llama:
    """Weights and forward of one llama-family model on one device and dtype."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        # Llama 3.x scaling is the rope_freqs.weight tensor (per-frequency divisors);
        # a GGUF that names it without the tensor cannot be run as it says.
        llama3 = config.rope_scaling_type == "llama3" and config.rope_freq_factors
        if config.rope_scaling_type not in _ROPE_SCALINGS and not llama3:
            raise GGUFError(f"rope scaling '{config.rope_scaling_type}' is not supported "
                            f"(supported: linear, llama3 with rope_freqs.weight)")
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        # Block formats need a multiple of 32 along head_dim: such heads are zero-padded
        # in the cache (zeros add nothing to q.k or to the output).
        self.cache_head_dim = c.cache_head_dim
        self.scale = 1.0 / math.sqrt(c.head_dim)
        # threads a small-M matmul is split over (CPU only: GPU kernels use the whole device)
        self.splits = torch.get_num_threads() if self.device.type == "cpu" else 1
        embed = weights.pop("token_embd.weight")
        self.embed = Embedding(embed if not isinstance(embed, torch.Tensor) else self._w(embed))  # [V, d]
        self.output = self._linear([weights.pop("output.weight", self.embed.table)])
        self.output_norm = self._w(weights.pop("output_norm.weight"))
        self.layers = [self._layer(weights, i) for i in range(c.n_layers)]
        freq_factors = weights.pop("rope_freqs.weight", None)
        self._inv_freq = self._rope_inv_freq(freq_factors)
        self._cos = self._sin = torch.empty(0, 1, c.rope_dim, device=self.device, dtype=dtype)

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, config: ModelConfig, device="cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = True,
                  weights: str = "quantized") -> "Llama":
        """``weights``: "quantized" keeps the GGUF blocks (kvslim.weights; CPU float32 only,
        elsewhere it means "dequantize"), "dequantize" expands them to ``dtype`` at load."""
        weights = load_weights(reader, config, dtype=dtype, device=device, progress=progress,
                               neox_qk=True,
                               quantized=resolve_mode(weights, device, dtype) == "quantized")
        return cls(config, weights, device, dtype)

    def _w(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def _linear(self, parts: list, bias: list | None = None) -> Linear | QLinear:
        return linear(parts, bias, device=self.device, dtype=self.dtype, splits=self.splits)

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
        inv = 1.0 / c.rope_base ** (torch.arange(0, c.rope_dim, 2, dtype=torch.float64) / c.rope_dim)
        if freq_factors is not None:  # llama-3.1 style: per-frequency divisors
            inv = inv / freq_factors.to("cpu", torch.float64)
        if c.rope_scaling_type == "linear" and c.rope_scaling_factor:
            inv = inv / c.rope_scaling_factor  # positions / factor
        return inv  # [R/2] float64 on CPU

    def _rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n', 1, R] for positions < n' (n' >= n, grown by doubling)."""
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 256)
            ang = torch.arange(size, dtype=torch.float64)[:, None] * self._inv_freq  # [n', R/2]
            cos, sin = ang.cos(), ang.sin()
            self._cos = torch.cat([cos, cos], -1)[:, None].to(self.device, self.dtype)
            self._sin = torch.cat([-sin, sin], -1)[:, None].to(self.device, self.dtype)
        return self._cos, self._sin

    def unrope(self, x: torch.Tensor, pos: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Undo RoPE: x [N, h, D] at positions pos [N] -> the vectors before rotation
        (every layer has the same RoPE here; ``layer`` matters to models where not)."""
        cos, sin = self._rope_tables(int(pos.max()) + 1)
        return apply_rope(x, cos[pos], -sin[pos])  # rotating by -theta

    def rope_mean(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Mean over positions 0..n-1 of RoPE applied to fixed vectors x [..., h, D].

        RoPE is linear in (cos, sin), so this is RoPE with the averaged tables.
        """
        cos, sin = self._rope_tables(n)
        return apply_rope(x.to(self.dtype), cos[:n].mean(0), sin[:n].mean(0))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as held in memory: GGUF blocks as stored, or the dequantized
        tensors (a tied head counted once)."""
        ts = self.embed.tensors + self.output.tensors + [self.output_norm]
        for L in self.layers:
            ts += [L.attn_norm, L.ffn_norm] + [t for lin in (L.wqkv, L.wo, L.w13, L.w2)
                                                for t in lin.tensors]
        return held_bytes(ts)

    def new_cache(self, n_pages: int, page_size: int, cache_type_k: str, cache_type_v: str,
                  codec=None) -> KVCache:
        return KVCache(self.n_layers, self.n_kv_heads, self.cache_head_dim, n_pages,
                       page_size=page_size, cache_type_k=cache_type_k,
                       cache_type_v=cache_type_v, device=self.device, codec=codec)

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
        eps = self.config.rms_eps
        cos, sin = self._rope_tables(max(step.kv_lens))
        pos = step.positions.to(self.device)
        cos, sin = cos[pos], sin[pos]  # [N, 1, R], shared by every layer
        x = self.embed(tokens.to(self.device))  # [N, d]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, x.shape[-1:], layer.attn_norm, eps)
            x = x + self._attention(h, i, layer, step, cos, sin)
            h = F.rms_norm(x, x.shape[-1:], layer.ffn_norm, eps)
            gate, up = layer.w13(h).chunk(2, dim=-1)  # [N, F] each
            x = x + layer.w2(F.silu(gate).mul_(up))  # [N, d]
        if logit_rows is not None:
            x = x[logit_rows.to(self.device)]  # [R, d]
        x = F.rms_norm(x, x.shape[-1:], self.output_norm, eps)
        if hidden:
            return x.float()  # [R, d]
        return self.output(x).float()  # [R, V]

    def _attention(self, h, i, layer, step, cos, sin):
        n, hq, hkv, dim = h.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = layer.wqkv(h).view(n, hq + 2 * hkv, dim)
        qk = apply_rope(qkv[:, :hq + hkv], cos, sin)  # [N, H + Hkv, D]
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv:]
        if self.cache_head_dim != dim:
            pad = (0, self.cache_head_dim - dim)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        o = step.attn(q, k, v, i, step, self.scale)  # [N, H, Dc]: write, attend
        o = o[..., :dim].to(h.dtype).reshape(n, hq * dim)
        return layer.wo(o)  # [N, d]
