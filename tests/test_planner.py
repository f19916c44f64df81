"""`kvslim plan` arithmetic on headers of 8B and 70B models, and on SmolLM2.

The big files are GGUF headers written with gguf.GGUFWriter (real tensor infos, Q4_0
matrices and F32 norms) followed by a sparse hole as long as the tensor data, so the
reader accepts them and no disk is used. Expected figures are worked out by hand.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from kvslim import formats
from kvslim.attention import plan_attention
from kvslim.cache import DEFAULT_PAGE_SIZE, KVCache
from kvslim.gguf_loader import ModelConfig
from kvslim.planner import (
    effective_types,
    kv_bytes,
    kv_bytes_per_token,
    parse_memory,
    parse_type_pair,
    parse_types,
    plan,
)

Q4_0 = gguf.GGMLQuantizationType.Q4_0
F32 = gguf.GGMLQuantizationType.F32
GiB = 2**30

LLAMA3_8B = dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256, ctx=8192)
LLAMA3_70B = dict(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, ffn=28672, vocab=128256, ctx=131072)  # 3.1


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """numpy/torch shapes ([out, in]) of a llama-3 model with separate output head."""
    d, hd = s["d_model"], s["d_model"] // s["n_heads"]
    kv = s["n_kv_heads"] * hd
    shapes = {"token_embd.weight": (s["vocab"], d), "output_norm.weight": (d,), "output.weight": (s["vocab"], d)}
    for i in range(s["n_layers"]):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                   p + "attn_q.weight": (d, d), p + "attn_k.weight": (kv, d), p + "attn_v.weight": (kv, d),
                   p + "attn_output.weight": (d, d), p + "ffn_gate.weight": (s["ffn"], d),
                   p + "ffn_up.weight": (s["ffn"], d), p + "ffn_down.weight": (d, s["ffn"])}
    return shapes


def write_header_only(path: Path, s: dict) -> Path:
    """A GGUF with real tensor infos (matrices Q4_0, norms F32) and a sparse data region."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": s["n_layers"], "context_length": s["ctx"], "embedding_length": s["d_model"],
                     "feed_forward_length": s["ffn"], "attention.head_count": s["n_heads"],
                     "attention.head_count_kv": s["n_kv_heads"], "vocab_size": s["vocab"]}.items():
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 500000.0)
    data_bytes = 0
    for name, shape in tensor_shapes(s).items():
        n = int(np.prod(shape))
        nbytes = n * 4 if len(shape) == 1 else n // 32 * 18
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=F32 if len(shape) == 1 else Q4_0)
        data_bytes += -(-nbytes // 32) * 32  # each tensor padded to the 32-byte alignment
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data_start = -(-path.stat().st_size // 32) * 32
    os.truncate(path, data_start + data_bytes)  # a hole: the tensor data reads as zeros
    return path


@pytest.fixture(scope="module")
def gguf_8b(tmp_path_factory) -> Path:
    return write_header_only(tmp_path_factory.mktemp("8b") / "llama3-8b.gguf", LLAMA3_8B)


@pytest.fixture(scope="module")
def gguf_70b(tmp_path_factory) -> Path:
    return write_header_only(tmp_path_factory.mktemp("70b") / "llama3-70b.gguf", LLAMA3_70B)


# Llama-3-8B: 8,030,261,248 parameters, of which 32 x 2 x 4096 + 4096 = 266,240 are norms (F32).
WEIGHTS_8B = (8_030_261_248 - 266_240) * 18 // 32 + 266_240 * 4  # 4,517,937,152
# Llama-3-70B: 70,553,706,496 parameters, 80 x 2 x 8192 + 8192 = 1,318,912 of them norms.
WEIGHTS_70B = (70_553_706_496 - 1_318_912) * 18 // 32 + 1_318_912 * 4


# ---------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("text,expect", [
    ("8GiB", 8 * GiB), ("8gib", 8 * GiB), ("8GB", 8 * 10**9), ("8192MiB", 8 * GiB), ("512M", 512 * 2**20),
    ("1.5GiB", 1_610_612_736), (" 24 GiB ", 24 * GiB), ("1T", 2**40), ("4096", 4096), ("100kb", 100_000),
    (12345, 12345),
])
def test_parse_memory(text, expect):
    assert parse_memory(text) == expect


