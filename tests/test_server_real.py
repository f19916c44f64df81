"""kvslim serve with the real SmolLM2 model, over loopback with the ollama and openai clients.

Slow: one model load, short answers (num_predict 6-8) so it stays within a couple of
minutes on two CPU cores.
"""
from __future__ import annotations

import concurrent.futures

import httpx
import ollama
import openai
import pytest

from kvslim.settings import ServerSettings
from test_server import ps_model, running_server, settled, wait_until
from greedy import same_up_to_rounding

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}
TOPICS = ["the sea", "bread", "the moon", "trains", "cats", "rain", "music", "chess", "bees",
          "snow", "coffee", "maps", "glass", "tigers", "clocks", "paper"]


@pytest.fixture(scope="module")
def served(smollm2_gguf):
    settings = ServerSettings.from_env({}, num_parallel=16, num_ctx=512, kv_cache_type="q8_0")
    with running_server(settings) as s:
        ollama.Client(host=s.url).generate(model="smollm2")  # load once for the module
        yield s


@pytest.fixture
def client(served):
    return ollama.Client(host=served.url, timeout=300)


@pytest.fixture
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_ollama_generate_and_chat_streaming_and_not(client):
    options = {"num_predict": 8, **GREEDY}
    g = client.generate(model="smollm2", prompt="Why is the sky blue?", options=options)
    assert g.response.strip() and g.done_reason in ("stop", "length") and 0 < g.eval_count <= 8
    assert g.prompt_eval_count > 5 and g.prompt_eval_duration > 0 and g.eval_duration > 0
    streamed = list(client.generate(model="smollm2", prompt="Why is the sky blue?", stream=True,
                                    options=options))
    assert "".join(p.response for p in streamed) == g.response and streamed[-1].done
    messages = [{"role": "user", "content": "Name a colour."}]
    c = client.chat(model="smollm2", messages=messages, options=options)
    assert c.message.content.strip() and c.message.role == "assistant"
    streamed = list(client.chat(model="smollm2", messages=messages, stream=True, options=options))
    assert "".join(p.message.content for p in streamed) == c.message.content
    assert streamed[-1].eval_count == c.eval_count


def test_openai_chat_and_completions_streaming_and_not(oai):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    assert text.strip() and r.usage.completion_tokens <= 8
    chunks = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    t = oai.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6,
                               temperature=0)
    assert t.choices[0].text.strip() and t.usage.prompt_tokens > 3
    chunks = oai.completions.create(model="smollm2", prompt="The capital of France is",
                                    max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == t.choices[0].text


def _ask(url: str, i: int, stream: bool) -> str:
    """Question i, alternately through the ollama and the openai client."""
    messages = [{"role": "user", "content": f"Tell me one fact about {TOPICS[i]}."}]
    if i % 2 == 0:
        c = ollama.Client(host=url, timeout=300)
        out = c.chat(model="smollm2", messages=messages, stream=stream,
                     options={"num_predict": 6, **GREEDY})
        return "".join(p.message.content for p in out) if stream else out.message.content
    o = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    out = o.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                    stream=stream)
    return "".join(c.choices[0].delta.content or "" for c in out) if stream else \
        out.choices[0].message.content


def test_16_concurrent_streams_equal_their_solo_answers(served):
    solo = [_ask(served.url, i, stream=False) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: _ask(served.url, i, stream=True), range(16)))
    assert together == solo
    assert len(set(solo)) >= 8  # different questions, different answers
    wait_until(lambda: settled(served.url, "smollm2"), what="no sequence pages")
    kv = ps_model(served.url, "smollm2")["kv_cache"]
    assert kv["pages_sequences"] == 0 and kv["pages_in_use"] == kv["pages_prefix_cache"]


def test_client_leaving_mid_stream_returns_its_pages(served, oai):
    runner = served.runner("smollm2")
    before = runner.scheduler.counters["finished_cancel"]
    stream = oai.chat.completions.create(model="smollm2", max_tokens=300, stream=True,
                                         messages=[{"role": "user", "content": "Write a long story."}])
    next(iter(stream))
    stream.close()
    wait_until(lambda: runner.scheduler.counters["finished_cancel"] > before, timeout=120,
               what="the sequence to be cancelled")
    wait_until(lambda: settled(served.url, "smollm2"), what="pages back")


# How far a token's logprob may move between two computations of the same prompt that
# round differently: a cached prefix's (its rest prefilled as a shorter chunk, over the
# prefix's stored q8_0 rows) and a full prefill's. Measured on SmolLM2 with a q8_0 cache,
# the six tokens below: 0.001-0.021; a wrong K/V row moves it by whole units.
def test_shared_system_prompt_is_served_from_the_prefix_cache(served):
    system = ("You are a careful assistant for a library. Answer in one short sentence, use plain "
              "words, and never invent facts. ") * 6  # well over one 64-token page
    def ask(question: str) -> dict:
        return httpx.post(served.url + "/api/chat", timeout=300, json={
            "model": "smollm2", "stream": False, "options": {"num_predict": 6, **GREEDY},
            "logprobs": True, "top_logprobs": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        }).json()

    first, again, other = ask("What is a book?"), ask("What is a book?"), ask("What is a shelf?")
    assert first["prompt_eval_count"] > 128 and len(first["logprobs"]) == first["eval_count"]
    assert again["prompt_cache_count"] >= 128 and same_up_to_rounding(again, first), (again, first)
    assert other["prompt_cache_count"] >= 64


# ---------------------------------------------------------------- embeddings and OpenAI details

PAIRS = ["The cat sat on the mat.", "A kitten was sitting on the rug.",
         "Stock markets fell sharply today.", "Investors sold shares as prices dropped.",
         "How do I bake bread?", "What is a good recipe for a loaf of bread?"]


def test_embeddings_rank_each_sentence_nearest_its_paraphrase(served, client, oai):
    import numpy as np

    v = np.array(client.embed(model="smollm2", input=PAIRS).embeddings)
    cos = v @ v.T
    np.fill_diagonal(cos, -1)
    assert list(cos.argmax(1)) == [1, 0, 3, 2, 5, 4]
    o = np.array([d.embedding for d in oai.embeddings.create(model="smollm2", input=PAIRS[:2]).data])
    assert (o * v[:2]).sum(1).min() > 0.9999  # another batch: the same vectors to rounding
    wait_until(lambda: settled(served.url, "smollm2"), what="no sequence pages")


def test_n_answers_and_logprobs_with_smollm2(served, oai):
    messages = [{"role": "user", "content": "Name a colour."}]
    one = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0,
                                      logprobs=True, top_logprobs=2,
                                      extra_body={"options": {"repeat_penalty": 1.0}})
    four = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, n=4,
                                       temperature=0, extra_body={"options": {"repeat_penalty": 1.0}})
    assert [c.message.content for c in four.choices] == [one.choices[0].message.content] * 4
    content = one.choices[0].logprobs.content
    assert len(content) == one.usage.completion_tokens
    assert all(e.top_logprobs[0].token == e.token and e.logprob <= 0 for e in content)
    wait_until(lambda: settled(served.url, "smollm2"), what="no sequence pages")
