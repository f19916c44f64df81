"""Engine, sampler and Python API on a tiny random GGUF model (fast, default suite)."""
from __future__ import annotations

import threading

import pytest
import torch

from kvslim.engine import Engine, PromptTooLong, Sequence
from kvslim.llm import LLM
from kvslim.sampling import SamplingParams, apply_penalties, sample

import tiny_llama

GREEDY = dict(temperature=0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def tiny_path(tiny_gguf):
    return tiny_gguf(ctx=128, tied=False)  # untied: greedy text varies


def engine(tiny_parts, **kw) -> Engine:
    model, tok = tiny_parts
    kw = {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "num_ctx": 128, "page_size": 16} | kw
    return Engine(model, tok, **kw)


def drain(e: Engine, limit: int = 1000) -> list:
    outs = []
    for _ in range(limit):
        if not e.has_work():
            return outs
        outs += e.step()
    raise AssertionError("engine did not finish")


PROMPTS = [[1, 270, 266, 262, 100], [1, 35, 45, 7, 262, 271, 68, 99, 120, 3, 259], [1], [1, 88, 200] * 9]


# ---------------------------------------------------------------- sampling


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(500)
    best = int(logits.argmax())
    assert sample(logits, SamplingParams(**GREEDY), []) == best
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, SamplingParams(top_k=1, temperature=5.0), [], g) == best for _ in range(20))


def test_top_p_and_min_p_cut_the_tail():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])  # p ~ [0.72, 0.26, 0.005, ...]
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(top_k=0, top_p=0.9, temperature=1.0), [], g) for _ in range(300)}
    assert draws == {0, 1}
    draws = {sample(logits, SamplingParams(top_k=0, top_p=1.0, min_p=0.5, temperature=1.0), [], g)
             for _ in range(100)}
    assert draws == {0}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=42)
    runs = [[sample(logits, p, [], torch.Generator().manual_seed(42)) for _ in range(1)] for _ in range(2)]
    assert runs[0] == runs[1]


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0])
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=2, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, p, [3, 0, 1, 1])  # window: [1, 1]
    assert out.tolist() == [2.0, -2.0 * 2 - 2 * 0.5 - 0.25, 1.0, 3.0]
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=-1)
    assert apply_penalties(logits, p, [3, 0]).tolist() == [1.0, -2.0, 1.0, 1.5]


@pytest.mark.parametrize("seed", range(4))
def test_penalties_on_cpu_equal_the_torch_reference(seed):
    """apply_penalties' numpy path (CPU float32) against penalties_torch, bit for bit, on
    fresh logits (zeros, negatives) and histories with repeats."""
    from kvslim.sampling import penalties_torch
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5000, generator=g) * 4
    logits[torch.randint(0, 5000, (50,), generator=g)] = 0.0
    history = torch.randint(0, 5000, (300,), generator=g).tolist()
    history += history[-20:]  # repeats inside the window
    before = logits.clone()
    for p in (SamplingParams(), SamplingParams(repeat_penalty=1.3, repeat_last_n=-1,
                                               frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(repeat_penalty=0.8, repeat_last_n=17, presence_penalty=1.5)):
        window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n:]
        got, want = apply_penalties(logits, p, history), penalties_torch(logits, p, window)
        assert torch.equal(got, want)
        assert not torch.equal(got, logits)  # something was penalized
    assert torch.equal(logits, before)  # the input is left as it was
    with pytest.raises(IndexError):
        apply_penalties(logits, SamplingParams(), [5000])


def test_bad_sampling_options():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="unknown option.*temprature"):
        SamplingParams.from_options(temprature=1)
    assert SamplingParams.from_options(num_predict=5).max_tokens == 5
    assert SamplingParams(max_tokens=-1).max_tokens is None


# ---------------------------------------------------------------- engine


