"""kvslim's quantized K/V cache inside Hugging Face transformers.

    from kvslim.hf import QuantizedKVCache
    cache = QuantizedKVCache(model.config, cache_type_k="q8_0", cache_type_v="q4_0")
    model.generate(**inputs, past_key_values=cache)

``QuantizedKVCache`` is a ``transformers.Cache`` whose layers store every K/V row as ggml
blocks in a kvslim paged pool (``kvslim.cache.KVCache``, one sequence per batch row),
coded as kvslim codes them (``kvslim.codec``: Hadamard rotation, key centering,
least-squares scales). The centering means are measured on the first rows each layer
stores (the prompt) rather than by a calibration pass: any constant keeps attention
exact, the prompt's mean is a good one.

How attention reads the blocks:

* by default each layer's ``update`` returns its whole K/V dequantized (model
  coordinates and dtype), for whatever attention the model runs (eager, sdpa) with its
  own mask: the blocks are what is kept, the float copy lives for one layer call;
* with ``model.set_attn_implementation("kvslim")`` (registered on import, alongside a
  mask function that leaves causal, unpadded batches maskless) the attention runs
  through kvslim's backend (fused numba kernels on CPU, Triton on CUDA, tiled torch
  elsewhere) on the blocks directly; a step that needs a mask (padding, a sliding window
  the keys outgrew) dequantizes that layer and runs torch's SDPA with it.

Supported: decoder-only models whose attention calls ``cache.update(k, v, layer_idx)``
with post-RoPE keys [B, Hkv, S, D] (llama, mistral, qwen2, gemma families); the batch
size is fixed by the first call. Beam search and cropping are not supported (a clear
error). It sits beside the front ends: it imports the attention layer and below.
"""
from __future__ import annotations

import threading
from dataclasses import replace

import torch
from transformers import AttentionInterface, Cache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvslim.attention import Attention, plan_attention
from kvslim.cache import DEFAULT_PAGE_SIZE, KVCache
from kvslim.codec import CodecSettings, KVCodec, decide
from kvslim.rotation import Rotation

