"""What every architecture file shares: RoPE (NEOX rotation, tables per base) and the
``Decoder`` base (weights as held, the cache a model's layers need, the attention call).

An architecture file (``llama.py``, ``gemma3.py``, ...) subclasses ``Decoder`` with its
layers and forward; shapes as in ``llama.py``: N rows packed over sequences, d =
d_model, H / Hkv query and kv heads, D = head_dim, Dc = the cache's head_dim.
"""
from __future__ import annotations

import gguf
import torch
import torch.nn.functional as F

from kvslim.attention import Step
from kvslim.cache import KVCache
from kvslim.gguf_loader import ModelConfig, load_weights
from kvslim.kernels.rowops import apply_rope, ops
from kvslim.weights import Embedding, Linear, QLinear, held_bytes, linear, resolve_mode

__all__ = ["Decoder", "Rope", "apply_rope", "rope_inv_freq"]


def rope_inv_freq(base: float, dim: int, linear_factor: float | None = None) -> torch.Tensor:
    """Inverse frequencies [dim/2] float64 for RoPE over ``dim`` dims of a head; a linear
    scaling divides positions (hence frequencies) by its factor."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return inv / linear_factor if linear_factor else inv


class Rope:
    """NEOX RoPE tables for one set of frequencies, grown by doubling as positions grow."""

    def __init__(self, inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.inv_freq, self.device, self.dtype = inv_freq, device, dtype
        r = 2 * inv_freq.shape[0]
        self._cos = self._sin = torch.empty(0, 1, r, device=device, dtype=dtype)

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n', 1, R] for positions < n' (n' >= n); sin carries rotate_half's sign."""
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 256)
            ang = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq  # [n', R/2]
            cos, sin = ang.cos(), ang.sin()
            self._cos = torch.cat([cos, cos], -1)[:, None].to(self.device, self.dtype)
            self._sin = torch.cat([-sin, sin], -1)[:, None].to(self.device, self.dtype)
        return self._cos, self._sin

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, R] at positions pos [N]."""
        cos, sin = self.tables(int(pos.max()) + 1 if pos.numel() else 1)
        return cos[pos], sin[pos]

    def unrope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Undo the rotation: x [N, h, D] at positions pos [N]."""
        cos, sin = self.at(pos)
        return apply_rope(x, cos, -sin)

    def mean(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Mean over positions 0..n-1 of the rotation of fixed vectors x [..., h, D]
        (RoPE is linear in cos/sin, so it is the rotation by the averaged tables)."""
        cos, sin = self.tables(n)
        return apply_rope(x.to(self.dtype), cos[:n].mean(0), sin[:n].mean(0))


class Decoder:
    """The parts of a decoder-only model that do not depend on its architecture.

    A subclass sets ``self.layers`` (dataclasses of tensors and ``Linear``/``QLinear``)
    and defines ``_rope(layer)`` and its forward; every matrix and the token table are
    built through ``kvslim.weights`` (GGUF blocks read in place, or dequantized at load).
    """

    config: ModelConfig
    layers: list

    def _setup(self, config: ModelConfig, weights: dict, device, dtype: torch.dtype) -> None:
        """Device, head sizes, the token table, the output head and its norm."""
        self.config, self.device, self.dtype = config, torch.device(device), dtype
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        # Block formats need a multiple of 32 along head_dim: such heads are zero-padded
        # in the cache (zeros add nothing to q.k or to the output).
        self.cache_head_dim = c.cache_head_dim
        self.scale = c.query_scale
        # threads a small-M matmul is split over (CPU only: GPU kernels use the whole device)
        self.splits = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.ops = ops(self.device, dtype)  # norms, RoPE, SiLU, GELU: fused numba on CPU float32
        embed = weights.pop("token_embd.weight")
        self.embed = Embedding(embed if not isinstance(embed, torch.Tensor) else self._w(embed))  # [V, d]
        self.output = self._linear([weights.pop("output.weight", self.embed.table)])
        self.output_norm = self._w(weights.pop("output_norm.weight"))

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, config: ModelConfig, device="cpu",
                  dtype: torch.dtype = torch.float32, progress: bool = True,
                  weights: str = "quantized"):
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

    # ---------------------------------------------------------------- RoPE

    def _rope(self, layer: int) -> Rope:
        raise NotImplementedError

    def unrope(self, x: torch.Tensor, pos: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Undo RoPE: x [N, h, D] of ``layer`` (default: the last global layer) at
        positions pos [N] -> the vectors before rotation."""
        if layer is None:
            layer = next((i for i, w in enumerate(self.layer_windows()) if not w), 0)
        return self._rope(layer).unrope(x, pos.to(self.device))

    def rope_mean(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Mean over positions 0..n-1 of RoPE on fixed vectors x [L, h, D] (one row per
        layer, each with its layer's frequencies)."""
        return torch.stack([self._rope(i).mean(x[i], n) for i in range(x.shape[0])])

    # ---------------------------------------------------------------- sizes, cache

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_windows(self) -> list[int]:
        """Keys per query of each layer on a sliding window, 0 for a global layer."""
        return [self.config.layer_window(i) for i in range(self.n_layers)]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as held in memory: GGUF blocks as stored, or the dequantized
        tensors (a tied head counted once)."""
        ts = self.embed.tensors + self.output.tensors + [self.output_norm]
        for L in self.layers:
            for t in vars(L).values():
                ts += t.tensors if isinstance(t, (Linear, QLinear)) else \
                    [t] if isinstance(t, torch.Tensor) else []
        return held_bytes(ts)

    def new_cache(self, n_pages: int, page_size: int, cache_type_k: str, cache_type_v: str,
                  codec=None, window_pages: int | None = None) -> KVCache:
        """The paged pool for this model's layers: ``n_pages`` for the global layers,
        ``window_pages`` (default ``n_pages``) for those on a sliding window."""
        return KVCache(self.n_layers, self.n_kv_heads, self.cache_head_dim, n_pages,
                       page_size=page_size, cache_type_k=cache_type_k,
                       cache_type_v=cache_type_v, device=self.device, codec=codec,
                       windows=self.layer_windows(), window_pages=window_pages)

    # ---------------------------------------------------------------- attention

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int, step: Step,
                wo: Linear | QLinear, **masking) -> torch.Tensor:
        """Write k, v of layer i and attend q to the cache, then the output projection:
        q [N, H, D], k / v [N, Hkv, D] (RoPE applied) -> [N, d]. ``masking``: the layer's
        ``window`` and ``softcap`` where it has them (``Attention.__call__``)."""
        n, dim = q.shape[0], self.head_dim
        if self.cache_head_dim != dim:
            pad = (0, self.cache_head_dim - dim)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        o = step.attn(q, k, v, i, step, self.scale, **masking)  # [N, H, Dc]: write, attend
        if self.cache_head_dim != dim or o.dtype != self.dtype:
            o = o[..., :dim].to(self.dtype)
        return wo(o.reshape(n, self.n_heads * dim))  # [N, d]
