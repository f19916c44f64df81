"""Architectures beside llama and gemma on tiny random GGUFs, against transformers
loading the same file: qwen3, llama with Llama 3 RoPE scaling; and the clear errors for
what a GGUF declares that kvslim does not run."""
from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.models import load_model
from test_model import IDS, run
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
