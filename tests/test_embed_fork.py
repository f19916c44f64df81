"""Engine embeddings, n > 1 answers forked from one prefill, and token logprobs (tiny
random GGUF, fast). References: the model's own logits through ``Engine.score``."""
from __future__ import annotations

import pytest
import torch

from kvslim.cache import CacheFull
from kvslim.engine import PromptTooLong, truncate_dimensions
from kvslim.sampling import SamplingParams, token_logprobs

from test_engine import drain, engine  # the engine tests' tiny q8_0 engine and stepping

GREEDY = dict(temperature=0, repeat_penalty=1.0)
TEXTS = [[1, 270, 266, 262, 100], [1, 35, 45, 7, 262, 271, 68, 99, 120, 3, 259], [1], [1, 88, 200] * 9]


@pytest.fixture(scope="module")
def tiny_path(tiny_gguf):
    return tiny_gguf(ctx=128, tied=False)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embedding_is_the_pooled_hidden_state_behind_the_logits(tiny_parts, pooling):
    """logits = W_out h, so W_out applied to the pooled unit vector points along the
    same pooling of the logits that score() computes through the cache."""
    e = engine(tiny_parts)
    vectors, n = e.embed(TEXTS, pooling)
    assert vectors.shape == (len(TEXTS), e.model.config.d_model) and n == sum(map(len, TEXTS))
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    for x, v in zip(TEXTS, vectors):
        logits = e.score(x)  # [T, V]
        pooled = {"mean": logits.mean(0), "last": logits[-1], "cls": logits[0]}[pooling]
        projected = e.model.output(v[None].to(e.model.dtype)).float()[0]  # [V]
        assert _cos(projected, pooled) > 0.9999
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_embedding_batch_equals_one_by_one_and_is_deterministic(tiny_parts):
    e = engine(tiny_parts, max_batch_tokens=20)  # groups: [5, 11, 1], [27 alone, in chunks]
    batch, _ = e.embed(TEXTS)
    again, _ = e.embed(TEXTS)
    assert torch.equal(batch, again)
    for x, v in zip(TEXTS, batch):
        alone, _ = engine(tiny_parts).embed([x])
        assert torch.allclose(alone[0], v, atol=1e-5, rtol=0)
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_embedding_beside_a_running_request_keeps_its_pages(tiny_parts):
    e = engine(tiny_parts, num_parallel=2)
    s = e.add_request(TEXTS[1], SamplingParams(max_tokens=6, **GREEDY))
    e.step()
    held = e.cache.pages_in_use
    e.embed(TEXTS[:2])
    assert e.cache.pages_in_use == held
    drain(e)
    solo = engine(tiny_parts)
    ref = solo.add_request(TEXTS[1], SamplingParams(max_tokens=6, **GREEDY))
    drain(solo)
    assert s.output_ids == ref.output_ids
    e.cache.check()


def test_embedding_batch_larger_than_the_free_pool_runs_in_smaller_forwards(tiny_parts):
    e = engine(tiny_parts, n_pages=3)  # 3 pages of 16: the 4 texts need 5 at once
    batch, _ = e.embed(TEXTS[:3] + [TEXTS[3][:16]])
    ref, _ = engine(tiny_parts).embed(TEXTS[:3] + [TEXTS[3][:16]])
    assert torch.allclose(batch, ref, atol=1e-5)
    with pytest.raises(CacheFull, match="no room in the K/V pool for 60 tokens"):
        e.embed([list(range(1, 61))])  # 4 pages alone
    assert e.cache.pages_in_use == 0


def test_embedding_truncation_and_bad_input(tiny_parts):
    e = engine(tiny_parts, num_ctx=16)
    long = list(range(1, 40))
    cut, n = e.embed([long])
    assert n == 16 and torch.allclose(cut, e.embed([long[:16]])[0])
    with pytest.raises(PromptTooLong, match="39 tokens.*truncate is false"):
        e.embed([long], truncate=False)
    with pytest.raises(ValueError, match="no tokens"):
        e.embed([[]])
    with pytest.raises(ValueError, match="pooling must be one of"):
        e.embed([[1]], "max")
    assert e.cache.pages_in_use == 0


