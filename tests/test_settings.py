"""kvslim.settings: one resolution of arguments, environment and defaults for the
Python API, the CLI and the server."""
from __future__ import annotations

import pytest
import torch

from kvslim.codec import CodecSettings
from kvslim.settings import (compute_dtype, parse_mode, pick_device, resolve_cache_types,
                             resolve_codec, resolve_flash_attn, resolve_num_ctx)


def test_settings_resolution():
    env = {"KVSLIM_KV_CACHE_TYPE": "q4_0", "KVSLIM_FLASH_ATTENTION": "1"}
    assert resolve_cache_types(env=env) == ("q4_0", "q4_0")
    assert resolve_cache_types("q8_0", None, "f16", env=env) == ("q8_0", "f16")
    assert resolve_cache_types(cache_type_k="Q8_0", env={}) == ("q8_0", "f16")
    with pytest.raises(ValueError, match="valid types: f32, f16"):
        resolve_cache_types("q9", env={})
    assert resolve_flash_attn(env=env) == "on"
    assert resolve_flash_attn("off", env=env) == "off"
    assert resolve_flash_attn(env={"KVSLIM_FLASH_ATTENTION": "false"}) == "off"
    assert resolve_flash_attn(env={}) == "auto"
    cpu = torch.device("cpu")
    assert resolve_num_ctx(None, 8192, cpu, env={}) == 4096
    assert resolve_num_ctx(None, 2048, cpu, env={}) == 2048
    assert resolve_num_ctx(None, 8192, cpu, env={"KVSLIM_CONTEXT_LENGTH": "16384"}) == 8192
    with pytest.raises(ValueError, match="maximum context is 8192"):
        resolve_num_ctx(9000, 8192, cpu, env={})


def test_device_choice_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="no Apple MPS"):
        pick_device("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        pick_device("tpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(None) == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert compute_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert compute_dtype(torch.device("cuda")) == torch.float16  # e.g. Pascal / Turing
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype(torch.device("cuda")) == torch.bfloat16


def test_codec_settings_resolution():
    env = {"KVSLIM_KV_ROTATION": "0", "KVSLIM_KV_CENTERING": "true", "KVSLIM_KV_ROUNDING": "ggml"}
    assert resolve_codec(env=env) == CodecSettings("off", "on", "ggml")
    assert resolve_codec("ON", None, "lsq", env=env) == CodecSettings("on", "on", "lsq")
    assert resolve_codec(False, env={}).rotation == "off"
    assert resolve_codec(rounding="ggml", base=CodecSettings()) == CodecSettings("auto", "auto", "ggml")
    with pytest.raises(ValueError, match="kv_rotation must be one of auto, on, off"):
        resolve_codec("sometimes", env={})
    with pytest.raises(ValueError, match="kv_rounding must be one of auto, lsq, ggml"):
        resolve_codec(rounding="on", env={})


def test_one_parser_for_booleans_and_modes():
    for word in ("1", "true", "YES", " on ", True):
        assert parse_mode("x", word) == "on"
    for word in ("0", "False", "no", "off", False):
        assert parse_mode("x", word) == "off"
    assert parse_mode("x", None) == parse_mode("x", "") == "auto"
    assert parse_mode("x", None, ("on", "off"), default="on") == "on"
    with pytest.raises(ValueError, match="x must be one of auto, on, off, got 'maybe'"):
        parse_mode("x", "maybe")
    with pytest.raises(ValueError, match="flash attention must be one of auto, on, off"):
        resolve_flash_attn("sometimes", env={})


def test_every_setting_ollama_has_is_read_from_its_ollama_name_kvslim_winning():
    from kvslim.settings import ServerSettings

    ollama_env = {"OLLAMA_HOST": "0.0.0.0:8080", "OLLAMA_KV_CACHE_TYPE": "q8_0",
                  "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_NUM_PARALLEL": "3",
                  "OLLAMA_MAX_LOADED_MODELS": "2", "OLLAMA_MAX_QUEUE": "7",
                  "OLLAMA_CONTEXT_LENGTH": "1024", "OLLAMA_KEEP_ALIVE": "1h30m"}
    s = ServerSettings.from_env(ollama_env)
    assert (s.host, s.port, s.cache_type_k, s.cache_type_v, s.flash_attn, s.num_parallel,
            s.max_loaded_models, s.max_queue, s.keep_alive) == \
        ("0.0.0.0", 8080, "q8_0", "q8_0", "on", 3, 2, 7, 5400.0)
    assert resolve_num_ctx(None, 8192, torch.device("cpu"), env=ollama_env) == 1024
    ours = {"KVSLIM_HOST": "127.0.0.1:9", "KVSLIM_KV_CACHE_TYPE": "q4_0", "KVSLIM_FLASH_ATTENTION": "0",
            "KVSLIM_NUM_PARALLEL": "5", "KVSLIM_MAX_LOADED_MODELS": "4", "KVSLIM_MAX_QUEUE": "9",
            "KVSLIM_CONTEXT_LENGTH": "512", "KVSLIM_KEEP_ALIVE": "10s"}
    s = ServerSettings.from_env(ollama_env | ours)
    assert (s.host, s.port, s.cache_type_k, s.flash_attn, s.num_parallel, s.max_loaded_models,
            s.max_queue, s.keep_alive) == ("127.0.0.1", 9, "q4_0", "off", 5, 4, 9, 10.0)
    assert resolve_num_ctx(None, 8192, torch.device("cpu"), env=ollama_env | ours) == 512
    with pytest.raises(ValueError, match="OLLAMA_NUM_PARALLEL must be an integer"):
        ServerSettings.from_env({"OLLAMA_NUM_PARALLEL": "many"})


def test_the_store_is_read_from_ollama_models_too(monkeypatch, tmp_path):
    from kvslim import store

    monkeypatch.delenv("KVSLIM_MODELS", raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    assert store.store_dir() == tmp_path / "ollama"
    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "ours"))
    assert store.store_dir() == tmp_path / "ours"


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("250ms", 0.25), ("0", 0.0), ("300", 300.0),
    (90, 90.0), (2.5, 2.5), (0, 0.0), (-1, float("inf")), ("-1", float("inf")), ("-5m", float("inf")),
])
def test_keep_alive_reads_like_ollama(value, seconds):
    from kvslim.settings import parse_keep_alive

    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("bad", ["soon", "", "1h30", "5 m", True, None, [1]])
def test_a_bad_keep_alive_is_an_error_naming_it(bad):
    from kvslim.settings import ServerSettings, parse_keep_alive

    with pytest.raises(ValueError, match="keep_alive must be"):
        parse_keep_alive(bad)
    if isinstance(bad, str) and bad:
        with pytest.raises(ValueError, match="OLLAMA_KEEP_ALIVE must be"):
            ServerSettings.from_env({"OLLAMA_KEEP_ALIVE": bad})