@pytest.mark.parametrize("text,match", [
    ("-8GiB", "positive"), ("0GiB", "positive"), (0, "positive"), ("8 parsecs", "unknown unit 'parsecs'"),
    ("eight gigs", "bad memory size"), ("", "bad memory size"), ("8GiB8", "bad memory size"), ("1e9", "bad memory size"),
])
def test_parse_memory_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_memory(text)


def test_parse_types():
    assert parse_type_pair("q8_0") == ("q8_0", "q8_0")
    assert parse_type_pair("Q8_0/q4_0") == ("q8_0", "q4_0")
    assert parse_type_pair(("f16", "q5_1")) == ("f16", "q5_1")
    assert parse_types("f16, q8_0,q8_0/q4_0,q8_0") == [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0")]


@pytest.mark.parametrize("spec", ["q3_k", "q8_0/q9", "Q2_K/f16"])
def test_unknown_type_lists_valid_ones(spec):
    with pytest.raises(ValueError, match="valid types") as e:
        parse_type_pair(spec)
    assert all(t in str(e.value) for t in formats.TYPES)


@pytest.mark.parametrize("spec", ["q8_0/q4_0/f16", "/q4_0", "q8_0/"])
def test_malformed_type_pair(spec):
    with pytest.raises(ValueError, match="expected TYPE or K_TYPE/V_TYPE"):
        parse_type_pair(spec)


# ---------------------------------------------------------------------------
# Arithmetic


def cfg(**kw) -> ModelConfig:
    base = dict(arch="llama", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                vocab_size=128256, context_length=8192)
    return ModelConfig(**(base | kw))


def test_kv_bytes_per_token_by_hand():
    c = cfg()
    # 32 layers x 8 kv heads x (128 + 128 values) x 2 bytes
    assert kv_bytes_per_token(c, "f16", "f16") == 131_072
    # q8_0: 128 values = 4 blocks of 34 bytes = 136 per head row
    assert kv_bytes_per_token(c, "q8_0", "q8_0") == 32 * 8 * (136 + 136) == 69_632
    # q8_0 K + q4_0 V: 136 + 4 x 18
    assert kv_bytes_per_token(c, "q8_0", "q4_0") == 32 * 8 * (136 + 72) == 53_248
    assert kv_bytes_per_token(cfg(n_layers=80, d_model=8192, n_heads=64), "f16", "f16") == 327_680


def test_ollama_estimate_undercounts():
    c = cfg()
    elements = c.n_layers * c.n_kv_heads * (c.head_dim + c.v_head_dim)
    ollama_q8, ollama_q4 = elements * 1.0, elements * 0.5  # Ollama's bytes per element
    assert kv_bytes_per_token(c, "q8_0", "q8_0") == ollama_q8 * 1.0625  # +6.25%: the fp16 scale per 32
    assert kv_bytes_per_token(c, "q4_0", "q4_0") == ollama_q4 * 1.125  # +12.5%


def test_kv_bytes_rounds_up_to_pages():
    c = cfg()
    assert DEFAULT_PAGE_SIZE == 64
    assert kv_bytes(c, 1, 1, "f16", "f16") == 64 * 131_072
    assert kv_bytes(c, 64, 1, "f16", "f16") == 64 * 131_072
    assert kv_bytes(c, 65, 3, "f16", "f16") == 3 * 128 * 131_072
    assert kv_bytes(c, 65, 1, "f16", "f16", page_size=16) == 80 * 131_072


@pytest.mark.parametrize("k,v", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_1", "q5_1"),
                                 ("iq4_nl", "bf16"), ("f32", "q5_0")])
