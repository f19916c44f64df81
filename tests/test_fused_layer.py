"""A decode step as one kernel job (``models.fused``, ``kernels.layer``; the default,
``KVSLIM_FUSED_LAYERS=0`` turns it off) against the separate calls (the same logits up to
rounding: each kernel computes with its own copies of the functions it calls, optimized
where they are inlined, see ``kvslim.jit``), against a float64 reference, the same
refusals, the steps it leaves to the separate calls, and batch invariance: the engine
runs a step's decode rows as their own forward, so a decode row's logits do not depend
on whether prompt rows share its step."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvslim.attention import Attention, plan_attention
from kvslim.engine import run_step
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.models import load_model
from kvslim.models.fused import FusedLayers
from kvslim.weights import step_rows

import tiny_llama
from tiny_llama import Tiny

@pytest.fixture(autouse=True)
def fused_on(monkeypatch):
    """The fused decode step on, whatever the environment running the tests says."""
    monkeypatch.delenv("KVSLIM_FUSED_LAYERS", raising=False)


IDS = [1, 270, 266, 262, 100, 35, 45, 7, 262, 271, 68, 99, 120, 3, 259, 265, 88, 200, 31, 260]


def load(path):
    reader = open_gguf(path)
    return load_model(reader, ModelConfig.from_gguf(reader), "cpu", progress=False)


def tiny(tmp_path, t: Tiny = Tiny(), seed: int = 0):
    path = tmp_path / f"{t.arch}-{seed}.gguf"
    tiny_llama.write(path, t, seed)
    return load(path)


def decode(model, prompts, cache_type, fused, steps=6, codec=None):
    """Each prompt's logits: the prompt as one step of single rows per sequence (every
    step a decode step), then ``steps`` greedy tokens for all sequences together. The
    logits [rows, V] of every step, concatenated."""
    keep = model.fused
    model.fused = keep if fused else None
    try:
        plan = plan_attention("cpu", model.config.head_dim, cache_type, cache_type, warn=False)
        cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v, codec=codec)
        attn, seqs = Attention(plan), [cache.new_sequence() for _ in prompts]
        out, nxt = [], None
        for i in range(max(len(p) for p in prompts) + steps):
            toks = [p[i] if i < len(p) else int(nxt[b]) for b, p in enumerate(prompts)]
            with step_rows(len(seqs)):
                logits = run_step(model, attn, cache, seqs, [1] * len(seqs), toks)
            out.append(logits)
            nxt = logits.argmax(-1)
        return torch.cat(out)
    finally:
        model.fused = keep


def close(a, b, rel=1e-4):
    """Logits equal up to float32 rounding (max error relative to the largest logit): a
    key one ulp apart can round to another code in a quantized cache, so 1e-4 over the
    steps of a sequence, not 1e-6."""
    err = (a - b).abs().max() / b.abs().max()
    assert err < rel, f"max relative error {err:.2e}"


def kld(a, b):
    """Per-row KL divergence of the softmax of logits a from b's: [rows] float64."""
    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    return (lb.exp() * (lb - la)).sum(-1)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0", "q4_1"])
def test_fused_decode_equals_the_separate_calls(tmp_path, cache_type):
    model = tiny(tmp_path)
    assert model.fused is not None
    prompts = [IDS, IDS[3:14], IDS[:5]]
    a = decode(model, prompts, cache_type, fused=True)
    b = decode(model, prompts, cache_type, fused=False)
    close(a, b)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_fused_decode_equals_the_separate_calls_mqa_three_layers(tmp_path):
    model = tiny(tmp_path, Tiny(arch="mistral", n_kv_heads=1, n_layers=3, tied=False), seed=3)
    close(decode(model, [IDS], "q8_0", True), decode(model, [IDS], "q8_0", False))


def test_a_decode_row_is_the_same_with_prompt_rows_beside_it(tmp_path):
    """The engine's mixed step (decode rows, then a prompt chunk) against the decode rows
    alone: the same logits bit for bit, the prompt's as a step of its own."""
    from kvslim.engine import Engine

    path = tmp_path / "e.gguf"
    tiny_llama.write(path, Tiny(tied=False), 0)
    e = Engine(*tiny_llama.load(path), num_ctx=256, num_parallel=4, cache_type_k="q8_0",
               cache_type_v="q8_0", page_size=16)
    assert e.model.fused is not None
    a, b, c = (e.cache.new_sequence() for _ in range(3))
    for cid, ids in ((a, IDS[:7]), (b, IDS[4:9])):  # two sequences with a few tokens each
        e._forward([cid], [len(ids)], ids, [len(ids) - 1], 0)
    fork_a, fork_b = e.cache.fork(a), e.cache.fork(b)
    mixed = e._forward([a, b, c], [1, 1, 12], [5, 6] + IDS[:12], [0, 1, 13], 2)
    alone = e._forward([fork_a, fork_b], [1, 1], [5, 6], [0, 1], 2)
    prompt = e._forward([e.cache.new_sequence()], [12], IDS[:12], [11], 0)
    assert torch.equal(mixed[:2], alone) and torch.equal(mixed[2:], prompt)
    assert e.cache.length(c) == 12 and e.cache.length(a) == 8


