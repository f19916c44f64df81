"""Every flag of the weight benchmarks runs (a smoke test on tiny inputs: the figures
themselves belong in benchmarks/README.md, measured on a quiet machine)."""
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

import tiny_llama
import tiny_models

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=900) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    tiny_llama.write(path)
    return path


@pytest.mark.slow
def test_generate_profile_and_weights_flags(tiny):
    out = run("benchmarks/generate.py", "--model", tiny, "--types", "f16,q8_0/q4_0", "--lengths", "40",
              "--decode", "2", "--weights", "quantized,dequantize", "--profile")
    assert "q8_0/q4_0" in out and "attention" in out  # the table and the profile's labels
    assert "\nquantized " in out and "\ndequantize " in out
    out = run("benchmarks/generate.py", "--model", tiny, "--types", "q8_0", "--lengths", "40",
              "--decode", "2", "--profile")
    assert "weights gemv" in out


@pytest.mark.slow
def test_generate_times_window_and_global_layers(tmp_path):
    """A tiny Gemma 3 (a window of 5, layer 5 global) past its window: the attention
    columns give both layer kinds, the profile runs through the windowed layers."""
    path = tmp_path / "gemma3.gguf"
    tiny_models.write_gemma3(path, tiny_models.TinyGemma3())
    out = run("benchmarks/generate.py", "--model", path, "--types", "q8_0", "--lengths", "30",
              "--decode", "3", "--profile")
    header, row = [line for line in out.splitlines() if not line.startswith("#")][:2]
    assert "attn us/window layer" in header and "attn us/global layer" in header
    win, glob = row.split()[-2:]
    assert float(win) > 0 and float(glob) > 0, row
    assert "attention" in out


@pytest.mark.slow
def test_weights_benchmark_kernels_and_models(tiny):
    out = run("benchmarks/weights.py", "--only", "kernels", "--types-kernel", "all", "--shapes", "64x256",
              "--repeat", "1")
    for t in ("Q4_K", "IQ4_XS", "F32", "f32"):
        assert f"\n{t} " in out
    out = run("benchmarks/weights.py", "--only", "core", "--types-kernel", "q4_k,f16", "--repeat", "1")
    assert "\nQ4_K " in out and "\nF16 " not in out  # F16 has no integer dot
    out = run("benchmarks/weights.py", "--only", "models", "--models", tiny, "--lengths", "40",
              "--types", "q8_0", "--decode", "2")
    assert "\nquantized " in out and "\ndequantize " in out and "failed" not in out


def test_weights_benchmark_unknown_model_is_one_line():
    """A --models name that is neither a synthetic layout, a stored model nor a file: one
    line on stderr, exit status nonzero, before any engine runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "benchmarks/weights.py", "--only", "models", "--models", "nosuch:9b"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown model 'nosuch:9b'" in p.stderr


@pytest.mark.slow
def test_synth_model_runs_in_kvslim(tmp_path):
    path = tmp_path / "synth.gguf"
    run("benchmarks/synth_model.py", "smollm2-135m", "q4_k_m", path, "--layers", "2")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    # 576 is no multiple of 256: llama.cpp's fallbacks for Q4_K / Q6_K rows
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q5_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    out = run("-m", "kvslim.cli", "run", path, "Hello", "-n", "4", "--temperature", "0")
    assert out.strip()


@pytest.mark.slow
def test_grammar_benchmark_runs(tiny):
    out = run("benchmarks/grammar.py", "--model", tiny, "--repeats", "1", "--engines", "llguidance")
    assert "| llguidance |" in out and "| True |" in out  # every mask allowed the next token
    assert "| uniqueItems | refused |" in out and "| pattern | enforced |" in out


def test_embed_fork_benchmark_runs(tmp_path):
    path = tmp_path / "tiny.gguf"
    tiny_llama.write(path, tiny_llama.Tiny(ctx=512, tied=False))
    out = run("benchmarks/embed_fork.py", "--model", path, "--inputs", "3", "--n", "2", "--prompt", "40")
    assert "min cosine 1.0" in out and "n = 2 answers" in out


@pytest.mark.slow
def test_load_benchmark_runs(tiny):
    out = run("benchmarks/load.py", tiny)
    row = next(line for line in out.splitlines() if line.startswith(f"| {tiny} |"))
    assert all(float(x) >= 0 for x in row.strip("|").split("|")[1:])  # four timings


@pytest.mark.slow
def test_serve_benchmark_every_table(tmp_path, monkeypatch):
    """Throughput, prefill latency, constrained decoding and the capacity table, on a tiny
    model in a private store (the server resolves store names)."""
    import dataclasses

    from kvslim import store

    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "store"))
    path = tmp_path / "tiny.gguf"  # a context of 4,096: the capacity table's conversations
    tiny_llama.write(path, dataclasses.replace(tiny_llama.Tiny(), ctx=4096))
    store.copy_model(path, "tiny")
    out = run("benchmarks/serve.py", "--model", "tiny", "--types", "q8_0,q4_0", "--streams", "1,2",
              "--decode", "2", "--prefill", "64", "--constrained", "1", "--rounds", "1",
              "--budget", "4MiB", "--num-ctx", "256")
    for title in ("Aggregate decode tok/s", "Concurrent 4,096-token conversations"):
        assert title in out
    assert out.count("q4_0/q4_0") >= 2  # a row in the throughput and in the capacity table


@pytest.mark.slow
def test_kv_speed_benchmark_runs(tiny):
    out = run("benchmarks/kv_speed.py", "--model", tiny, "--types", "q8_0,q8_0/q4_0", "--codings", "off,auto",
              "--length", "40", "--decode", "2")
    assert "| q8_0/q4_0 | auto |" in out and "| q8_0/q8_0 | off |" in out