def test_parallel_sequences_equal_each_alone(tiny_parts):
    e = engine(tiny_parts, num_parallel=4, max_batch_tokens=8)  # prefill split into chunks
    seqs = [e.add_request(p, SamplingParams(max_tokens=12, **GREEDY)) for p in PROMPTS]
    drain(e)
    for p, s in zip(PROMPTS, seqs):
        alone = engine(tiny_parts)
        a = alone.add_request(p, SamplingParams(max_tokens=12, **GREEDY))
        drain(alone)
        assert s.output_ids == a.output_ids and len(a.output_ids) == 12
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_chunked_prefill_in_the_engine(tiny_parts):
    outputs = []
    for budget in (4, 512):  # 27 prompt tokens: 7 steps with no row to sample, or one
        e = engine(tiny_parts, max_batch_tokens=budget)
        s = e.add_request(PROMPTS[3], SamplingParams(max_tokens=6, **GREEDY))
        drain(e)
        assert s.stats.prompt_eval_count == 27
        outputs.append(s.output_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


def test_seeded_parallel_sampling_is_reproducible(tiny_parts):
    def outputs(n_parallel):
        e = engine(tiny_parts, num_parallel=n_parallel)
        seqs = [e.add_request(p, SamplingParams(max_tokens=10, temperature=1.0, seed=i))
                for i, p in enumerate(PROMPTS)]
        drain(e)
        return [s.output_ids for s in seqs]

    assert outputs(4) == outputs(1)


def test_a_request_joins_while_another_decodes(tiny_parts):
    e = engine(tiny_parts, num_parallel=2)
    first = e.add_request(PROMPTS[1], SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(4):
        e.step()
    assert first.n_generated == 4
    second = e.add_request(PROMPTS[3], SamplingParams(max_tokens=5, **GREEDY))
    mixed = e.step()  # one forward: first decodes, second prefills
    assert {o.seq for o in mixed} == {first, second}
    drain(e)
    alone = engine(tiny_parts)
    ref = [alone.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in
           ((PROMPTS[1], 20), (PROMPTS[3], 5))]
    drain(alone)
    assert [first.output_ids, second.output_ids] == [r.output_ids for r in ref]


LONG = [1] + [(7 * i) % 250 + 3 for i in range(95)]  # 96 prompt tokens


def test_a_short_request_is_not_held_back_by_a_long_prefill(tiny_parts):
    """Issue 15 item 4: a short prompt gets its first token in the step after it arrives
    and then a row every step, while a long prompt's prefill goes on in chunks; neither
    output changes."""
    e = engine(tiny_parts, num_parallel=2, max_batch_tokens=16)
    long = e.add_request(LONG, SamplingParams(max_tokens=4, **GREEDY))
    e.step()
    short = e.add_request(PROMPTS[0], SamplingParams(max_tokens=20, **GREEDY))
    e.step()
    assert short.n_generated == 1 and 0 < long.n_cached < long.n_prompt
    steps = 1
    while long.n_cached < long.n_prompt:
        e.step()
        steps += 1
        assert short.n_generated == steps  # one decode row every step of the prefill
    assert steps >= 6  # the prefill really overlapped: 80 tokens in chunks of at most 15
    drain(e)
    for s, p, n in ((long, LONG, 4), (short, PROMPTS[0], 20)):
        alone = engine(tiny_parts, max_batch_tokens=16)
        a = alone.add_request(p, SamplingParams(max_tokens=n, **GREEDY))
        drain(alone)
        assert s.output_ids == a.output_ids and len(a.output_ids) == n
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_prefill_budget_is_shared_shortest_first(tiny_parts):
    e = engine(tiny_parts, num_parallel=4, max_batch_tokens=16)
    alone = e.add_request(LONG[:40], SamplingParams(max_tokens=2, **GREEDY))
    e._admit()
    assert e._schedule() == [(alone, 16)]  # alone: the whole budget, as before
    e.step()
    e.add_request(LONG[:20], SamplingParams(max_tokens=2, **GREEDY))
    short = e.add_request([1, 5, 6], SamplingParams(max_tokens=2, **GREEDY))
    e._admit()
    mid = e.running[1]
    # 3 rows fit whole; 13 left for two: ceil(13 / 2) = 7 to the shorter, 6 to the longest
    assert e._schedule() == [(short, 3), (mid, 7), (alone, 6)]
    e.step()
    # short decodes (its row comes first); 15 left: 8 to mid, 7 to alone
    assert e._schedule() == [(short, 1), (mid, 8), (alone, 7)]
    tight = engine(tiny_parts, num_parallel=4, max_batch_tokens=2)
    seqs = [tight.add_request(p, SamplingParams(max_tokens=1, **GREEDY))
            for p in (LONG[:9], LONG[:5], LONG[:7])]
    tight._admit()
    assert tight._schedule() == [(seqs[1], 1), (seqs[2], 1)]  # a budget below the prefills: 1 each
    drain(e), drain(tight)
    e.cache.check()


def test_max_tokens_and_context_full_finish_with_length(tiny_parts):
    e = engine(tiny_parts, num_ctx=32)
    s = e.add_request(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True, **GREEDY))
    outs = drain(e)
    assert (s.n_generated, s.finish_reason, outs[-1].finished) == (3, "length", True)
    s = e.add_request(PROMPTS[1], SamplingParams(ignore_eos=True, **GREEDY))
    drain(e)
    # every token but the last was fed back: the cache held at most num_ctx tokens
    assert s.finish_reason == "length" and len(s.token_ids) == 33
    assert e.cache.pages_in_use == 0


def test_end_of_generation_token_stops(tiny_parts, monkeypatch):
    e = engine(tiny_parts)
    free = e.add_request(PROMPTS[1], SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY))
    drain(e)
    eog = free.output_ids[5]  # make the 6th token an end-of-generation token
    monkeypatch.setattr(tiny_parts[1], "eog_ids", {eog})
    s = e.add_request(PROMPTS[1], SamplingParams(max_tokens=20, **GREEDY))
    outs = drain(e)
    first = free.output_ids.index(eog)
    assert s.output_ids == free.output_ids[:first + 1] and s.finish_reason == "stop"
    assert s.text == tiny_parts[1].decode(free.output_ids[:first])  # EOG itself adds no text
    assert outs[-1].finished and outs[-1].reason == "stop"


