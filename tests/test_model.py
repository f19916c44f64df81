"""The llama-family forward on tiny random GGUF models, against a dense float64 reference.

The reference reads the file's tensors as llama.cpp lays them out (q/k rows permuted
for llama, so RoPE rotates interleaved pairs; qwen2 unpermuted, NEOX pairs) and runs
plain causal attention without any cache, so it checks the loader's un-permutation,
RoPE, GQA, biases, norms and the MLP independently of the cache and kernels.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kvslim.attention import Attention, plan_attention
from kvslim.engine import run_step
from kvslim.gguf_loader import GGUFError, ModelConfig, open_gguf
from kvslim.models import ARCHITECTURES, load_model, model_class

import tiny_llama
from tiny_llama import Tiny


def load(path, device="cpu"):
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    return load_model(reader, config, device, progress=False)


def make(tmp_path, t: Tiny = Tiny(), seed: int = 0):
    path = tmp_path / f"{t.arch}-{seed}.gguf"
    arrays = tiny_llama.write(path, t, seed)
    return load(path), arrays


def rope_ref(x: np.ndarray, pos: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
    """x [T, h, D] float64 rotated at positions pos [T]."""
    d = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, d, 2) / d)  # [T, D/2]
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    if interleaved:  # llama.cpp "normal": pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., :d // 2], x[..., d // 2:]  # NEOX: pairs (i, i + D/2)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def reference_logits(a: dict, t: Tiny, ids: list[int]) -> np.ndarray:
    """float64 logits [T, V] of a dense forward over ``ids``."""
    a = {k: v.astype(np.float64) for k, v in a.items()}
    T, hd, g = len(ids), t.head_dim, t.n_heads // t.n_kv_heads
    pos = np.arange(T, dtype=np.float64)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + t.eps) * w

    x = a["token_embd.weight"][ids]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(t.n_layers):
        p = f"blk.{i}."
        h = norm(x, a[p + "attn_norm.weight"])
        proj = {n: h @ a[p + f"attn_{n}.weight"].T + a.get(p + f"attn_{n}.bias", 0) for n in "qkv"}
        q = rope_ref(proj["q"].reshape(T, t.n_heads, hd), pos, t.rope_base, t.arch != "qwen2")
        k = rope_ref(proj["k"].reshape(T, t.n_kv_heads, hd), pos, t.rope_base, t.arch != "qwen2")
        v = proj["v"].reshape(T, t.n_kv_heads, hd)
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(mask, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, -1)
        x = x + o @ a[p + "attn_output.weight"].T
        h = norm(x, a[p + "ffn_norm.weight"])
        gate, up = h @ a[p + "ffn_gate.weight"].T, h @ a[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ a[p + "ffn_down.weight"].T
    out = a.get("output.weight", a["token_embd.weight"])
    return norm(x, a["output_norm.weight"]) @ out.T


def run(model, ids_per_seq, cache_type="f32", chunk=None, flash_attn="auto"):
    """All-position logits per sequence, fed together (or in chunks of ``chunk`` rows)."""
    plan = plan_attention("cpu", model.config.head_dim, cache_type, cache_type, flash_attn, warn=False)
    cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v)
    seqs = [cache.new_sequence() for _ in ids_per_seq]
    attn = Attention(plan)
    out = [[] for _ in ids_per_seq]
    longest = max(len(ids) for ids in ids_per_seq)
    step = chunk or longest
    for lo in range(0, longest, step):
        parts = [ids[lo:lo + step] for ids in ids_per_seq]
        live = [b for b, part in enumerate(parts) if part]
        tokens = torch.tensor([tok for b in live for tok in parts[b]])
        logits = run_step(model, attn, cache, [seqs[b] for b in live], [len(parts[b]) for b in live],
                          tokens.tolist())
        r = 0
        for b in live:
            out[b].append(logits[r:r + len(parts[b])])
            r += len(parts[b])
    cache.check()
    return [torch.cat(o) for o in out], cache, seqs


IDS = [1, 270, 266, 262, 100, 35, 45, 7, 262, 271, 68, 99, 120, 3, 259, 265, 88, 200, 31, 260]


@pytest.mark.parametrize("t", [
    Tiny(),
    Tiny(arch="qwen2", qkv_bias=True, tied=False),
    Tiny(arch="mistral", n_kv_heads=1, n_layers=3),
], ids=["llama", "qwen2-bias-untied", "mistral-mqa"])
def test_forward_matches_dense_reference(tmp_path, t):
    model, a = make(tmp_path, t)
    (logits,), _, _ = run(model, [IDS])
    ref = reference_logits(a, t, IDS)
    err = np.abs(logits.double().numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{t.arch}: max relative error {err}"


def test_head_dim_not_multiple_of_32_pads_the_cache_and_falls_back(tmp_path, caplog):
    t = Tiny(d_model=96, n_heads=2, n_kv_heads=1)  # head_dim 48
    model, a = make(tmp_path, t)
    assert model.cache_head_dim == 64
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        plan = plan_attention("cpu", model.config.head_dim, "q8_0", "q8_0")
    assert (plan.effective_k, plan.effective_v) == ("f16", "f16")
    assert "not a multiple of 32" in caplog.text
    (logits,), _, _ = run(model, [IDS], cache_type="f32")
    ref = reference_logits(a, t, IDS)
    assert np.abs(logits.double().numpy() - ref).max() / np.abs(ref).max() < 1e-5


def test_chunked_prefill_equals_one_shot(tmp_path):
    model, _ = make(tmp_path)
    (whole,), _, _ = run(model, [IDS], cache_type="q8_0")
    for chunk in (1, 3, 7):
        (parts,), _, _ = run(model, [IDS], cache_type="q8_0", chunk=chunk)
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)


def test_batched_decode_equals_each_alone(tmp_path):
    model, _ = make(tmp_path)
    prompts = [IDS[:5], IDS[3:12], IDS[:1], IDS[7:20]]
    # all four together, one row each step (ragged lengths): with a q4_0 cache, each equals
    # its own run one row a step bit for bit (a row's result is its own, whatever else the
    # step holds); with a float32 cache, it also equals its prompt fed at once, up to the
    # float sums' order (GEMM tiles there, GEMV rows here). (A q4_0 cache turns that order
    # into a flipped 4-bit code now and then: not a batching question.)
    for cache_type in ("q4_0", "f32"):
        together, _, _ = run(model, [p + IDS[:6] for p in prompts], cache_type=cache_type, chunk=1)
        for p, logits in zip(prompts, together):
            if cache_type == "q4_0":
                (alone,), _, _ = run(model, [p + IDS[:6]], cache_type=cache_type, chunk=1)
                assert torch.equal(logits, alone)
            else:
                (alone,), _, _ = run(model, [p + IDS[:6]], cache_type=cache_type)
                torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


def test_logit_rows_select_rows(tmp_path):
    model, _ = make(tmp_path)
    plan = plan_attention("cpu", model.config.head_dim, "f16", "f16", warn=False)
    cache = model.new_cache(8, 16, "f16", "f16")
    s = cache.new_sequence()
    rows = run_step(model, Attention(plan), cache, [s], [len(IDS)], IDS, torch.tensor([4, 19]))
    (full,), _, _ = run(model, [IDS], cache_type="f16")
    assert rows.shape == (2, full.shape[1]) and rows.dtype == torch.float32
    torch.testing.assert_close(rows, full[[4, 19]], rtol=1e-4, atol=1e-4)


def test_error_mid_forward_rolls_the_cache_back(tmp_path):
    model, _ = make(tmp_path)
    plan = plan_attention("cpu", model.config.head_dim, "q8_0", "q8_0", warn=False)
    attn = Attention(plan)
    cache = model.new_cache(8, 16, plan.effective_k, plan.effective_v)
    a, b = cache.new_sequence(), cache.new_sequence()
    run_step(model, attn, cache, [a], [10], IDS[:10])
    pages = cache.pages_in_use

    calls = {"n": 0}

    class Failing(Attention):  # layer 1 writes its rows, then its kernel fails
        def __call__(self, q, k, v, layer, step, scale):
            calls["n"] += 1
            if layer == 1:
                self.backend.write(step.cache, layer, step, k, v)
                raise RuntimeError("kernel failed")
            return super().__call__(q, k, v, layer, step, scale)

    with pytest.raises(RuntimeError, match="kernel failed"):
        run_step(model, Failing(plan), cache, [a, b], [3, 5], IDS[:8])
    assert calls["n"] == 2  # it failed after layer 0 had written its rows
    assert (cache.length(a), cache.length(b), cache.pages_in_use) == (10, 0, pages)
    cache.check()
    # the next step overwrites the abandoned rows: same logits as a cache that never failed
    after = run_step(model, attn, cache, [a], [2], IDS[10:12])
    (clean,), _, _ = run(model, [IDS[:12]], cache_type="q8_0")
    torch.testing.assert_close(after, clean[10:12], rtol=1e-4, atol=1e-4)


def test_registry_lists_supported_architectures():
    assert set(ARCHITECTURES) >= {"llama", "mistral", "qwen2"}
    with pytest.raises(GGUFError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2"):
        model_class("gpt2")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    model, a = make(tmp_path)
    config = model.config
    config.rope_scaling_type = "yarn"
    with pytest.raises(GGUFError, match="rope scaling 'yarn'"):
        type(model)(config, {k: torch.from_numpy(v) for k, v in a.items()})