def test_truncated_dimensions_are_renormalised_prefixes():
    v = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    t = truncate_dimensions(v, 16)
    assert t.shape == (3, 16) and torch.allclose(t.norm(dim=-1), torch.ones(3))
    assert torch.allclose(t * v[:, :16].norm(dim=-1, keepdim=True), v[:, :16], atol=1e-6)
    assert truncate_dimensions(v, None) is v
    with pytest.raises(ValueError, match="dimensions must be between 1 and 64"):
        truncate_dimensions(v, 65)


# ---------------------------------------------------------------- n > 1


def test_n_answers_fork_one_prefill(tiny_parts):
    e = engine(tiny_parts, num_parallel=3)
    seq = e.add_request(TEXTS[3], SamplingParams(max_tokens=8, **GREEDY), n=3)
    assert len(seq.group) == 3
    e.step()  # the prefill: the parent alone evaluates the prompt, the others fork it
    parent, *sibs = seq.group
    assert parent.stats.prompt_eval_count == 27 and all(s.stats.prompt_eval_count == 0 for s in sibs)
    shared = set(e.cache.pages(parent.cache_id))
    assert all(set(e.cache.pages(s.cache_id)) == shared for s in sibs)  # copy on write
    drain(e)
    solo = engine(tiny_parts)
    ref = solo.add_request(TEXTS[3], SamplingParams(max_tokens=8, **GREEDY))
    drain(solo)
    assert all(s.output_ids == ref.output_ids for s in seq.group)
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_n_seeded_answers_differ_and_repeat(tiny_parts):
    def run():
        e = engine(tiny_parts, num_parallel=4)
        seq = e.add_request(TEXTS[0], SamplingParams(max_tokens=10, temperature=1.5, top_k=0,
                                                     top_p=1.0, seed=7), n=3)
        drain(e)
        return [s.output_ids for s in seq.group]
    first = run()
    assert first == run() and len({tuple(x) for x in first}) > 1
    e = engine(tiny_parts)
    with pytest.raises(ValueError, match="n must be between 1 and"):
        e.add_request(TEXTS[0], SamplingParams(max_tokens=2), n=2)


def test_cancelling_a_group_before_its_fork_frees_everything(tiny_parts):
    e = engine(tiny_parts, num_parallel=3)
    seq = e.add_request(TEXTS[3], SamplingParams(max_tokens=8, **GREEDY), n=3)
    e.cancel(seq)
    outs = drain(e)
    assert {o.seq for o in outs if o.reason == "cancel"} == set(seq.group)
    assert e.cache.pages_in_use == 0
    e.cache.check()


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_the_models_log_softmax(tiny_parts):
    e = engine(tiny_parts)
    s = e.add_request(TEXTS[1], SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    outs = drain(e)
    assert [o.logprobs for o in outs if o.token_ids] == [[x] for x in s.logprobs]
    ref = torch.log_softmax(e.score(s.token_ids[:-1])[s.n_prompt - 1:], dim=-1)  # [6, V]
    for (lp, top), tok, row in zip(s.logprobs, s.output_ids, ref):
        assert abs(lp - float(row[tok])) < 1e-4
        assert [i for i, _ in top] == row.topk(3).indices.tolist() and top[0][0] == tok  # greedy
        assert all(abs(p - float(row[i])) < 1e-4 for i, p in top)


def test_token_logprobs_without_alternatives_and_bounds():
    logits = torch.tensor([1.0, 2.0, 3.0])
    lp, top = token_logprobs(logits, 0, 0)
    assert top == [] and abs(lp - float(torch.log_softmax(logits, 0)[0])) < 1e-6
    with pytest.raises(ValueError, match="logprobs must be an integer in"):
        SamplingParams(logprobs=21)


def test_llm_embed_equals_the_engine_and_truncates_dimensions(tiny_path):
    from kvslim.llm import LLM

    llm = LLM(str(tiny_path), kv_cache_type="q8_0", num_ctx=128, progress=False)
    texts = ["the cat", "a dog ran"]
    v = llm.embed(texts)
    assert v.shape == (2, llm.config.d_model) and llm.pooling == "mean"
    ref, _ = llm.engine.embed([llm.tokenize(t) for t in texts])
    assert torch.equal(v, ref)
    assert torch.allclose(llm.embed("the cat")[0], v[0], atol=1e-5)
    assert llm.embed(texts, dimensions=8).shape == (2, 8)
    assert llm.engine.cache.pages_in_use == 0