@pytest.mark.parametrize("ctx,parallel,page", [(100, 3, 64), (64, 1, 64), (33, 2, 16)])
def test_kv_bytes_equals_allocated_cache(k, v, ctx, parallel, page):
    c = cfg(n_layers=3, d_model=576, n_heads=9, n_kv_heads=3, context_length=8192)  # head_dim 64
    n_pages = parallel * -(-ctx // page)
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, n_pages, page_size=page, cache_type_k=k, cache_type_v=v)
    assert kv_bytes(c, ctx, parallel, k, v, page) == cache.nbytes


def test_effective_types_match_attention_rule():
    c = cfg(d_model=48 * 32)  # head_dim 48
    assert c.head_dim == 48
    for k, v in [("q8_0", "q8_0"), ("q8_0", "f16"), ("f32", "q4_0"), ("bf16", "f16")]:
        ek, ev, reason = effective_types(c, k, v)
        p = plan_attention("cpu", 48, k, v, warn=False)
        assert (ek, ev) == (p.effective_k, p.effective_v)
        assert (reason is None) == (not formats.is_quantized(k) and not formats.is_quantized(v))
    assert effective_types(cfg(), "q4_0", "q8_0") == ("q4_0", "q8_0", None)


# ---------------------------------------------------------------------------
# Plans on headers of real model shapes


def test_plan_8b(gguf_8b):
    p = plan(gguf_8b, "8GiB", parallel=4, ctx=4000, types="f16,q8_0,q8_0/q4_0")
    assert p["model"] == str(gguf_8b)
    assert p["weights_bytes"] == WEIGHTS_8B == 4_517_937_152
    assert (p["memory"], p["parallel"], p["ctx"], p["context_length"]) == (8 * GiB, 4, 4000, 8192)
    assert list(p["types"]) == ["f16/f16", "q8_0/q8_0", "q8_0/q4_0"]
    budget = 8 * GiB - WEIGHTS_8B  # 4,071,997,440 bytes for the cache
    f16 = p["types"]["f16/f16"]
    # 4 sequences of whole 64-token pages at 131,072 B/token: 33,554,432 B per page for all four.
    assert budget // 33_554_432 == 121
    assert f16["kv_bytes_per_token"] == 131_072
    assert (f16["max_ctx"], f16["max_ctx_capped"]) == (121 * 64, False)  # 7,744 tokens each
    # --ctx 4000 rounds up to 63 pages = 4,032 tokens per sequence
    assert f16["bytes_at_ctx"] == 4 * 4032 * 131_072 == 2_113_929_216
    assert f16["total_bytes_at_ctx"] == WEIGHTS_8B + 2_113_929_216 and f16["fits_at_ctx"]
    q8 = p["types"]["q8_0/q8_0"]
    assert (q8["effective_k"], q8["effective_v"], q8["fallback"]) == ("q8_0", "q8_0", None)
    assert q8["max_ctx"] == 8192 and q8["max_ctx_capped"]  # memory allows 14,592: the model caps it
    assert budget // (4 * 64 * 69_632) * 64 == 14_592
    assert p["types"]["q8_0/q4_0"]["bytes_at_ctx"] == 4 * 4032 * 53_248


def test_plan_8b_defaults_and_ctx_cap(gguf_8b):
    p = plan(gguf_8b, "5GiB")
    assert p["ctx"] == 8192 and p["parallel"] == 1
    assert list(p["types"]) == ["f16/f16", "q8_0/q8_0", "fp8_e4m3/fp8_e4m3",
                                "fp8_e5m2/fp8_e5m2", "q8_0/q4_0", "q5_0/q5_0", "q4_0/q4_0", "iq4_nl/iq4_nl"]
    budget = 5 * GiB - WEIGHTS_8B  # 850,771,968
    f16, q8 = p["types"]["f16/f16"], p["types"]["q8_0/q8_0"]
    assert budget // (64 * 131_072) == 101
    assert (f16["max_ctx"], f16["max_ctx_capped"]) == (101 * 64, False)
    assert budget // (64 * 69_632) == 190  # 12,160 tokens would fit: capped at 8192
    assert (q8["max_ctx"], q8["max_ctx_capped"]) == (8192, True)
    assert f16["bytes_at_ctx"] == 8192 * 131_072 and not f16["fits_at_ctx"]
    assert q8["fits_at_ctx"]
    with pytest.raises(ValueError, match="context length 8192"):
        plan(gguf_8b, "6GiB", ctx=9000)


