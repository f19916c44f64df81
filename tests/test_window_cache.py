"""The sliding-window K/V cache: layers on a window keep only their last positions.

The same tiny Gemma 3 (layer 5 global, the six others on a window of 5 tokens) runs
through a windowed pool (``model.new_cache``: pages out of the window go back) and a
full one (every layer keeps every position), with the same kernels: the logits must be
equal across page boundaries, prefill chunks, batches, forks, rollbacks and prefix
reuse, and the pool's bookkeeping must stay exact (``KVCache.check``, free pages).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny_models
from kvslim import formats, planner
from kvslim.attention import Attention, plan_attention
from kvslim.cache import CacheFull, KVCache, window_pages
from kvslim.engine import Engine, run_step
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.models import load_model
from kvslim.prefix import PrefixCache
from kvslim.sampling import SamplingParams
from test_model import IDS
from tiny_models import TinyGemma3

T = TinyGemma3()  # head_dim 32, window 5
IDS40 = IDS + IDS[::-1]
PAGE = 4  # a window of 5 spans two or three pages


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3w") / "tiny.gguf"
    tiny_models.write_gemma3(path, T)
    reader = open_gguf(path)
    return load_model(reader, ModelConfig.from_gguf(reader), progress=False)


def _attn(model, cache_type: str, backend: str) -> Attention:
    plan = plan_attention("cpu", model.config.head_dim, cache_type, cache_type,
                          "off" if backend == "reference" else "auto", warn=False)
    return Attention(dataclasses.replace(plan, backend=backend))


def _caches(model, cache_type: str, n_pages: int = 40, window_pages: int = 20):
    """(windowed pool, full pool) of the same model and type."""
    windowed = model.new_cache(n_pages, PAGE, cache_type, cache_type, window_pages=window_pages)
    full = KVCache(model.n_layers, model.n_kv_heads, model.cache_head_dim, n_pages,
                   page_size=PAGE, cache_type_k=cache_type, cache_type_v=cache_type)
    return windowed, full


def _feed(model, attn, cache, seqs, ids_per_seq, chunk):
    """Logits per sequence, fed together in chunks of ``chunk`` rows."""
    out = [[] for _ in seqs]
    for lo in range(0, max(len(i) for i in ids_per_seq), chunk):
        live = [b for b, ids in enumerate(ids_per_seq) if ids[lo:lo + chunk]]
        parts = [ids_per_seq[b][lo:lo + chunk] for b in live]
        logits = run_step(model, attn, cache, [seqs[b] for b in live], [len(p) for p in parts],
                          [t for p in parts for t in p])
        r = 0
        for b, p in zip(live, parts):
            out[b].append(logits[r:r + len(p)])
            r += len(p)
    cache.check()
    return [torch.cat(o) for o in out]


def test_window_pages_bound():
    # a step from length L keeps L-w+1 .. L+c-1: w-1+c tokens, one page more than they fill
    assert window_pages(5, 4, 1000, 1) == 3 and window_pages(5, 4, 1000, 7) == 4
    assert window_pages(5, 4, 6, 7) == 2  # never more than the sequence's own pages
    assert window_pages(0, 4, 1000, 7) == 250  # a global layer keeps every page
    assert window_pages(512, 64, 32768, 512) == 17


def _pool(windows: list[int], window_pages: int) -> KVCache:
    return KVCache(len(windows), 1, 32, n_pages=16, page_size=PAGE, windows=windows,
                   window_pages=window_pages)


def _free_all(cache: KVCache, *seqs: int) -> None:
    """Free ``seqs``: every page of every pool goes back."""
    for s in seqs:
        cache.free(s)
    assert cache.free_per_group() == cache.pages_per_group()
    cache.check()


def test_pool_releases_pages_out_of_the_window():
    cache = _pool([5, 0, 5], window_pages=4)
    g = cache.window_groups()[0]
    assert [len(x.layers) for x in cache.groups] == [1, 2] and g.n_pages == 4
    seq = cache.new_sequence()
    for n in range(1, 61):  # decode one token at a time: at most 3 pages, whatever the length
        cache.reserve(seq, 1)
        live = [p for p in cache.pages(seq, 1) if p >= 0]
        assert len(live) <= window_pages(5, PAGE, n, 1)
        assert len(g.free) == 4 - len(live)
        cache.check()
    assert cache.free_pages == 16 - 15  # the global layer kept all 60 positions
    with pytest.raises(ValueError, match="window"):
        cache.read(0, seq)  # the windowed layer's early keys are gone
    cache.read(0, seq, 55)  # its window is there
    cache.read(1, seq)  # the global layer still holds every key
    _free_all(cache, seq)


def test_fork_trim_and_rollback_keep_the_window():
    cache = _pool([0, 5], window_pages=8)
    a = cache.new_sequence()
    cache.reserve(a, 20)
    cache.reserve(a, 2)  # a step from 20 needs keys from 16 on: pages before it go back
    assert cache.pages(a, 1)[:4] == [-1] * 4
    child = cache.fork(a)  # shares every live page
    cache.reserve(child, 1)  # the shared, partly filled last page is copied on write
    cache.check()
    assert not cache.can_trim(a, 8)  # its window layers released positions before 16
    with pytest.raises(ValueError, match="no longer hold"):
        cache.trim(a, 8)
    assert cache.length(a) == 22
    cache.reserve(a, 3)
    cache.trim(a, 22)  # a rollback to where the step began always works
    cache.trim(a, 21)  # so does any length whose window is still held
    cache.check()
    _free_all(cache, a, child)


def test_cache_full_in_the_window_pool_changes_nothing():
    cache = _pool([0, 5], window_pages=2)
    a = cache.new_sequence()
    with pytest.raises(CacheFull, match="window of 5"):
        cache.reserve(a, 9)  # 3 window pages at once, 2 in the pool
    assert cache.length(a) == 0 and cache.free_per_group() == [16, 2]
    cache.check()


@pytest.mark.parametrize("backend", ["reference", "tiled", "cpu"])
def test_logits_equal_a_full_cache(gemma, backend):
    """Chunks of 1 to 7 rows cross pages and the window; two sequences of different
    lengths run batched (the plain-torch paths get fewer, longer steps: they are slow)."""
    for chunk in (1, 3, 26) if backend == "cpu" else (2, 7):
        got = []
        for cache in _caches(gemma, "f32"):
            seqs = [cache.new_sequence(), cache.new_sequence()]
            got.append(_feed(gemma, _attn(gemma, "f32", backend), cache, seqs,
                             [IDS40[:26], IDS40[:13]], chunk))
        for w, f in zip(*got):
            torch.testing.assert_close(w, f, atol=0, rtol=0)


@pytest.mark.parametrize("cache_type", formats.TYPES)
def test_every_cache_type_equals_a_full_cache(gemma, cache_type):
    attn = _attn(gemma, cache_type, "cpu")
    if formats.is_quantized(attn.plan.effective_v) != formats.is_quantized(cache_type):
        pytest.skip("falls back")
    got = []
    for cache in _caches(gemma, attn.plan.effective_k):
        got.append(_feed(gemma, attn, cache, [cache.new_sequence()], [IDS40[:22]], 5)[0])
    torch.testing.assert_close(got[0], got[1], atol=0, rtol=0)


def test_fork_and_rollback_equal_a_full_cache(gemma):
    """A prompt forked into two continuations, and a step that fails halfway (after some
    layers wrote their rows) then runs again: the same logits as the full cache."""
    class Failing(Attention):
        def __call__(self, q, k, v, layer, step, scale, **kw):
            if layer == 3:
                raise RuntimeError("kernel failed")
            return super().__call__(q, k, v, layer, step, scale, **kw)

    results = []
    for cache in _caches(gemma, "q8_0"):
        attn = _attn(gemma, "q8_0", "cpu")
        a = cache.new_sequence()
        _feed(gemma, attn, cache, [a], [IDS40[:18]], 7)
        b = cache.fork(a)
        with pytest.raises(RuntimeError):
            run_step(gemma, Failing(attn.plan), cache, [a, b], [3, 2], IDS40[18:21] + [9, 8])
        assert cache.length(a) == cache.length(b) == 18
        cache.check()
        results.append(_feed(gemma, attn, cache, [a, b], [IDS40[18:], [9, 8, 7, 6, 5, 4]], 2))
    for w, f in zip(*results):
        torch.testing.assert_close(w, f, atol=0, rtol=0)


def _engine(model, prefix: bool, **kw) -> Engine:
    return Engine(model, None, num_ctx=64, num_parallel=2, page_size=PAGE, max_batch_tokens=8,
                  prefix_cache=PrefixCache(PAGE) if prefix else None, **kw)


def _generate(engine, prompt, n=6):
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n,
                                                    repeat_penalty=1.0))
    while engine.has_work():
        engine.step()
    return seq


def _full_engine(model, **kw) -> Engine:
    engine = _engine(model, prefix=True, **kw)
    m, c = engine.model, engine.cache
    engine.cache = KVCache(m.n_layers, m.n_kv_heads, m.cache_head_dim, c.n_pages, page_size=PAGE,
                           cache_type_k=c.cache_type_k, cache_type_v=c.cache_type_v,
                           codec=c.codec)
    return engine


def test_engine_sizes_the_window_pool_and_reuses_prefixes(gemma):
    """The window pool holds num_parallel sequences' windows; a chat's next turn reuses
    the previous one's pages (its window layers hold the tail it needs) and answers as a
    full cache does."""
    types = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    answers = []
    for engine in (_engine(gemma, prefix=True, **types), _full_engine(gemma, **types)):
        first = _generate(engine, IDS40[:21])
        second = _generate(engine, first.token_ids + [5, 6, 7])
        assert second.stats.prompt_cache_count == 24  # the first turn's whole pages
        answers.append((first.token_ids, second.token_ids))
        cache = engine.cache
        cache.check()
        # everything the prefix cache does not hold went back to the pools
        held = [len({p for e in engine.prefix_cache._lru.values()
                     for p in cache.pages(e.cache_seq, g) if p >= 0})
                for g in range(len(cache.groups))]
        assert [t - f for t, f in zip(cache.pages_per_group(), cache.free_per_group())] == held
    assert answers[0] == answers[1]
    engine = _engine(gemma, prefix=False)
    assert engine.cache.pages_per_group() == [2 * 16, 2 * window_pages(5, PAGE, 64, 8)]


def test_plan_and_engine_count_the_same_bytes(gemma):
    """``kvslim plan``'s arithmetic equals the pool an engine allocates; windowed layers
    cost a fixed amount per sequence, so the maximum context grows by the global layers'
    bytes per token only."""
    c = gemma.config
    engine = Engine(gemma, None, num_ctx=256, num_parallel=3, page_size=PAGE,
                    cache_type_k="q8_0", cache_type_v="q4_0")
    assert planner.kv_bytes(c, 256, 3, "q8_0", "q4_0", PAGE) == engine.cache.nbytes
    per_token = planner.kv_bytes_per_token(c, "q8_0", "q4_0")
    assert per_token == 1 * (34 + 18)  # one global layer, one kv head, 32 dims
    info = engine.cache_info()
    assert info["bytes_per_token"] == per_token
    assert info["window_bytes_per_sequence"] == planner.window_bytes(c, 256, "q8_0", "q4_0", PAGE)
    budget = planner.kv_bytes(c, 128, 2, "q8_0", "q4_0", PAGE)
    ctx, capped = planner.max_ctx(c, budget, 2, "q8_0", "q4_0", PAGE)
    assert (ctx, capped) == (128, False)
    assert planner.max_ctx(c, budget - 1, 2, "q8_0", "q4_0", PAGE)[0] == 128 - PAGE


def test_server_sizes_and_reports_both_pools(tmp_path):
    """``KVSLIM_KV_MEMORY`` pays the windowed layers' fixed pages first, the rest goes to
    whole pages of the global layers; ``/api/ps`` reports both."""
    import ollama

    from kvslim.settings import ServerSettings
    from test_server import ps_model, running_server

    path = tmp_path / "g.gguf"
    tiny_models.write_gemma3(path, T)
    budget = 500_000
    env = {"KVSLIM_KV_MEMORY": str(budget), "KVSLIM_KV_CACHE_TYPE": "q8_0",
           "KVSLIM_NUM_PARALLEL": "4"}
    with running_server(ServerSettings.from_env(env), {"g": path}) as s:
        ollama.Client(host=s.url).generate(model="g", prompt="ab ab", options={"num_predict": 2})
        kv = ps_model(s.url, "g")["kv_cache"]
    config = ModelConfig.from_gguf(open_gguf(path))
    window = planner.window_bytes(config, 256, "q8_0", "q8_0", 64)
    page = 64 * planner.kv_bytes_per_token(config, "q8_0", "q8_0")
    assert kv["window"] == 5 and kv["window_bytes_per_sequence"] == window
    assert kv["bytes_per_token"] == page // 64
    assert kv["pages_total"] == (budget - 4 * window) // page
    assert kv["bytes"] == kv["pages_total"] * page + 4 * window <= budget
    assert kv["window_pages_total"] == 4 * window_pages(5, 64, 256, 512)
