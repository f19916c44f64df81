"""Structured output and tools through the official ollama and openai clients over loopback.

On the tiny random model the grammar alone makes answers valid, so every JSON answer
must parse and validate, and a forced tool call must come back as one. The SmolLM2
tool-call round trip (the model reads the tool's answer and uses it) is slow.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings as hsettings

from kvslim import cli
from kvslim.chat import ToolCallStream, parse_tool_calls, render_chat
from kvslim.settings import ServerSettings

from test_grammar import PERSON, SCHEMAS
from test_server import running_server

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tiny_path):
    s = ServerSettings.from_env({}, num_parallel=4)
    with running_server(s, {"tiny": tiny_path}) as served:
        yield served


# ---------------------------------------------------------------- parsing (no server)


def test_parse_tool_calls_in_the_templates_forms():
    args = {"city": "Oslo"}
    tagged = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert parse_tool_calls(tagged) == ("Let me look.", [{"name": "get_weather", "arguments": args}])
    llama = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert parse_tool_calls(llama) == ("", [{"name": "get_weather", "arguments": args}])
    mistral = '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\\"x\\": 1}"}]'
    assert parse_tool_calls(mistral)[1] == [{"name": "a", "arguments": {}},
                                            {"name": "b", "arguments": {"x": 1}}]
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    assert parse_tool_calls(fenced)[1] == [{"name": "get_weather", "arguments": args}]
    unclosed = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert parse_tool_calls(unclosed)[1] == [{"name": "get_weather", "arguments": args}]
    # JSON that is not a call of a known tool stays text
    assert parse_tool_calls('{"name": "x", "arguments": {}}', {"get_weather"}) == \
        ('{"name": "x", "arguments": {}}', [])
    assert parse_tool_calls("Sunny, 18 C.") == ("Sunny, 18 C.", [])
    assert parse_tool_calls("<tool_call>not json</tool_call>")[1] == []


@pytest.mark.parametrize("pieces", [["Hi <tool", "_call>", '{"name": "f", "arguments": {}}', "</tool_call>"],
                                    ['{"na', 'me": "f", "arguments": {}}'],
                                    ["Hello", " world", " <t", "able>"]])
def test_tool_call_stream_holds_back_only_what_may_be_a_call(pieces):
    whole = "".join(pieces)
    s = ToolCallStream({"f"})
    released = "".join(s.push(p) for p in pieces)
    rest, calls = s.finish()
    content, expected = parse_tool_calls(whole, {"f"})
    assert calls == expected
    if calls:
        assert (released + rest).strip() == content
    else:
        assert released + rest == whole
    assert "<tool_call>" not in released


def test_tools_reach_the_template(tiny_parts):
    _, tok = tiny_parts
    tok.vocab.chat_template = None  # ChatML fallback: no tools variable
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "rain"}'}]
    text = tok.decode(render_chat(tok, history, tools=[WEATHER]), skip_special=False)
    assert '"name": "get_weather"' in text and "<tool_call>" in text  # the listing and the call
    assert '<tool_response>\n{"sky": "rain"}\n</tool_response>' in text
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}"
                "{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                "{{ c.function.arguments | tojson }}{% endfor %};{% endfor %}")
    tok._template, tok.vocab.chat_template = None, template  # a template that takes tools
    try:
        text = tok.decode(render_chat(tok, history, tools=[WEATHER, TIME]))
    finally:
        tok._template, tok.vocab.chat_template = None, None
    assert text.startswith("[get_weather][get_time]user:Weather in Oslo?;")
    assert 'assistant:{"city": "Oslo"};tool:{"sky": "rain"};' in text  # arguments JSON once


# ---------------------------------------------------------------- Ollama


def test_ollama_format_json_and_schema(client):
    g = client.generate(model="tiny", prompt="the", format="json", options={**GREEDY, "num_predict": 60})
    if g.done_reason == "stop":
        assert isinstance(json.loads(g.response), dict)
    else:  # cut at num_predict: still a prefix the grammar allowed
        assert g.response.startswith("{")
    c = client.chat(model="tiny", messages=[{"role": "user", "content": "a person"}], format=PERSON,
                    options={"temperature": 1.0, "seed": 3})
    assert c.done_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), PERSON)
    parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": "a person"}],
                             format=PERSON, options={"temperature": 1.0, "seed": 3}, stream=True))
    assert "".join(p.message.content for p in parts) == c.message.content


def test_ollama_bad_format_is_a_400(client, server):
    for fmt in ({"type": "nope"}, {"type": "array", "uniqueItems": True}):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="tiny", prompt="x", format=fmt)
        assert e.value.status_code == 400 and "unsupported JSON schema" in str(e.value)
    r = httpx.post(server.url + "/api/chat", json={  # the client itself refuses other strings
        "model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": "yaml"})
    assert r.status_code == 400 and 'format must be "json"' in r.json()["error"]


def test_ollama_tools_with_history(client):
    """Tools and tool turns are accepted; an answer that is no call is plain content."""
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "rain"}]
    r = client.chat(model="tiny", messages=messages, tools=[WEATHER], options={**GREEDY, "num_predict": 8})
    assert r.message.role == "assistant" and r.done
    # forced through format: the answer is a call, returned as tool_calls (streamed too)
    call_format = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                                    "arguments": WEATHER["function"]["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": False}
    for stream in (False, True):
        out = client.chat(model="tiny", messages=messages[:1], tools=[WEATHER], format=call_format,
                          options={"temperature": 1.0, "seed": 5}, stream=stream)
        parts = list(out) if stream else [out]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        jsonschema.validate(dict(calls[0].function.arguments), WEATHER["function"]["parameters"])
        assert "".join(p.message.content for p in parts).strip() == ""


# ---------------------------------------------------------------- OpenAI


def test_openai_response_format(oai):
    schema_format = {"type": "json_schema",
                     "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    response_format=schema_format, seed=1)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              response_format=schema_format, seed=1, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content
    r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_object"}, max_tokens=120, **GREEDY_OAI)
    assert r.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="unsupported JSON schema"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema", "json_schema": {
                                        "name": "n", "schema": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(openai.BadRequestError, match="response_format.type"):
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "xml"})


GREEDY_OAI = {"temperature": 0}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_openai_forced_tool_calls(oai, choice):
    messages = [{"role": "user", "content": "Weather or time?"}]
    r = oai.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                    tool_choice=choice, seed=2)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice=choice, seed=2, stream=True))
    deltas = [c.choices[0] for c in chunks if c.choices]
    streamed = [t for d in deltas for t in (d.delta.tool_calls or [])]
    assert [(t.function.name, t.function.arguments) for t in streamed] == \
        [(call.function.name, call.function.arguments)]
    assert deltas[-1].finish_reason == "tool_calls"
    # the call and its result go back in the history
    history = messages + [ch.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "ok"}]
    r = oai.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME],
                                    tool_choice="none", max_tokens=5, **GREEDY_OAI)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls


def test_openai_bad_tools_are_400s(oai, server):
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        oai.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools\\[0\\]"):
        oai.chat.completions.create(model="tiny", messages=msgs, tools=[{"type": "function"}])
    with pytest.raises(openai.BadRequestError, match="cannot both"):
        oai.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], tool_choice="required",
                                    response_format={"type": "json_object"})
    bad_args = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": msgs + bad_args + msgs})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


@hsettings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_every_client_answer_validates(oai, client, schema):
    r = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], seed=7, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    g = client.generate(model="tiny", prompt="x", format=schema,
                        options={"seed": 7, "temperature": 1.0, "num_predict": 200})
    assert g.done_reason == "stop"
    jsonschema.validate(json.loads(g.response), schema)


# ---------------------------------------------------------------- CLI


def test_cli_format(capsys, tiny_path, clean_env):
    schema = json.dumps(PERSON)
    assert cli.main(["run", str(tiny_path), "a person", "--format", schema, "--seed", "4"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert cli.main(["run", str(tiny_path), "x", "--format", "yaml"]) == 1
    assert 'Error: format must be "json"' in capsys.readouterr().err
    assert cli.main(["run", str(tiny_path), "x", "--format", "{bad"]) == 1
    assert "Error: --format: not valid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------- SmolLM2 (slow)


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    s = ServerSettings.from_env({}, num_parallel=2, num_ctx=1024)
    with running_server(s) as served:
        yield served


@pytest.mark.slow
def test_smollm2_tool_call_round_trip(smol):
    """The model calls the tool (forced), reads its result from a tool turn, and answers
    with it; SmolLM2's template has no tools variable, so kvslim's prompt carries them."""
    oai = openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(model="smollm2", messages=messages, tools=[tool],
                                    tool_choice="required", temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    r = oai.chat.completions.create(model="smollm2", messages=messages, tools=[tool],
                                    temperature=0, max_tokens=40)
    answer = r.choices[0].message.content
    assert not r.choices[0].message.tool_calls and "sunny" in answer.lower(), answer
    # Ollama: the same exchange in its message shapes, with a schema for the answer
    client = ollama.Client(host=smol.url, timeout=300)
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_name": "get_weather",
                "content": json.dumps({"temperature_c": 18, "sky": "sunny"})}]
    report = {"type": "object", "properties": {"city": {"type": "string"}, "sky": {"type": "string"}},
              "required": ["city", "sky"], "additionalProperties": False}
    c = client.chat(model="smollm2", messages=history, tools=[tool], format=report,
                    options={"temperature": 0})
    got = json.loads(c.message.content)
    jsonschema.validate(got, report)
    assert got["sky"].lower() == "sunny", got
