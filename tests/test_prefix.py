"""kvslim.prefix: whole pages of finished prompts found again, in the pool, the engine
and the LLM API (a chat's next turn reuses the pages of the turns before it)."""
from __future__ import annotations

from kvslim.cache import KVCache
from kvslim.engine import Engine
from kvslim.llm import LLM
from kvslim.prefix import PrefixCache
from kvslim.sampling import SamplingParams

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


def _filled(cache: KVCache, tokens: list[int]) -> int:
    seq = cache.new_sequence()
    cache.reserve(seq, len(tokens))
    return seq


def test_prefix_cache_shares_whole_pages_and_checks_tokens():
    cache = KVCache(1, 1, 32, n_pages=8, page_size=4)
    pc = PrefixCache(page_size=4)
    a = list(range(10))  # 2 whole pages + 2 tokens
    seq = _filled(cache, a)
    pc.retain(cache, seq, a)
    cache.free(seq)
    assert cache.pages_in_use == 2 and len(pc) == 1  # the partial page went back

    child, reused = pc.attach(cache, a[:9])
    assert reused == 8 and set(cache.pages(child)) == pc.pages(cache)  # shared, not copied
    cache.free(child)
    other, reused = pc.attach(cache, a[:4] + [99] * 6)  # same first page only
    assert reused == 4
    cache.free(other)
    fresh, reused = pc.attach(cache, [7] * 9)
    assert reused == 0 and cache.length(fresh) == 0
    cache.free(fresh)
    cache.check()


def test_prefix_cache_keeps_the_longest_entry_and_evicts_lru_first():
    cache = KVCache(1, 1, 32, n_pages=8, page_size=4)
    pc = PrefixCache(page_size=4)
    short, long_, other = list(range(4)), list(range(12)), [50 + i for i in range(8)]
    for tokens in (short, long_, other):
        seq = _filled(cache, tokens)
        pc.retain(cache, seq, tokens)
        cache.free(seq)
    assert len(pc) == 2  # `short` is a prefix of `long_`: dropped
    assert cache.pages_in_use == 5
    freed = pc.evict(cache, 3)
    assert freed == 3 and len(pc) == 1 and cache.pages_in_use == 2  # long_ was least recent
    assert pc.attach(cache, other + [0])[1] == 8
    cache.check()


def test_engine_reuses_a_cached_prompt_and_answers_the_same(tiny_parts):
    model, tok = tiny_parts
    engine = Engine(model, tok, num_ctx=256, num_parallel=2, page_size=16,
                    prefix_cache=PrefixCache(16))
    prompt = [1] + [(7 * i) % 250 + 3 for i in range(70)]  # 71 tokens: 4 whole pages + 7

    def run() -> tuple[list[int], int]:
        seq = engine.add_request(prompt, SamplingParams(max_tokens=5, **GREEDY))
        while engine.has_work():
            engine.step()
        return seq.output_ids, seq.stats.prompt_cache_count

    first, cached_first = run()
    second, cached_second = run()
    assert (cached_first, cached_second) == (0, 64)
    assert second == first
    held = engine.prefix_cache.pages(engine.cache)
    assert engine.cache.pages_in_use == len(held) > 0  # only the prefix cache holds pages
    engine.cache.check()


def test_engine_evicts_cached_prefixes_when_a_request_needs_the_pages(tiny_parts):
    model, tok = tiny_parts
    engine = Engine(model, tok, num_ctx=64, num_parallel=1, page_size=16, n_pages=4,
                    prefix_cache=PrefixCache(16))
    for start in (3, 100):
        seq = engine.add_request([1] + list(range(start, start + 40)), SamplingParams(max_tokens=2, **GREEDY))
        while engine.has_work():
            engine.step()
        assert seq.finish_reason == "length"
    assert engine.cache.pages_in_use > 0 and engine.prefix_cache.evictions > 0
    engine.cache.check()


def test_llm_chat_reuses_the_history_and_answers_the_same(tiny_path):
    """A second chat turn starts with the first turn's pages: they are reused, and the
    greedy answer is the one a run without the prefix cache gives."""
    turns = [{"role": "user", "content": "the cab " * 12}]  # over one 64-token page

    def converse(llm: LLM) -> list:
        first = llm.chat(turns, max_tokens=4, **GREEDY)
        history = turns + [{"role": "assistant", "content": first.text},
                           {"role": "user", "content": "a b c"}]
        second = llm.chat(history, max_tokens=6, **GREEDY)
        return [first, second]

    cached = converse(LLM(tiny_path, num_ctx=256, prefix_cache=True, progress=False))
    plain = converse(LLM(tiny_path, num_ctx=256, prefix_cache=False, progress=False))
    assert cached[0].prompt_cache_count == 0 and cached[0].prompt_eval_count > 64
    assert cached[1].prompt_cache_count == 64  # the first turn's whole page
    assert cached[1].prompt_eval_count == plain[1].prompt_eval_count - 64
    assert all(c.token_ids == p.token_ids and c.text == p.text for c, p in zip(cached, plain))
    assert plain[1].prompt_cache_count == 0
