"""Sliding-window and soft-capped attention (gemma2/3) on every path, against float64.

A windowed query at position p sees keys p-window+1..p (itself and window-1 before it),
Hugging Face's and llama.cpp's convention. Soft-capping maps scores s to
cap * tanh(s / cap) before the softmax. Tolerances as in test_attention_kernels.
"""
import random

import pytest
import torch
from test_attention_kernels import build, tolerance

from kvslim.attention import Attention, plan_attention
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


def test_attention_routes_a_window_past_the_fused_kernel():
    """The plan's fused backend ignores windows: once a sequence outgrows its window the
    step goes to a path that honours it, and the results equal the reference's."""
    seed = random.randrange(1 << 30)
    plan = plan_attention("cpu", 64, "q8_0", "q8_0", warn=False)
    assert plan.backend == "cpu"
    cache, meta, q = build("q8_0", "q8_0", hq=4, hkv=2, d=64, prefix=[50, 2], q_lens=[1, 1],
                           seed=seed)
    attn = Attention(plan)
    for window in (4, 64):  # outgrown by the first sequence / longer than both
        got = attn._attend(q, cache, 1, meta, 0.125, window, 0.0)
        want = reference.attention(q, cache, 1, meta, 0.125, window=window)
        assert (got - want).norm() / want.norm() < 1e-4, f"seed {seed}, window {window}"
    full = reference.attention(q, cache, 1, meta, 0.125)
    assert (attn._attend(q, cache, 1, meta, 0.125, 4, 0.0) - full).norm() > 1e-2  # it masked


@pytest.mark.parametrize("kt,vt,window", [("q8_0", "q4_0", 20), ("f16", "f16", 7), ("q4_1", "q5_0", 64)])
def test_cpu_kernel_honours_a_window(kt, vt, window):
    """Decode rows past the window read only their window in the fused kernel; a chunk of
    rows past it goes to the banded path; sequences inside the window stay plain."""
    seed = random.randrange(1 << 30)
    cache, meta, q = build(kt, vt, hq=4, hkv=2, d=64, prefix=[200, 3, 0, 90, 30],
                           q_lens=[1, 1, cpu.NUMBA_MAX_Q + 5, 6, 1], seed=seed)
    check(lambda *a, window, softcap: cpu.attention(*a, window=window), cache, meta, q,
          window, 0.0, seed)
