"""Tiny random GGUFs of the architectures beside the llama family, for tests against
transformers loading the same file.

The vocabulary and the llama-style tensors come from ``tiny_llama``; each architecture
adds its own tensors and metadata here, as llama.cpp's converter writes them (gemma
norm weights are stored as 1 + w, the way the converter stores them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

import tiny_llama
from tiny_llama import Tiny, finish as _finish, common_keys as _common_keys


@dataclass(frozen=True)
class TinyGemma3(Tiny):
    arch: str = "gemma3"
    n_layers: int = 7  # layers 0-4 and 6 on the window, layer 5 global
    d_model: int = 64
    n_heads: int = 2
    n_kv_heads: int = 1
    head_dim_: int = 32  # independent of d_model, as in Gemma
    ffn_dim: int = 96
    window: int = 5
    rope_base: float = 1e6
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.head_dim_


def gemma3_arrays(t: TinyGemma3, seed: int) -> dict[str, np.ndarray]:
    a = tiny_llama.arrays(t, seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(t.n_layers):
        p = f"blk.{i}."
        a |= {p + "attn_q_norm.weight": 1 + 0.2 * rng.standard_normal(t.head_dim),
              p + "attn_k_norm.weight": 1 + 0.2 * rng.standard_normal(t.head_dim),
              p + "post_attention_norm.weight": 1 + 0.2 * rng.standard_normal(t.d_model),
              p + "post_ffw_norm.weight": 1 + 0.2 * rng.standard_normal(t.d_model)}
    return {k: v.astype(np.float32) for k, v in a.items()}


def _gemma_writer(path: Path, t: TinyGemma3) -> gguf.GGUFWriter:
    """A writer holding the keys every tiny gemma writes: head sizes and the window."""
    w = gguf.GGUFWriter(str(path), t.arch)
    _common_keys(w, t)
    w.add_uint32(f"{t.arch}.attention.key_length", t.head_dim)
    w.add_uint32(f"{t.arch}.attention.value_length", t.head_dim)
    w.add_uint32(f"{t.arch}.attention.sliding_window", t.window)
    return w


def write_gemma3(path: Path, t: TinyGemma3 = TinyGemma3(), seed: int = 0) -> dict:
    """A tiny gemma3 GGUF at ``path``; returns its arrays."""
    w = _gemma_writer(path, t)
    a = gemma3_arrays(t, seed)
    _finish(w, a)
    return a


@dataclass(frozen=True)
class TinyGemma2(TinyGemma3):
    arch: str = "gemma2"
    n_layers: int = 4  # layers 0 and 2 on the window
    rope_base: float = 1e4
    attn_softcap: float = 3.0  # small enough to bite on these scores (Gemma 2 uses 50)
    final_softcap: float = 5.0  # (Gemma 2: 30)


def write_gemma2(path: Path, t: TinyGemma2 = TinyGemma2(), seed: int = 0) -> dict:
    """A tiny gemma2 GGUF (no q/k norms, soft-capped) at ``path``; returns its arrays."""
    w = _gemma_writer(path, t)
    w.add_float32(f"{t.arch}.attn_logit_softcapping", t.attn_softcap)
    w.add_float32(f"{t.arch}.final_logit_softcapping", t.final_softcap)
    a = {k: v for k, v in gemma3_arrays(t, seed).items() if "_q_norm" not in k and "_k_norm" not in k}
    _finish(w, a)
    return a


@dataclass(frozen=True)
class TinyQwen3(Tiny):
    arch: str = "qwen3"
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim_: int = 32  # from attention.key_length, independent of d_model
    rope_base: float = 1e6
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.head_dim_


def write_qwen3(path: Path, t: TinyQwen3 = TinyQwen3(), seed: int = 0) -> dict:
    """A tiny qwen3 GGUF (q/k norms, no biases) at ``path``; returns its arrays."""
    w = gguf.GGUFWriter(str(path), t.arch)
    _common_keys(w, t)
    w.add_uint32(f"{t.arch}.attention.key_length", t.head_dim)
    w.add_uint32(f"{t.arch}.attention.value_length", t.head_dim)
    a = tiny_llama.arrays(t, seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(t.n_layers):
        a[f"blk.{i}.attn_q_norm.weight"] = 1 + 0.2 * rng.standard_normal(t.head_dim)
        a[f"blk.{i}.attn_k_norm.weight"] = 1 + 0.2 * rng.standard_normal(t.head_dim)
    _finish(w, {k: v.astype(np.float32) for k, v in a.items()})
    return a


def llama3_rope_factors(t: Tiny, factor: float, low: float, high: float,
                        orig_ctx: int) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's converter computes it for Llama 3.1 scaling:
    per frequency, the divisor that turns the base frequency into the scaled one."""
    freqs = 1.0 / t.rope_base ** (np.arange(0, t.head_dim, 2) / t.head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < orig_ctx / high:
            out.append(1.0)
        elif wavelen > orig_ctx / low:
            out.append(factor)
        else:
            smooth = (orig_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_llama3(path: Path, t: Tiny, rope: dict, seed: int = 0,
                 declare: str | None = None) -> dict:
    """A tiny llama GGUF with Llama 3.1 RoPE scaling (``rope``: transformers' rope_scaling
    dict) stored as llama.cpp does: a ``rope_freqs.weight`` tensor; ``declare`` also
    writes ``rope.scaling.type``."""
    w = gguf.GGUFWriter(str(path), t.arch)
    _common_keys(w, t)
    if declare:
        w.add_string(f"{t.arch}.rope.scaling.type", declare)
    a = tiny_llama.arrays(t, seed)
    a["rope_freqs.weight"] = llama3_rope_factors(t, rope["factor"], rope["low_freq_factor"],
                                                 rope["high_freq_factor"],
                                                 rope["original_max_position_embeddings"])
    _finish(w, a)
    return a


def write_phi3(path: Path, t: Tiny, rope_dim: int, seed: int = 0, longrope: bool = False) -> dict:
    """A tiny phi3 GGUF at ``path``: fused attn_qkv and gate/up (``ffn_up``) tensors,
    RoPE over the first ``rope_dim`` dims of each head; returns its arrays."""
    w = gguf.GGUFWriter(str(path), t.arch)
    _common_keys(w, t)
    w.add_uint32(f"{t.arch}.rope.dimension_count", rope_dim)
    a = tiny_llama.arrays(t, seed)
    for i in range(t.n_layers):
        p = f"blk.{i}."
        a[p + "attn_qkv.weight"] = np.concatenate([a.pop(p + f"attn_{x}.weight") for x in "qkv"])
        a[p + "ffn_up.weight"] = np.concatenate([a.pop(p + "ffn_gate.weight"), a[p + "ffn_up.weight"]])
    if longrope:
        a["rope_factors_long.weight"] = np.ones(rope_dim // 2, np.float32)
    _finish(w, a)
    return a


def transformers_logits(path: Path, ids: list[int], **config) -> np.ndarray:
    """float32 logits [T, V] of transformers' model for the GGUF at ``path`` (dequantized
    by its own loader); ``config`` overrides hyperparameters it does not read from GGUFs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, **config).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()
