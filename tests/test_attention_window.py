"""Sliding-window and soft-capped attention (gemma2/3) on every path, against float64.

A windowed query at position p sees keys p-window+1..p (itself and window-1 before it),
Hugging Face's and llama.cpp's convention. Soft-capping maps scores s to
cap * tanh(s / cap) before the softmax. Tolerances as in test_attention_kernels.
"""
import random

import pytest
import torch
from test_attention_kernels import PAIRS, build, tolerance

from kvslim.attention import Attention, Step, plan_attention
from kvslim.cache import KVCache
from kvslim.kernels import cpu, reference, tiled


def float64_banded(q, k, v, scale, window=0, softcap=0.0):
    """q [n, Hq, D], k/v [Hkv, L, D] float64: causal, optional window and soft-cap."""
    n, hq, _ = q.shape
    g = hq // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = torch.einsum("nhd,hld->hnl", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    L = k.shape[1]
    pk, pq = torch.arange(L)[None, :], torch.arange(L - n, L)[:, None]
    allowed = (pk <= pq) & ((pk > pq - window) if window else True)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,hld->nhd", s.softmax(-1), v)


def check(fn, cache, meta, q, window, softcap, seed):
    scale = cache.head_dim ** -0.5
    out = fn(q, cache, 1, meta, scale, window=window, softcap=softcap)
    assert out.shape == (q.shape[0], q.shape[1], cache.v_head_dim)
    tol = tolerance(cache.cache_type_k, cache.cache_type_v)
    for b, s in enumerate(meta.cache_ids):
        k, v = cache.read(1, s)
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        ref = float64_banded(q[lo:hi].double(), k.double(), v.double(), scale, window, softcap)
        err = ((out[lo:hi].double() - ref).norm() / ref.norm()).item()
        assert err < tol, (f"seed {seed}: window {window} softcap {softcap} seq {b} "
                           f"(kv {meta.kv_lens[b]}, q {meta.q_lens[b]}): rel err {err:.2e}")


CASES = [  # (K, V, window, softcap)
    ("f16", "f16", 7, 0.0), ("q8_0", "q4_0", 20, 0.0), ("f32", "f32", 0, 5.0),
    ("q4_0", "q8_0", 33, 5.0), ("iq4_nl", "q5_1", 1, 0.0), ("f16", "f16", 300, 0.0),
]


@pytest.mark.parametrize("fn", [reference.attention, tiled.attention], ids=["reference", "tiled"])
@pytest.mark.parametrize("kt,vt,window,softcap", CASES)
def test_window_and_softcap_match_float64(fn, kt, vt, window, softcap):
    """Decode steps past the window, a chunk straddling it, a prefill longer than
    tiled.BAND_ROWS, a sequence shorter than the window; GQA 2, head dim 64 and 256."""
    seed = random.randrange(1 << 30)
    d = 256 if window == 20 else 64
    cache, meta, q = build(kt, vt, hq=4, hkv=2, d=d, prefix=[40, 3, 0, 90],
                           q_lens=[1, 1, tiled.BAND_ROWS + 37, 25], seed=seed, q_scale=2.0)
    check(fn, cache, meta, q, window, softcap, seed)


def test_attention_sends_windows_and_softcap_to_the_fused_kernel(monkeypatch):
    """Decode rows and short chunks of window and soft-capped layers run in the fused CPU
    kernel whatever their length (the tiled path is not called), as the reference does."""
    def no_tiled(*a, **k):
        raise AssertionError("the tiled path ran")
    for name in ("attention", "attend_banded", "attend_sequence"):
        monkeypatch.setattr(tiled, name, no_tiled)
    seed = random.randrange(1 << 30)
    plan = plan_attention("cpu", 64, "q8_0", "q8_0", warn=False)
    assert plan.backend == "cpu"
    cache, meta, q = build("q8_0", "q8_0", hq=4, hkv=2, d=64, prefix=[50, 2, 30],
                           q_lens=[1, 1, 9], seed=seed, q_scale=3.0)
    attn = Attention(plan)
    n, gen = meta.n_rows, torch.Generator().manual_seed(seed)
    for window, softcap in ((4, 0.0), (64, 0.0), (0, 2.0), (12, 2.0)):
        k, v = (torch.randn(n, 2, 64, generator=gen) for _ in range(2))
        got = attn(q, k, v, 1, meta, 0.125, window, softcap)  # writes this step's rows, attends
        want = reference.attention(q, cache, 1, meta, 0.125, window=window, softcap=softcap)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-4, f"seed {seed}, window {window}, softcap {softcap}: {err:.2e}"
        if window != 64:  # it masked, or capped
            assert (got - reference.attention(q, cache, 1, meta, 0.125)).norm() > 1e-2