class FakeDecoder:
    """Token id -> one character: lets stop-string tests choose the text exactly."""

    def push(self, tid):
        return chr(tid)

    def flush(self):
        return ""


def feed(seq: Sequence, text: str) -> list[tuple[str, str | None]]:
    return [seq.accept(ord(ch)) for ch in text]


def test_stop_strings_hold_back_a_possible_start():
    seq = Sequence(0, [1], SamplingParams(stop=["END", "xy"]), 100, FakeDecoder(), set())
    got = feed(seq, "abEN")
    assert [t for t, _ in got] == ["a", "b", "", ""]  # "E", "EN" may start "END"
    got = feed(seq, "Dz")
    assert got[0] == ("", "stop")  # the stop string itself is never emitted
    seq = Sequence(1, [1], SamplingParams(stop=["END"]), 100, FakeDecoder(), set())
    got = feed(seq, "ENx")
    assert [t for t, _ in got] == ["", "", "ENx"]  # released once it cannot be a stop


def test_stop_string_ends_generation_in_the_engine(tiny_parts):
    e = engine(tiny_parts)
    free = e.add_request(PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
    drain(e)
    text = free.text
    stop = text[8:10]
    s = e.add_request(PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop], **GREEDY))
    outs = drain(e)
    assert s.finish_reason == "stop"
    assert s.text == text[:text.index(stop)]
    assert "".join(o.text for o in outs) == s.text


def test_prompt_longer_than_context(tiny_parts):
    e = engine(tiny_parts, num_ctx=16)
    with pytest.raises(PromptTooLong, match="27 tokens.*num_ctx=16"):
        e.add_request(PROMPTS[3], SamplingParams())
    s = e.add_request(PROMPTS[3], SamplingParams(max_tokens=4, **GREEDY), truncate=True)
    assert s.token_ids[0] == 1 and s.token_ids[1:] == PROMPTS[3][-(s.n_prompt - 1):]
    assert s.n_prompt == 12  # leaves max_tokens of room
    drain(e)
    assert s.n_generated == 4


def test_num_ctx_above_model_maximum(tiny_parts):
    with pytest.raises(ValueError, match="above the model's maximum"):
        engine(tiny_parts, num_ctx=4096)


def test_cancel_frees_pages(tiny_parts):
    e = engine(tiny_parts, num_parallel=2)
    a = e.add_request(PROMPTS[1], SamplingParams(**GREEDY, ignore_eos=True))
    b = e.add_request(PROMPTS[2], SamplingParams(**GREEDY, ignore_eos=True))
    for _ in range(3):
        e.step()
    assert e.cache.pages_in_use > 0
    e.cancel(a)
    e.cancel(b)
    outs = e.reap()
    assert {(o.seq, o.reason) for o in outs} == {(a, "cancel"), (b, "cancel")}
    assert e.cache.pages_in_use == 0 and not e.has_work()
    e.cache.check()


def test_requests_wait_for_pages(tiny_parts):
    # each request may need 4 pages of 16 tokens: two fit in 7 pages, the third waits
    e = engine(tiny_parts, num_parallel=4, n_pages=7)
    seqs = [e.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
            for p in PROMPTS[:3]]
    e.step()
    assert [s.status for s in seqs] == ["running", "running", "waiting"]
    drain(e)
    assert all(s.n_generated == 40 for s in seqs) and e.cache.pages_in_use == 0
    with pytest.raises(ValueError, match="cannot fit"):
        e.add_request(PROMPTS[0], SamplingParams(max_tokens=200))