def test_fused_decode_matches_the_float64_reference(tmp_path):
    """Not only equal to the separate calls: right (the reference of tests/test_model.py)."""
    from test_model import reference_logits

    t = Tiny()
    path = tmp_path / "ref.gguf"
    arrays = tiny_llama.write(path, t, 0)
    model = load(path)
    logits = decode(model, [IDS], "f32", fused=True, steps=0)
    ref = reference_logits(arrays, t, IDS)
    err = np.abs(logits.double().numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5


def test_steps_it_does_not_apply_to(tmp_path):
    """Prefill chunks and mixed steps take the separate calls; a model it cannot run
    (q/k/v biases, dequantized weights) has none."""
    model = tiny(tmp_path)
    plan = plan_attention("cpu", model.config.head_dim, "q8_0", "q8_0", warn=False)
    cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v)
    seq = cache.new_sequence()
    step = Attention(plan).begin(cache, [seq], [5])
    assert model.fused.applies(step, 5)  # outside an engine step: the GEMV takes 5 rows
    with step_rows(0):
        assert not model.fused.applies(step, 5)  # prompt rows
    with step_rows(3):
        assert not model.fused.applies(step, 5)  # 3 decode rows and 2 prompt rows
    step.rollback()
    step = Attention(plan).begin(cache, [seq], [40])  # a long chunk: torch's tiled attention
    assert not model.fused.applies(step, 40)
    step.rollback()
    assert tiny(tmp_path, Tiny(arch="qwen2", qkv_bias=True), seed=1).fused is None
    reader = open_gguf(tmp_path / "llama-0.gguf")
    dense = load_model(reader, ModelConfig.from_gguf(reader), "cpu", progress=False,
                       weights="dequantize")
    assert dense.fused is None and FusedLayers.build(dense) is None


def test_on_unless_turned_off(tmp_path, monkeypatch):
    assert tiny(tmp_path).fused is not None
    monkeypatch.setenv("KVSLIM_FUSED_LAYERS", "1")
    assert tiny(tmp_path).fused is not None
    monkeypatch.setenv("KVSLIM_FUSED_LAYERS", "0")
    assert tiny(tmp_path).fused is None
    monkeypatch.setenv("KVSLIM_FUSED_LAYERS", "yes")
    with pytest.raises(ValueError, match=r"KVSLIM_FUSED_LAYERS='yes': 1 .* or 0"):
        tiny(tmp_path)
    from kvslim import jit

    monkeypatch.setattr(jit, "_active", False)  # a numba kvslim.jit could not patch
    monkeypatch.delenv("KVSLIM_FUSED_LAYERS")
    assert tiny(tmp_path).fused is None
    monkeypatch.setenv("KVSLIM_FUSED_LAYERS", "1")
    assert tiny(tmp_path).fused is not None


def test_a_non_finite_query_is_refused_and_nothing_is_lost(tmp_path):
    """A NaN in a layer's input: the same ValueError as the separate calls, and the
    cache as it was (the engine rolls the step back); the next step runs."""
    model = tiny(tmp_path)
    plan = plan_attention("cpu", model.config.head_dim, "q8_0", "q8_0", warn=False)
    cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v)
    attn, seq = Attention(plan), cache.new_sequence()
    for tok in IDS[:4]:
        run_step(model, attn, cache, [seq], [1], [tok])
    norm, stacked = model.layers[1].attn_norm, model.fused.norms[1, 0]  # the job's copy
    saved = norm.clone()
    norm[0] = stacked[0] = float("nan")
    for fused in (True, False):
        keep, model.fused = model.fused, (model.fused if fused else None)
        try:
            with pytest.raises(ValueError, match="non-finite"):
                run_step(model, attn, cache, [seq], [1], [IDS[4]])
        finally:
            model.fused = keep
        assert cache.length(seq) == 4
    norm.copy_(saved)
    stacked[:] = saved.numpy()
    cache.check()
    a = run_step(model, attn, cache, [seq], [1], [IDS[4]])
    assert torch.isfinite(a).all()


