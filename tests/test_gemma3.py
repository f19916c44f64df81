"""Gemma 3 (and Gemma 2) on tiny random GGUFs: against transformers loading the same
file, and the sliding window through every cache type, chunked prefill, batching and
the K/V coding.

The tiny model has 7 layers (layer 5 global, the others on a window of 5 tokens) and
sequences of 40 tokens, so most keys fall outside the window.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from kvslim import formats
from kvslim.attention import Attention, plan_attention
from kvslim.calibration import build_codec
from kvslim.codec import CodecChoice
from kvslim.engine import run_step
from kvslim.gguf_loader import GGUFError, ModelConfig, open_gguf
from kvslim.models import load_model
from test_model import IDS, run
from tiny_models import TinyGemma2, TinyGemma3

T = TinyGemma3(head_dim_=64)
IDS40 = IDS + IDS[::-1]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3") / "tiny.gguf"
    tiny_models.write_gemma3(path, T)
    reader = open_gguf(path)
    return path, load_model(reader, ModelConfig.from_gguf(reader), progress=False)


def test_config_reads_the_window_and_its_layers(gemma):
    c = gemma[1].config
    assert c.sliding_window == 5 and c.head_dim == 64 and c.d_model == 64
    assert [c.layer_window(i) for i in range(7)] == [5, 5, 5, 5, 5, 0, 5]
    assert c.rope_base == 1e6 and c.rope_base_local == 1e4
    assert c.query_scale == pytest.approx(1 / 8)


def test_matches_transformers(gemma):
    """transformers dequantizes and runs the same file with its own Gemma3 code; it does
    not read query_pre_attn_scalar from GGUFs (default 256), so it is passed as head_dim."""
    pytest.importorskip("transformers")
    path, model = gemma
    ref = tiny_models.transformers_logits(path, IDS40, query_pre_attn_scalar=T.head_dim)
    (ours,), _, _ = run(model, [IDS40], "f32", flash_attn="off")
    err = np.abs(ours.numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"max error {err:.2e} of the largest logit"
    # the window matters here: the same weights attending to every key differ
    reader = open_gguf(path)
    c = ModelConfig.from_gguf(reader)
    c.swa_layers = ()
    (unwindowed,), _, _ = run(load_model(reader, c, progress=False), [IDS40], "f32")
    assert np.abs(unwindowed.numpy() - ref).max() / np.abs(ref).max() > 1e-2


@pytest.mark.parametrize("flash_attn", ["off", "auto"])
def test_chunks_and_batches_equal_one_shot(gemma, flash_attn):
    """Chunked prefill (chunks of 3 and 7 rows straddle the window) and two sequences
    decoded together, on the reference path and on the CPU plan (fused kernel until a
    sequence outgrows the window, the tiled path after)."""
    model = gemma[1]
    (whole,), _, _ = run(model, [IDS40], "f32", flash_attn="off")
    for chunk in (1, 3, 7):
        (got, other), _, _ = run(model, [IDS40, IDS40[:23]], "f32", chunk, flash_attn)
        torch.testing.assert_close(got, whole, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(other, whole[:23], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_type", formats.TYPES)
def test_every_cache_type_tracks_f32(gemma, cache_type):
    model = gemma[1]
    (ref,), _, _ = run(model, [IDS40], "f32")
    (got,), _, _ = run(model, [IDS40], cache_type, chunk=9)
    lp, lq = ref.double().log_softmax(-1), got.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert kl < (1e-6 if not formats.is_quantized(cache_type) else 0.05), f"{cache_type}: KL {kl:.2e}"


def test_kv_coding_is_exact_on_a_float_cache(gemma):
    """Rotation (head_dim 64) and key/value centering, calibrated through the per-layer
    RoPE bases, change nothing on an f32 cache: the transforms are undone exactly."""
    model = gemma[1]
    (ref,), _, _ = run(model, [IDS40], "f32")
    choice = CodecChoice(64, 64, True, True, "ggml", "ggml")
    codec = build_codec(model, None, choice, n_positions=64)
    assert codec is not None and codec.centered_k and codec.rotation_k is not None
    plan = plan_attention("cpu", model.config.head_dim, "f32", "f32", warn=False)
    cache = model.new_cache(8, 16, "f32", "f32", codec=codec)
    seq = cache.new_sequence()
    attn = Attention(plan)
    got = [run_step(model, attn, cache, [seq], [len(IDS40[a:a + 6])], IDS40[a:a + 6])
           for a in range(0, len(IDS40), 6)]
    torch.testing.assert_close(torch.cat(got), ref, atol=2e-4, rtol=1e-4)


def test_unknown_rope_scaling_is_refused(tmp_path):
    path = tmp_path / "g.gguf"
    tiny_models.write_gemma3(path, T)
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    config.rope_scaling_type = "yarn"
    with pytest.raises(GGUFError, match="rope scaling 'yarn'"):
        load_model(reader, config, progress=False)


def test_gemma2_matches_transformers(tmp_path):
    """Gemma 2: no q/k norms, attention and final soft-capping (set small in the file so
    they bite), every other layer windowed. transformers reads none of these three from
    a GGUF but the window, so they are passed to it."""
    pytest.importorskip("transformers")
    t = TinyGemma2(head_dim_=64)
    path = tmp_path / "g2.gguf"
    tiny_models.write_gemma2(path, t)
    reader = open_gguf(path)
    model = load_model(reader, ModelConfig.from_gguf(reader), progress=False)
    c = model.config
    assert (c.attn_softcap, c.final_softcap) == (3.0, 5.0)
    assert [c.layer_window(i) for i in range(4)] == [5, 0, 5, 0]
    ref = tiny_models.transformers_logits(path, IDS40, query_pre_attn_scalar=t.head_dim,
                                          attn_logit_softcapping=t.attn_softcap,
                                          final_logit_softcapping=t.final_softcap)
    assert np.abs(ref).max() <= t.final_softcap  # capped (tanh saturates in float32)
    for flash_attn, chunk in (("off", None), ("auto", 7)):
        (ours,), _, _ = run(model, [IDS40], "f32", chunk, flash_attn)
        err = np.abs(ours.numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"{flash_attn}, chunk {chunk}: max error {err:.2e}"