def test_plan_70b(gguf_70b):
    p = plan(gguf_70b, "48GiB", parallel=2, ctx=8192, types=["q8_0", "f16"])
    assert p["weights_bytes"] == WEIGHTS_70B == 39_690_993_664
    budget = 48 * GiB - WEIGHTS_70B  # 11,848,613,888
    q8 = p["types"]["q8_0/q8_0"]
    assert q8["kv_bytes_per_token"] == 80 * 8 * (136 + 136) == 174_080
    assert (q8["max_ctx"], q8["max_ctx_capped"]) == (531 * 64, False)  # 33,984 tokens per sequence
    assert budget // (2 * 64 * 174_080) == 531
    f16 = p["types"]["f16/f16"]
    assert budget // (2 * 64 * 327_680) == 282
    assert f16["max_ctx"] == 282 * 64
    assert f16["bytes_at_ctx"] == 2 * 8192 * 327_680 == 5_368_709_120 and f16["fits_at_ctx"]
    assert q8["bytes_at_ctx"] == 2 * 8192 * 174_080


def test_plan_weights_do_not_fit(gguf_70b):
    p = plan(gguf_70b, "32GiB", ctx=512, types="q4_0")
    assert p["weights_fit"] is False
    q4 = p["types"]["q4_0/q4_0"]
    assert q4["max_ctx"] == 0 and not q4["fits_at_ctx"]


def test_plan_reports_f16_fallback():
    c = cfg(d_model=48 * 32, n_layers=2, context_length=1024)  # head_dim 48: no 32-value blocks
    p = plan(c, "1GiB", types="q8_0/q4_0")
    t = p["types"]["q8_0/q4_0"]
    assert (t["k"], t["v"], t["effective_k"], t["effective_v"]) == ("q8_0", "q4_0", "f16", "f16")
    assert "head_dim 48" in t["fallback"]
    assert t["kv_bytes_per_token"] == 2 * 8 * (48 * 2 + 48 * 2)


def test_plan_bad_args(gguf_8b):
    with pytest.raises(ValueError, match="valid types"):
        plan(gguf_8b, "8GiB", types="q8_0/q2")
    with pytest.raises(ValueError, match="parallel"):
        plan(gguf_8b, "8GiB", parallel=0)
    with pytest.raises(ValueError, match="bad memory size"):
        plan(gguf_8b, "lots")


# ---------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_plan_smollm2(smollm2_gguf):
    p = plan(smollm2_gguf, "1GiB", parallel=2, ctx=2048, types="f16,q8_0,q4_0")
    assert p["weights_bytes"] == 96_576_768  # sum of the tensors' stored bytes
    assert p["context_length"] == 8192
    f16, q8, q4 = (p["types"][t] for t in ("f16/f16", "q8_0/q8_0", "q4_0/q4_0"))
    # 30 layers x 3 kv heads x 64 dims x 2 (K and V)
    assert f16["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 2 == 23_040
    assert q8["kv_bytes_per_token"] == 30 * 3 * (68 + 68) == 12_240
    assert q4["kv_bytes_per_token"] == 30 * 3 * (36 + 36) == 6_480
    assert f16["bytes_at_ctx"] == 2 * 2048 * 23_040
    budget = GiB - 96_576_768
    assert f16["max_ctx"] == min(8192, budget // (2 * 64 * 23_040) * 64) == 8192 and f16["max_ctx_capped"]
    assert all(t["fallback"] is None for t in p["types"].values())
