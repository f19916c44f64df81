"""Architectures beside llama and gemma on tiny random GGUFs, against transformers
loading the same file: qwen3, phi3, llama with Llama 3 RoPE scaling; and the clear errors for
what a GGUF declares that kvslim does not run."""
from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.models import load_model
from test_model import IDS, run
from kvslim.gguf_loader import GGUFError
from tiny_llama import Tiny
from tiny_models import TinyQwen3

IDS40 = IDS + IDS[::-1]


def _load(path):
    reader = open_gguf(path)
    return load_model(reader, ModelConfig.from_gguf(reader), progress=False)


def _check(model, ref, label):
    for flash_attn, chunk in (("off", None), ("auto", 7)):
        (ours,), _, _ = run(model, [IDS40], "f32", chunk, flash_attn)
        err = np.abs(ours.numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-5, f"{label} {flash_attn}, chunk {chunk}: max error {err:.2e}"


def test_qwen3_matches_transformers(tmp_path):
    """transformers does not read head_dim from qwen3 GGUFs (default 128): passed."""
    pytest.importorskip("transformers")
    t = TinyQwen3()
    path = tmp_path / "q3.gguf"
    tiny_models.write_qwen3(path, t)
    model = _load(path)
    assert model.config.head_dim == 32 and not model.config.qkv_bias
    ref = tiny_models.transformers_logits(path, IDS40, head_dim=t.head_dim)
    _check(model, ref, "qwen3")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("declare", [None, "llama3"])
def test_llama3_rope_scaling_matches_transformers(tmp_path, declare):
    """Frequencies in all three bands (kept, divided by 8, smoothed) over 40 positions;
    transformers gets the scaling as its rope_parameters (it ignores rope_freqs.weight)."""
    pytest.importorskip("transformers")
    t = Tiny()
    path = tmp_path / "l3.gguf"
    tiny_models.write_llama3(path, t, LLAMA3_ROPE, declare=declare)
    model = _load(path)
    ref = tiny_models.transformers_logits(path, IDS40,
                                          rope_parameters={**LLAMA3_ROPE, "rope_theta": t.rope_base})
    _check(model, ref, "llama3")
    plain = tiny_models.transformers_logits(path, IDS40)  # the scaling matters here
    assert np.abs(plain - ref).max() / np.abs(ref).max() > 1e-3


def test_llama3_scaling_without_its_tensor_is_refused(tmp_path):
    path = tmp_path / "l3.gguf"
    tiny_models.write_llama3(path, Tiny(), LLAMA3_ROPE, declare="llama3")
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    config.rope_freq_factors = False
    with pytest.raises(GGUFError, match="rope scaling 'llama3' is not supported"):
        load_model(reader, config, progress=False)


def test_mixture_of_experts_is_refused_by_name(tmp_path):
    import gguf

    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    tiny_models._common_keys(w, Tiny())
    w.add_uint32("llama.expert_count", 8)
    tiny_models._finish(w, {"blk.0.ffn_gate_exps.weight": np.zeros((8, 4, 4), np.float32)})
    with pytest.raises(GGUFError, match=r"mixture-of-experts .*blk\.0\.ffn_gate_exps\.weight"):
        ModelConfig.from_gguf(open_gguf(path))


def test_phi3_fused_weights_and_partial_rotary_match_transformers(tmp_path):
    """RoPE on 3/4 of each head (Phi-3.5 / Phi-4-mini style); transformers takes the
    factor in rope_parameters (it does not read rope.dimension_count for phi3)."""
    pytest.importorskip("transformers")
    t = Tiny(arch="phi3", tied=False)
    path = tmp_path / "phi3.gguf"
    tiny_models.write_phi3(path, t, rope_dim=24)
    model = _load(path)
    assert model.config.rope_dim == 24
    ref = tiny_models.transformers_logits(path, IDS40, pad_token_id=0, rope_parameters={
        "rope_type": "default", "rope_theta": t.rope_base, "partial_rotary_factor": 24 / t.head_dim})
    _check(model, ref, "phi3")


def test_phi3_longrope_is_refused_by_name(tmp_path):
    path = tmp_path / "phi3.gguf"
    tiny_models.write_phi3(path, Tiny(arch="phi3"), rope_dim=32, longrope=True)
    with pytest.raises(GGUFError, match="LongRoPE .*rope_factors_long"):
        _load(path)