def test_score_equals_generation_logits(tiny_parts):
    e = engine(tiny_parts)
    logits = e.score(PROMPTS[3], chunk=5)
    assert logits.shape == (27, len(tiny_llama.vocab()[0])) and logits.dtype == torch.float32
    s = e.add_request(PROMPTS[3], SamplingParams(max_tokens=1, **GREEDY))
    drain(e)
    assert s.output_ids == [int(logits[-1].argmax())]
    assert e.cache.pages_in_use == 0


# ---------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(str(tiny_path), kv_cache_type="q8_0", num_ctx=128, num_parallel=4, progress=False)


def test_llm_generate_stream_and_info(llm):
    c = llm.generate("the cab", max_tokens=8, ignore_eos=True, **GREEDY)
    assert c.finish_reason == "length" and c.eval_count == 8 and str(c) == c.text
    assert c.prompt_eval_count == len(llm.tokenize("the cab"))
    stream = llm.generate("the cab", stream=True, max_tokens=8, ignore_eos=True, **GREEDY)
    assert "".join(stream) == c.text and stream.completion.token_ids == c.token_ids
    info = llm.kv_cache_info()
    assert (info["type_k"], info["type_v"], info["num_ctx"]) == ("q8_0", "q8_0", 128)
    assert info["bytes"] == llm.engine.cache.nbytes and info["pages_in_use"] == 0


def test_llm_chat_uses_template(llm):
    ids = llm.chat_prompt([{"role": "user", "content": "hi"}])
    text = llm.detokenize(ids, skip_special=False)  # no template in the file: ChatML
    assert ids[0] == 1 and text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    c = llm.chat([{"role": "user", "content": "hi"}], max_tokens=3, **GREEDY)
    assert c.prompt_eval_count == len(ids)


def test_llm_logits_and_tokenize(llm):
    ids = llm.tokenize("the bat")
    assert ids[0] == 1 and llm.detokenize(ids) == "the bat"
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.config.vocab_size)


def test_llm_stream_closed_early_cancels(llm):
    stream = llm.generate("abc", stream=True, ignore_eos=True, **GREEDY)
    it = iter(stream)
    next(it)
    assert llm.engine.cache.pages_in_use > 0
    stream.close()
    assert llm.engine.cache.pages_in_use == 0 and not llm.engine.has_work()


def test_llm_stream_made_but_never_read(llm):
    stream = llm.generate("abc", stream=True, max_tokens=3, **GREEDY)
    other = llm.generate("the", max_tokens=5, ignore_eos=True, **GREEDY)  # steps run both
    assert other.eval_count == 5
    assert "".join(stream) == stream.completion.text  # nothing it produced meanwhile was lost
    assert stream.completion.eval_count >= 1 and stream.completion.finish_reason in ("stop", "length")
    lost = llm.generate("abc", stream=True, max_tokens=50, ignore_eos=True, **GREEDY)
    del lost  # dropped unread: cancelled, pages back
    assert llm.engine.cache.pages_in_use == 0 and not llm.engine.has_work()


def test_llm_threads_batch_and_match_sequential(llm):
    prompts = ["a", "the cat", "bab", "he th"]
    alone = [llm.generate(p, max_tokens=10, ignore_eos=True, **GREEDY).token_ids for p in prompts]
    results = [None] * 4

    def worker(i):
        results[i] = llm.generate(prompts[i], max_tokens=10, ignore_eos=True, **GREEDY).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_llm_reconfigure_changes_types(llm):
    llm.reconfigure(cache_type_v="q4_0")
    info = llm.kv_cache_info()
    assert (info["type_k"], info["type_v"]) == ("q8_0", "q4_0")
    with pytest.raises(ValueError, match="valid types"):
        llm.reconfigure(kv_cache_type="q3_x")
    assert llm.kv_cache_info()["type_v"] == "q4_0"  # unchanged after a bad request
    llm.reconfigure(kv_cache_type="q8_0")
    assert llm.generate("a", max_tokens=2, **GREEDY).eval_count <= 2


def test_greedy_rows_pick_what_torch_argmax_picks():
    """The engine's greedy pick (numpy's argmax on CPU) against torch's: the first of tied
    maxima, a NaN taken as the largest, on fresh random rows."""
    from kvslim.sampling import greedy_rows

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for _ in range(100):
        x = torch.randn(4, 300, generator=g)
        x[0, 7] = x[0, 250] = 1e9  # a tie
        x[1, int(torch.randint(0, 300, (), generator=g))] = float("nan")
        x[2] = float("-inf")  # every value -inf: index 0
        assert greedy_rows(x) == x.argmax(-1).tolist()
