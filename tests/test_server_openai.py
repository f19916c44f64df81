"""OpenAI details and Ollama logprobs over loopback with the official clients (issue 16,
section 3), on the tiny random GGUF: n > 1 forked from one prefill, logprobs and
top_logprobs (streaming too), lists of prompts, the developer role, seed, user."""
from __future__ import annotations

import math

import openai
import pytest

from kvslim.settings import ServerSettings

from test_server import running_server, settled, wait_until

GREEDY = {"temperature": 0}
UNPENALISED = {"options": {"repeat_penalty": 1.0}}
MESSAGES = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
def server(tiny_path):
    with running_server(ServerSettings.from_env({}, num_parallel=4), {"tiny": tiny_path}) as served:
        yield served


def _chat(oai, **kw):
    return oai.chat.completions.create(model="tiny", messages=kw.pop("messages", MESSAGES),
                                       max_tokens=kw.pop("max_tokens", 8), **kw)


def _streamed(stream) -> tuple[dict, dict, dict]:
    """(text, logprob entries, finish reason) per choice index of a chat stream."""
    text, lps, reasons = {}, {}, {}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            lps.setdefault(c.index, []).extend(c.logprobs.content if c.logprobs else [])
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return text, lps, reasons


def test_n_greedy_choices_fork_one_prefill_and_equal_one_answer(server, oai):
    one = _chat(oai, **GREEDY)
    three = _chat(oai, n=3, **GREEDY)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content == one.choices[0].message.content for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # evaluated once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    text, _, reasons = _streamed(_chat(oai, n=3, stream=True, **GREEDY))
    assert text == {i: one.choices[0].message.content for i in range(3)}
    assert set(reasons) == {0, 1, 2}
    wait_until(lambda: settled(server.url, "tiny"), what="pages back")


def test_n_seeded_choices_differ_and_repeat(oai):
    kw = {"n": 3, "seed": 11, "temperature": 1.5, "max_tokens": 12, "user": "someone"}
    first = [c.message.content for c in _chat(oai, **kw).choices]
    assert first == [c.message.content for c in _chat(oai, **kw).choices]
    assert len(set(first)) > 1


def test_chat_logprobs_and_top_logprobs_streaming_and_not(oai):
    """Logprobs are the model's own distribution: with no repeat penalty (Ollama's default
    1.1 applies to /v1 too) the greedy token is the top one."""
    r = _chat(oai, logprobs=True, top_logprobs=3, extra_body=UNPENALISED, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    _, streamed, _ = _streamed(_chat(oai, logprobs=True, top_logprobs=3, stream=True,
                                     extra_body=UNPENALISED, **GREEDY))
    assert [(e.token, round(e.logprob, 4)) for e in streamed[0]] == \
        [(e.token, round(e.logprob, 4)) for e in content]
    plain = _chat(oai, logprobs=True, **GREEDY).choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in plain)
    assert _chat(oai, **GREEDY).choices[0].logprobs is None


def test_completions_list_of_prompts_with_n_and_logprobs(oai):
    prompts = ["once upon", "the end of"]
    alone = [oai.completions.create(model="tiny", prompt=p, max_tokens=6, **GREEDY).choices[0].text
             for p in prompts]
    r = oai.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, logprobs=2, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
        assert all(len(top) <= 2 and max(top.values()) >= lp_ - 1e-6
                   for top, lp_ in zip(lp.top_logprobs, lp.token_logprobs))
    texts = {}
    for chunk in oai.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, stream=True,
                                        **GREEDY):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: c.text for i, c in enumerate(r.choices)}
    ids = oai.completions.create(model="tiny", prompt=[[1, 35, 45], [1, 88]], max_tokens=3, **GREEDY)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_developer_role_is_the_system_prompt(oai):
    def answer(role):
        return _chat(oai, messages=[{"role": role, "content": "be brief"}] + MESSAGES,
                     **GREEDY).choices[0].message.content
    assert answer("developer") == answer("system")


def test_seed_and_penalties_are_honoured(oai):
    kw = {"temperature": 1.2, "max_tokens": 12}
    assert _chat(oai, seed=5, **kw).choices[0].message.content == \
        _chat(oai, seed=5, **kw).choices[0].message.content
    plain = _chat(oai, max_tokens=24, **GREEDY).choices[0].message.content
    penalised = _chat(oai, max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0,
                      **GREEDY).choices[0].message.content
    assert plain != penalised


def test_ollama_logprobs_generate_and_chat(client):
    g = client.generate(model="tiny", prompt="once upon", raw=True, logprobs=True, top_logprobs=2,
                        options={"num_predict": 6, "repeat_penalty": 1.0, **GREEDY})
    assert len(g.logprobs) == g.eval_count and all(len(e.top_logprobs) == 2 for e in g.logprobs)
    assert all(e.top_logprobs[0].token == e.token for e in g.logprobs)
    streamed = [e for part in client.generate(model="tiny", prompt="once upon", raw=True, stream=True,
                                              logprobs=True, top_logprobs=2,
                                              options={"num_predict": 6, "repeat_penalty": 1.0,
                                                       **GREEDY})
                for e in (part.logprobs or [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in g.logprobs]
    c = client.chat(model="tiny", messages=MESSAGES, logprobs=True, options={"num_predict": 4, **GREEDY})
    assert len(c.logprobs) == c.eval_count and all(e.logprob <= 0 for e in c.logprobs)
    assert client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 2}).logprobs is None


def test_responses_api_text_streaming_and_not(oai):
    chat = _chat(oai, messages=[{"role": "system", "content": "be brief"}] + MESSAGES, **GREEDY)
    r = oai.responses.create(model="tiny", input=MESSAGES, instructions="be brief",
                             max_output_tokens=8, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens <= 8
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    events = list(oai.responses.create(model="tiny", input=MESSAGES, instructions="be brief",
                                       max_output_tokens=8, temperature=0, stream=True))
    assert events[0].type == "response.created"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == r.output_text
    assert oai.responses.create(model="tiny", input="hi", max_output_tokens=2).output_text is not None
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        oai.responses.create(model="tiny", input="hi",
                             tools=[{"type": "function", "name": "f", "parameters": {}}])