def check_vs_reference(cache, meta, q, layer, window, softcap, seed, tol):
    """cpu.attention against reference.attention, per sequence (relative norm)."""
    scale = cache.head_dim ** -0.5
    out = cpu.attention(q, cache, layer, meta, scale, window=window, softcap=softcap)
    ref = reference.attention(q, cache, layer, meta, scale, window=window, softcap=softcap)
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output"
    for b in range(len(meta.cache_ids)):
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        err = ((out[lo:hi] - ref[lo:hi]).norm() / ref[lo:hi].norm()).item()
        assert err < tol, (f"seed {seed}: {cache.cache_type_k}/{cache.cache_type_v} window "
                           f"{window} softcap {softcap} seq {b} (kv {meta.kv_lens[b]}, "
                           f"q {meta.q_lens[b]}): rel err {err:.2e}")


@pytest.mark.parametrize("kt,vt", PAIRS, ids=[f"{k}-{v}" for k, v in PAIRS])
def test_cpu_kernel_windows_and_softcap_every_type(kt, vt):
    """Every type as K and as V (fp8 included): decode rows far past the window and within
    it, fused chunks crossing the window's edge (rows before it see every key, rows after
    it lose the first ones), a long chunk on the tiled route; windows smaller and larger
    than the sequences, with and without soft-capping (scores scaled up so the cap bites)."""
    seed = random.randrange(1 << 30)
    n = cpu.NUMBA_MAX_Q
    cache, meta, q = build(kt, vt, hq=4, hkv=2, d=64, prefix=[200, 3, 0, 90, 15, 5],
                           q_lens=[1, 1, n + 5, 6, 10, n], seed=seed, q_scale=3.0)
    assert meta.scratch.tiled == [2]  # the others run in the fused kernel
    for window, softcap in ((20, 0.0), (20, 4.0), (500, 4.0)):
        check_vs_reference(cache, meta, q, 1, window, softcap, seed, tolerance(kt, vt))


def test_cpu_kernel_decode_reads_only_the_window():
    """A windowed decode step's work items cover the window's keys only, so its cost does
    not grow with the context."""
    _, meta, _ = build("q8_0", "q4_0", hq=4, hkv=2, d=64, prefix=[3000, 40], q_lens=[1, 1],
                       page_size=64, seed=0)
    st = meta.scratch.for_layer(1, 100)
    for b, kv in enumerate(meta.kv_lens):
        items = st.work[st.work[:, 0] == b]
        assert items[:, 2].min() == max(0, kv - 100) and items[:, 3].max() == kv
        assert (items[:, 3] - items[:, 2]).sum() == 2 * min(kv, 100)  # two kv heads


@pytest.mark.parametrize("kt,vt,softcap", [("q8_0", "q4_0", 0.0), ("f16", "fp8_e4m3", 6.0),
                                           ("q4_1", "q5_0", 6.0)])
def test_cpu_kernel_on_a_window_pool(kt, vt, softcap):
    """A layer in its own window pool, whose pages out of the window went back (-1 in its
    table): decode steps and chunks over many pages read only live pages and match the
    reference, and the pool's bookkeeping stays exact."""
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    window, page, hkv, d = 21, 8, 2, 64
    cache = KVCache(2, hkv, d, 64, page_size=page, cache_type_k=kt, cache_type_v=vt,
                    windows=[0, window], window_pages=24)
    seqs = [cache.new_sequence() for _ in range(3)]
    backend = cpu.Backend()
    plan = [[5, 1, 30], [30, 17, 1], [1, 1, 12], [1, 32, 1], [9, 1, 1]] + [[1, 1, 1]] * 3
    for q_lens in plan:
        meta = Step.reserve(cache, seqs, q_lens)
        backend.prepare(meta)
        rows = meta.n_rows
        for layer in (0, 1):
            backend.write(cache, layer, meta, torch.randn(rows, hkv, d, generator=gen),
                          torch.randn(rows, hkv, d, generator=gen))
        q = torch.randn(rows, 4, d, generator=gen) * 3.0
        check_vs_reference(cache, meta, q, 1, window, softcap, seed, tolerance(kt, vt))
        cache.check()
    assert any(p < 0 for s in seqs for p in cache.pages(s, 1))  # pages went back