__all__ = ["QuantizedKVCache", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "kvslim"
_PENDING = threading.local()  # (cache, layer, step) between a layer's update and its attention


class _Layer(DynamicLayer):
    """One model layer's view of the shared pool (the transformers layer interface)."""

    is_croppable = False

    def __init__(self, owner: "QuantizedKVCache", index: int):
        super().__init__()
        self.owner, self.index, self.length = owner, index, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        out = self.owner._update(self.index, key_states, value_states)
        self.length += key_states.shape[-2]
        return out

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length, self.is_initialized = 0, False

    def offload(self):
        raise NotImplementedError("QuantizedKVCache does not offload layers")

    def prefetch(self):
        raise NotImplementedError("QuantizedKVCache does not offload layers")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("QuantizedKVCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVCache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("QuantizedKVCache keeps the batch of its first call")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("QuantizedKVCache keeps the batch of its first call")


class QuantizedKVCache(Cache):
    """A transformers cache of ggml blocks: K in ``cache_type_k``, V in ``cache_type_v``
    (kvslim's types: q8_0, q4_0, q5_0, iq4_nl, f16, ...), coded per ``kv_rotation``,
    ``kv_centering``, ``kv_rounding`` (auto | on | off; auto | lsq | ggml, as ``LLM``).

    ``nbytes``: bytes of the pool (pages allocated; it grows by doubling), ``bytes_used``:
    of the pages holding tokens; ``kv_cache_info()`` the effective types and coding."""

    def __init__(self, config, cache_type_k: str = "q8_0", cache_type_v: str = "q4_0", *,
                 kv_rotation: str = "auto", kv_centering: str = "auto",
                 kv_rounding: str = "auto", flash_attn: str = "auto",
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.config = text = config.get_text_config(decoder=True)
        self.n_layers = text.num_hidden_layers
        self.n_heads = text.num_attention_heads
        self.n_kv_heads = getattr(text, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.n_heads
        self.types, self.flash_attn, self.page_size = (cache_type_k, cache_type_v), flash_attn, page_size
        self.settings = CodecSettings(kv_rotation, kv_centering, kv_rounding)
        self.pool: KVCache | None = None
        self.plan = self.attn = self.step = None
        self.cids: list[int] = []
        self._measured: set[int] = set()
        super().__init__(layers=[_Layer(self, i) for i in range(self.n_layers)])

    # ---------------------------------------------------------------- the pool

    def _new_pool(self, batch: int, n_tokens: int, device: torch.device) -> None:
        self.plan = plan_attention(device, self.head_dim, *self.types, self.flash_attn)
        choice = decide(self.settings, self.plan.effective_k, self.plan.effective_v, self.head_dim)
        choice = replace(choice, key_scaling=False)  # it needs a calibration forward (none here)
        self.choice = choice
        codec = None
        if choice.active:
            rot = lambda n: Rotation.make(self.head_dim, n) if n else None  # noqa: E731
            zeros = torch.zeros(self.n_layers, self.n_kv_heads, self.head_dim)
            codec = KVCodec(self.n_heads, rot(choice.rotation_k), rot(choice.rotation_v),
                            zeros if choice.centering_k else None,
                            zeros.clone() if choice.centering_v else None,
                            choice.rounding_k, choice.rounding_v).to(device)
        pages = batch * -(-max(n_tokens, 1) // self.page_size)
        self.pool = KVCache(self.n_layers, self.n_kv_heads, self.head_dim, pages,
                            page_size=self.page_size, cache_type_k=self.plan.effective_k,
                            cache_type_v=self.plan.effective_v, device=device, codec=codec)
        self.cids = [self.pool.new_sequence() for _ in range(batch)]
        self.attn = Attention(self.plan)

    def _begin(self, batch: int, n: int, device: torch.device) -> None:
        """Reserve this forward's ``n`` rows per sequence (growing the pool if needed)."""
        if self.pool is None:
            self._new_pool(batch, 2 * n, device)
        if batch != len(self.cids):
            raise ValueError(f"QuantizedKVCache holds a batch of {len(self.cids)}, got {batch}")
        need = sum(self.pool.pages_needed(c, n) for c in self.cids)
        if need > self.pool.free_pages:
            grown = max(2 * self.pool.n_pages, self.pool.pages_in_use + need)
            self.pool.grow(grown)
        self.step = self.attn.begin(self.pool, self.cids, [n] * batch)

    def _update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, S, D]; the whole layer dequantized, or (attention through
        kvslim) the new rows as they came."""
        b, hkv, s, d = k.shape
        if layer == 0:
            self._begin(b, s, k.device)
        rows_k = k.transpose(1, 2).reshape(b * s, hkv, d)  # [N, Hkv, D] packed by sequence
        rows_v = v.transpose(1, 2).reshape(b * s, hkv, v.shape[-1])
        if layer not in self._measured:
            self._measure(layer, rows_k, rows_v, s)
        self.attn.backend.write(self.pool, layer, self.step, rows_k, rows_v)
        if _uses_kvslim(self):
            _PENDING.item = (self, layer, self.step)
            return k, v
        return self.dequantized(layer, k.dtype)

    def _measure(self, layer: int, k: torch.Tensor, v: torch.Tensor, s: int) -> None:
        """The centering means of a layer from its first rows (the first token, an
        attention sink unlike the others, left out when there are more)."""
        self._measured.add(layer)
        codec = self.pool.codec
        if codec is None or not (codec.centered_k or codec.centered_v):
            return
        keep = torch.ones(k.shape[0], dtype=torch.bool)
        if s > 1:
            keep[::s] = False
        mean = lambda x: x[keep].float().mean(0)  # noqa: E731  [Hkv, D]
        codec.set_means(layer, mean(k) if codec.centered_k else None,
                        mean(v) if codec.centered_v else None)

    def dequantized(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K, V [B, Hkv, T, D] decoded back to the model's coordinates."""
        codec, ks, vs = self.pool.codec, [], []
        for cid in self.cids:
            k, v = self.pool.read(layer, cid)  # [Hkv, T, D] float32, stored coordinates
            if codec is not None:
                sk, sv = codec.stored_shift(layer)
                k = k + sk[:, None] if sk is not None else k
                v = v + sv[:, None] if sv is not None else v
                k = codec.rotation_k.inverse(k) if codec.rotation_k is not None else k
                v = codec.rotation_v.inverse(v) if codec.rotation_v is not None else v
            ks.append(k)
            vs.append(v)
        return torch.stack(ks).to(dtype), torch.stack(vs).to(dtype)

    # ---------------------------------------------------------------- reporting

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: the pool's planes (block scales included), nothing else."""
        return self.pool.nbytes if self.pool is not None else 0

    @property
    def bytes_used(self) -> int:
        """Bytes of the pages that hold tokens."""
        if self.pool is None:
            return 0
        return self.pool.nbytes // self.pool.n_pages * self.pool.pages_in_use

    def kv_cache_info(self) -> dict:
        if self.pool is None:
            return {"type_k": None, "type_v": None}
        info = {"type_k": self.plan.effective_k, "type_v": self.plan.effective_v,
                "fallback": self.plan.reason, "backend": self.plan.backend,
                "attention": "kvslim" if _uses_kvslim(self) else "dequantized per layer",
                "bytes": self.nbytes, "bytes_used": self.bytes_used,
                "tokens": self.get_seq_length()}
        return info | self.choice.describe()

    def reset(self) -> None:
        if self.pool is not None:
            self.pool.reset()
            self.cids = [self.pool.new_sequence() for _ in self.cids]
        super().reset()


def _uses_kvslim(cache: QuantizedKVCache) -> bool:
    """Whether the model attends through ``kvslim_attention`` (read when it runs: the
    implementation may be set after the cache is made)."""
    return getattr(cache.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def kvslim_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs):
    """transformers' attention interface over kvslim's blocks. query [B, Hq, S, D] ->
    ([B, S, Hq, Dv], None). Without a pending ``QuantizedKVCache`` layer (another cache,
    or none) it is torch's SDPA on the key and value given."""
    pending = getattr(_PENDING, "item", None)
    _PENDING.item = None
    if pending is None or pending[1] != getattr(module, "layer_idx", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    cache, layer, step = pending
    if attention_mask is not None:  # padding or a window: the model's own mask decides
        k, v = cache.dequantized(layer, query.dtype)
        return sdpa_attention_forward(module, query, k, v, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    b, hq, s, d = query.shape
    q = query.transpose(1, 2).reshape(b * s, hq, d)  # [N, Hq, D] packed like the step
    codec = cache.pool.codec
    if codec is not None:
        q = codec.transform_q(layer, q)
    scale = scaling if scaling is not None else d ** -0.5
    window = getattr(module, "sliding_window", None) or 0
    softcap = kwargs.get("softcap") or 0.0
    o = cache.attn._attend(q, cache.pool, layer, step, scale, window, softcap)  # [N, Hq, Dv]
    if codec is not None:
        o = codec.restore(layer, o)
    return o.reshape(b, s, hq, -1).to(query.dtype), None


AttentionInterface.register(ATTN_IMPLEMENTATION, kvslim_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # None when causal, unpadded
