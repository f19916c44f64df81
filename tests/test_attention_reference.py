"""The reference path and the dispatch rule (fallback to f16 with one warning)."""
import logging

import pytest
import torch

from kvslim.attention import Step, plan_attention
from kvslim.cache import CacheFull, KVCache
from kvslim.kernels import reference


def float64_attention(q, k, v, scale):
    """q [n, Hq, D], k/v [Hkv, L, D] float64, causal (bottom-right) with GQA."""
    n, hq, _ = q.shape
    g = hq // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = torch.einsum("nhd,hld->hnl", q, k) * scale
    L = k.shape[1]
    allowed = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,hld->nhd", s.softmax(-1), v)


@pytest.mark.parametrize("kt,vt", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q4_0"), ("iq4_nl", "q5_1")])
def test_reference_matches_float64_on_stored_values(kt, vt):
    seed = torch.seed()
    hq, hkv, d = 8, 2, 64
    cache = KVCache(1, hkv, d, 32, page_size=8, cache_type_k=kt, cache_type_v=vt)
    seqs = [cache.new_sequence() for _ in range(3)]
    prefix = [5, 0, 17]
    for s, n in zip(seqs, prefix):  # existing context
        if n:
            m = Step.reserve(cache, [s], [n])
            cache.write(0, m.slots, torch.randn(n, hkv, d), torch.randn(n, hkv, d))
    q_lens = [3, 1, 9]
    meta = Step.reserve(cache, seqs, q_lens)
    n = meta.n_rows
    cache.write(0, meta.slots, torch.randn(n, hkv, d), torch.randn(n, hkv, d))
    q = torch.randn(n, hq, d)
    out = reference.attention(q, cache, 0, meta, 0.125)
    for b, s in enumerate(seqs):
        k, v = cache.read(0, s)
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        ref = float64_attention(q[lo:hi].double(), k.double(), v.double(), 0.125)
        err = (out[lo:hi].double() - ref).norm() / ref.norm()
        assert err < 1e-6, f"seed {seed}: seq {b} relative error {err}"


def test_reserve_is_all_or_nothing():
    cache = KVCache(1, 1, 32, 3, page_size=4)
    a, b = cache.new_sequence(), cache.new_sequence()
    with pytest.raises(CacheFull):
        Step.reserve(cache, [a, b], [8, 8])
    assert cache.length(a) == 0 and cache.length(b) == 0 and cache.pages_in_use == 0
    meta = Step.reserve(cache, [a], [5])
    meta.rollback()
    assert cache.length(a) == 0
    cache.check()


def test_off_falls_back_v_only_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        plan = plan_attention("cpu", 64, "q8_0", "q4_0", flash_attn="off")
    assert (plan.effective_k, plan.effective_v) == ("q8_0", "f16")
    assert plan.backend == "reference" and not plan.fused
    assert "flash attention is off" in plan.reason
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "V f16" in msgs[0] and "q4_0" in msgs[0]


def test_head_dim_not_multiple_of_32_falls_back_both():
    plan = plan_attention("cpu", 80, "q8_0", "q8_0", warn=False)
    assert (plan.effective_k, plan.effective_v) == ("f16", "f16")
    assert "80" in plan.reason


def test_unquantized_types_never_fall_back():
    plan = plan_attention("cpu", 64, "f32", "f16", flash_attn="off", warn=False)
    assert not plan.fell_back and plan.reason is None


def test_bad_modes_and_types():
    with pytest.raises(ValueError, match="auto, on, off"):
        plan_attention("cpu", 64, flash_attn="maybe")
    with pytest.raises(ValueError, match="valid types"):
        plan_attention("cpu", 64, "q4", "f16")