def test_means_set_between_steps_reach_the_job(tmp_path):
    """The job keeps the codec's stacked terms per cache while ``KVCodec.version`` stays:
    means set after a step (a centered V, ``set_means``) are what the next steps use, as
    for a codec made with those means and the separate calls."""
    from kvslim.codec import KVCodec

    model = tiny(tmp_path)
    t, n_layers = Tiny(), len(model.layers)
    mu = torch.randn(n_layers, t.n_kv_heads, t.head_dim, generator=torch.Generator().manual_seed(5))
    codec = KVCodec(t.n_heads, mu_v=torch.zeros_like(mu))
    plan = plan_attention("cpu", model.config.head_dim, "f16", "f16", warn=False)
    cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v, codec=codec)
    attn, first = Attention(plan), cache.new_sequence()
    for tok in IDS[:3]:  # fused steps on the zero means: the job's terms are kept
        with step_rows(1):
            run_step(model, attn, cache, [first], [1], [tok])
    version = codec.version
    for layer in range(n_layers):
        codec.set_means(layer, mu_v=mu[layer])
    assert codec.version > version
    seq, out = cache.new_sequence(), []
    for tok in IDS:
        with step_rows(1):
            out.append(run_step(model, attn, cache, [seq], [1], [tok]))
    want = decode(model, [IDS], "f16", fused=False, steps=0, codec=KVCodec(t.n_heads, mu_v=mu))
    close(torch.cat(out), want)
    stale = decode(model, [IDS], "f16", fused=False, steps=0, codec=KVCodec(t.n_heads, mu_v=0 * mu))
    assert (torch.cat(out) - stale).abs().max() > 1e-3  # the means change the logits


def test_per_layer_terms_are_made_once_per_codec_version(tmp_path):
    """``cpu_write.sides`` and ``cpu.coding`` (what the separate calls use and the job
    stacks) are made once per layer while the codec's version stays, and again after it
    moves (``KVCodec.to`` replaces the tensors they view), with the codec's values."""
    from kvslim.codec import KVCodec
    from kvslim.kernels import cpu, cpu_write

    model, t = tiny(tmp_path), Tiny()
    mu = torch.randn(len(model.layers), t.n_kv_heads, t.head_dim)
    codec = KVCodec(t.n_heads, mu_v=mu)
    plan = plan_attention("cpu", model.config.head_dim, "f16", "f16", warn=False)
    cache = model.new_cache(64, 16, plan.effective_k, plan.effective_v, codec=codec)
    side, coding = cpu_write.sides(cache, 1), cpu.coding(cache, 1, t.n_heads)
    assert cpu_write.sides(cache, 1) is side and cpu.coding(cache, 1, t.n_heads) is coding
    codec.to("cpu")
    again, coding_again = cpu_write.sides(cache, 1), cpu.coding(cache, 1, t.n_heads)
    assert again is not side and coding_again is not coding
    assert np.array_equal(again[1].shift, mu[1].numpy())  # V's shift: the layer's mean
    assert np.array_equal(coding_again[6], codec.output_terms(1)[2].numpy())


@pytest.mark.slow
def test_k_quant_layers_equal_the_separate_calls(tmp_path):
    """Q4_K_M's mix (Q4_K, Q6_K, Q5_0 and Q8_0 matrices: a 2-layer SmolLM2 layout from
    benchmarks/synth_model.py), three sequences."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import synth_model

    path = synth_model.write("smollm2-135m", "q4_k_m", tmp_path / "synth.gguf", layers=2)
    model = load(path)
    prompts = [IDS, IDS[3:14], IDS[:5]]
    for cache_type in ("f16", "q8_0"):  # measured: KLD at most 3e-9 and 2e-7
        a, b = decode(model, prompts, cache_type, True), decode(model, prompts, cache_type, False)
        assert kld(a, b).max() < 1e-5 and torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.slow
def test_real_model_with_its_codec_equals_the_separate_calls(smollm2_gguf):
    """SmolLM2 (Q4_1, Q8_0 head) with the codec a q4_0 cache is calibrated with (rotation,
    centering: the queries coded and the output restored inside the job), three
    sequences. On an f16 cache the two differ by float32 rounding through 30 layers
    (measured: KLD at most 2e-6, the codec itself moves logits as much); on a q8_0
    cache a key one ulp apart can round to another code, and the difference grows
    through the layers to the cache's own noise (measured: mean KLD 5.5e-5)."""
    from kvslim import LLM

    llm = LLM(str(smollm2_gguf), kv_cache_type="q4_0", num_ctx=512, progress=False, device="cpu")
    codec = llm.engine.cache.codec
    assert llm.model.fused is not None and codec is not None
    prompts = [llm.tokenize(t) for t in ("The capital of France is", "def fibonacci(n):",
                                         "Why is the sky blue? Because")]
    a = decode(llm.model, prompts, "f16", True, codec=codec)
    b = decode(llm.model, prompts, "f16", False, codec=codec)
    assert kld(a, b).max() < 2e-5 and torch.equal(a.argmax(-1), b.argmax(-1))
    a = decode(llm.model, prompts, "q8_0", True, codec=codec)
    b = decode(llm.model, prompts, "q8_0", False, codec=codec)
    assert kld(a, b).mean() < 5e-4
