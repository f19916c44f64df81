"""kvslim serve on a tiny random GGUF, over loopback with the real ollama and openai clients.

Timing-dependent cases (a full queue, a client leaving mid-stream) hold the engine's
steps with ``StepGate`` so they do not depend on how fast the machine is.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, replace

import httpx
import ollama
import openai
import pytest
import uvicorn

from kvslim import formats
from kvslim.codec import CodecSettings
from kvslim.server.app import create_app
from kvslim.settings import ServerSettings, is_loopback, parse_host

import tiny_llama

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


# ---------------------------------------------------------------- helpers shared with test_server_real


@dataclass
class Served:
    url: str
    app: object

    def runner(self, name: str):
        return next(r for r in self.app.state.registry.loaded() if r.name == name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(settings: ServerSettings, models: dict | None = None):
    """uvicorn serving create_app(settings) on a free loopback port, in a thread."""
    settings = replace(settings, host="127.0.0.1", port=_free_port())
    app = create_app(settings, models)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Served(settings.address, app)
    finally:
        server.should_exit = True
        thread.join(30)


class StepGate:
    """Holds a runner's engine steps until released, so a test decides when steps happen."""

    def __init__(self, runner):
        self.engine, self._sem = runner.engine, threading.Semaphore(0)
        self.held = threading.Event()  # a step has come to the gate
        self._step = self.engine.step
        self.engine.step = self._gated

    def _gated(self):
        self.held.set()
        self._sem.acquire()
        return self._step()

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()

    def open(self) -> None:
        self.engine.step = self._step
        self.allow(100)

    @contextlib.contextmanager
    def trickle(self, every: float = 0.05):
        """Allow one step at a time until the block ends (waiting for a first output)."""
        done = threading.Event()

        def run():
            while not done.wait(every):
                self.allow(1)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ps_model(url: str, name: str) -> dict:
    models = httpx.get(f"{url}/api/ps").json()["models"]
    return next(m for m in models if m["model"] == f"{name}:latest")


def settled(url: str, name: str) -> bool:
    """No request running or waiting and no page owned by a sequence."""
    m = ps_model(url, name)
    return m["requests"]["running"] == m["requests"]["waiting"] == 0 and \
        m["kv_cache"]["pages_sequences"] == 0


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tiny_path):
    settings = ServerSettings.from_env({}, num_parallel=4, max_body=64 * 1024)
    with running_server(settings, {"tiny": tiny_path}) as served:
        yield served


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("value, expected", [
    (None, ("127.0.0.1", 11434)), ("", ("127.0.0.1", 11434)), ("0.0.0.0", ("0.0.0.0", 11434)),
    ("0.0.0.0:8080", ("0.0.0.0", 8080)), (":8080", ("127.0.0.1", 8080)),
    ("http://example.org", ("example.org", 80)), ("http://10.0.0.2:99/x", ("10.0.0.2", 99)),
    ("[::1]:7000", ("::1", 7000)), ("::", ("::", 11434)), ("localhost", ("localhost", 11434)),
])
def test_host_parses_like_ollama_host(value, expected):
    assert parse_host(value) == expected


@pytest.mark.parametrize("bad", ["host:99999", "host:port", "https://x:1"])
def test_bad_host_is_an_error(bad):
    with pytest.raises(ValueError):
        parse_host(bad)


def test_only_loopback_unless_asked():
    assert is_loopback(ServerSettings.from_env({}).host)
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_settings_from_environment_and_flags():
    env = {"KVSLIM_HOST": "0.0.0.0:9000", "KVSLIM_KV_CACHE_TYPE": "q8_0", "KVSLIM_NUM_PARALLEL": "16",
           "KVSLIM_FLASH_ATTENTION": "1", "KVSLIM_KV_MEMORY": "1GiB", "KVSLIM_MAX_QUEUE": "3",
           "KVSLIM_PREFIX_CACHE": "0"}
    s = ServerSettings.from_env(env)
    assert (s.host, s.port, s.cache_type_k, s.cache_type_v) == ("0.0.0.0", 9000, "q8_0", "q8_0")
    assert (s.num_parallel, s.flash_attn, s.kv_memory, s.max_queue, s.prefix_cache) == \
        (16, "on", 2**30, 3, False)
    s = ServerSettings.from_env(env, cache_type_v="q4_0", num_parallel=2, host="127.0.0.1")
    assert (s.cache_type_k, s.cache_type_v, s.num_parallel, s.host) == ("q8_0", "q4_0", 2, "127.0.0.1")
    assert s.codec == CodecSettings()
    s = ServerSettings.from_env({"KVSLIM_KV_ROTATION": "0", "KVSLIM_KV_ROUNDING": "ggml"}, kv_centering="on")
    assert s.codec == CodecSettings("off", "on", "ggml")
    for bad in ({"KVSLIM_NUM_PARALLEL": "0"}, {"KVSLIM_KV_CACHE_TYPE": "q3"},
                {"KVSLIM_KV_MEMORY": "lots"}, {"KVSLIM_PREFIX_CACHE": "maybe"},
                {"KVSLIM_KV_ROTATION": "maybe"}):
        with pytest.raises(ValueError):
            ServerSettings.from_env(bad)


def test_kvslim_serve_command_serves_on_kvslim_host(tiny_path):
    import os
    import subprocess
    import sys

    port = _free_port()
    env = dict(os.environ, KVSLIM_HOST=f"127.0.0.1:{port}", KVSLIM_NUM_PARALLEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "kvslim.cli", "serve", str(tiny_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/api/version"), what="the server")
        names = [m["name"] for m in httpx.get(f"http://127.0.0.1:{port}/api/tags", timeout=60).json()["models"]]
        assert "tiny:latest" in names
    finally:
        proc.terminate()
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_is_a_cli_verb():
    from kvslim.cli import build_parser

    args = build_parser().parse_args(["serve", "--num-parallel", "8", "--kv-cache-type", "q4_0"])
    assert args.num_parallel == 8 and args.kv_cache_type == "q4_0" and callable(args.func)


# ---------------------------------------------------------------- the APIs with real clients


def test_ollama_generate_and_chat(client):
    r = client.generate(model="tiny", prompt="the cat", options={"num_predict": 4, **GREEDY})
    assert r.done and r.done_reason == "length" and r.eval_count == 4
    assert r.prompt_eval_count > 0 and r.total_duration >= r.eval_duration > 0
    assert r.context[-4:] and len(r.context) == r.prompt_eval_count + 4
    pieces = list(client.generate(model="tiny", prompt="the cat", stream=True,
                                  options={"num_predict": 4, **GREEDY}))
    assert [p.done for p in pieces][-1] and not any(p.done for p in pieces[:-1])
    assert "".join(p.response for p in pieces) == r.response
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = client.chat(model="tiny", messages=messages, options={"num_predict": 3, **GREEDY})
    assert c.message.role == "assistant" and c.eval_count == 3 and c.done
    streamed = list(client.chat(model="tiny:latest", messages=messages, stream=True,
                                options={"num_predict": 3, **GREEDY}))
    assert "".join(p.message.content for p in streamed) == c.message.content
    assert streamed[-1].done_reason == "length" and streamed[-1].prompt_eval_count == c.prompt_eval_count


def test_long_chat_drops_old_messages_not_the_system_prompt(server, client, tiny_parts):
    """A chat longer than num_ctx loses whole old messages, as Ollama's does (the system
    message stays); with truncate false it is a 400."""
    from kvslim.chat import fit_messages, prompt_limit, render_chat

    _, tok = tiny_parts
    msgs = [{"role": "system", "content": "you are a cat"}] + \
        [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "the cab " * 3}
         for i in range(21)]
    def ids(ms):  # as the server renders a chat (BOS once)
        return render_chat(tok, ms)

    client.generate(model="tiny", prompt="hi", options={"num_predict": 1})  # loaded, as it is
    num_ctx = ps_model(server.url, "tiny")["context_length"]
    assert len(ids(msgs)) > num_ctx
    want = fit_messages(msgs, lambda ms: len(ids(ms)), prompt_limit(num_ctx, 2))
    assert want[0] == msgs[0] and want[-1] == msgs[-1] and 3 < len(want) < len(msgs)
    c = client.chat(model="tiny", messages=msgs, options={"num_predict": 2, **GREEDY})
    assert c.done and c.prompt_eval_count == len(ids(want))
    r = httpx.post(f"{server.url}/api/chat", json={"model": "tiny", "messages": msgs, "stream": False,
                                                   "truncate": False, "options": {"num_predict": 2}})
    assert r.status_code == 400 and "more than the context length" in r.json()["error"]


def test_openai_chat_and_completions(oai):
    messages = [{"role": "user", "content": "hi"}]
    r = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3 and r.usage.total_tokens == r.usage.prompt_tokens + 3
    chunks = list(oai.chat.completions.create(model="tiny", messages=messages, max_tokens=3,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    t = oai.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    assert t.object == "text_completion" and t.usage.completion_tokens == 4
    streamed = list(oai.completions.create(model="tiny", prompt="abc", max_tokens=4,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == t.choices[0].text
    assert [m.id for m in oai.models.list().data][0] == "tiny"


def _prompts(n: int) -> list[str]:
    words = ["the", "a", "cat", "hat", "bat", "eat", "tea", "heat"]
    return [" ".join(words[(i * 3 + j) % len(words)] for j in range(3 + i % 5)) + f" {i}" for i in range(n)]


def test_16_concurrent_streams_equal_their_solo_answers(server, client):
    options = {"num_predict": 6, **GREEDY}
    prompts = _prompts(16)
    solo = [client.generate(model="tiny", prompt=p, raw=True, options=options).response for p in prompts]

    def stream(p: str) -> str:
        return "".join(c.response for c in ollama.Client(host=server.url).generate(
            model="tiny", prompt=p, raw=True, stream=True, options=options))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    assert together == solo
    assert len(set(solo)) > 1  # different prompts, different answers: a mix-up would show
    wait_until(lambda: settled(server.url, "tiny"), what="no sequence pages")
    m = ps_model(server.url, "tiny")
    assert m["kv_cache"]["pages_in_use"] == m["kv_cache"]["pages_prefix_cache"]


def test_identical_prefix_reuses_cached_pages(server, oai):
    long_prompt = "the cat ate the hat " * 12  # > 64 tokens: at least one whole page
    body = {"model": "tiny", "prompt": long_prompt, "raw": True, "stream": False,
            "options": {"num_predict": 3, **GREEDY}}
    # prompt_cache_count is kvslim's extra field: the ollama client does not keep it
    first = httpx.post(server.url + "/api/generate", json=body, timeout=60).json()
    second = httpx.post(server.url + "/api/generate", json=body, timeout=60).json()
    assert second["prompt_cache_count"] >= 64 and second["response"] == first["response"]
    assert second["prompt_eval_count"] == first["prompt_eval_count"]
    r = oai.completions.create(model="tiny", prompt=long_prompt, max_tokens=3, temperature=0,
                               extra_body={"options": {"repeat_penalty": 1.0}})
    assert r.usage.prompt_tokens_details.cached_tokens >= 64
    assert r.choices[0].text == first["response"]


def test_client_leaving_mid_stream_returns_its_pages(server, client):
    body = {"model": "tiny", "prompt": "a long answer", "options": {"num_predict": 60, **GREEDY}}
    # greedy is deterministic: this answer runs to its length, so only a cancel ends it early
    assert client.generate(**body).done_reason == "length"
    runner = server.runner("tiny")
    gate = StepGate(runner)
    try:
        with httpx.stream("POST", f"{server.url}/api/generate", timeout=30, json=body) as r:
            with gate.trickle():  # a step at a time until the first text arrives
                first = json.loads(next(r.iter_lines()))
            assert first["done"] is False
        wait_until(lambda: runner.engine.running and runner.engine.running[0].cancelled,
                   what="the sequence to be cancelled")
    finally:
        gate.open()
    wait_until(lambda: settled(server.url, "tiny"), what="pages back")
    assert runner.scheduler.counters["finished_cancel"] >= 1


def test_full_queue_answers_503_and_recovers(tiny_path):
    settings = ServerSettings.from_env({}, num_parallel=1, max_queue=1)
    with running_server(settings, {"tiny": tiny_path}) as served:
        client = ollama.Client(host=served.url)
        client.generate(model="tiny")  # load
        gate = StepGate(served.runner("tiny"))
        body = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                running = pool.submit(httpx.post, f"{served.url}/api/generate", json=body, timeout=60)
                wait_until(lambda: served.runner("tiny").scheduler.waiting() == 1, what="first queued")
                queued = pool.submit(httpx.post, f"{served.url}/api/generate", json=body, timeout=60)
                wait_until(lambda: served.runner("tiny").scheduler.waiting() == 2, what="second queued")
                refused = httpx.post(f"{served.url}/api/generate", json=body)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert "maximum pending requests" in refused.json()["error"]
                with pytest.raises(ollama.ResponseError) as e:
                    client.generate(model="tiny", prompt="x", options={"num_predict": 2})
                assert e.value.status_code == 503
                oai = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
                with pytest.raises(openai.APIStatusError) as e:
                    oai.completions.create(model="tiny", prompt="x", max_tokens=2)
                assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
            finally:
                gate.open()
            assert running.result().status_code == queued.result().status_code == 200
        assert client.generate(model="tiny", prompt="x", options={"num_predict": 2}).done


# ---------------------------------------------------------------- bad input


BAD_OLLAMA = [
    ("/api/generate", b"{not json", 400, "invalid JSON"),
    ("/api/generate", b"", 400, "missing request body"),
    ("/api/chat", b"[1, 2]", 400, "JSON object"),
    ("/api/generate", {"prompt": "hi"}, 400, "model is required"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required"),
    ("/api/chat", {"model": "tiny", "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/api/generate", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/api/chat", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"top_p": 0}}, 400, "top_p"),
    ("/api/generate", {"model": "nope", "prompt": "hi"}, 404, "model 'nope' not found"),
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": -3}}, 400, "num_predict"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 10**12}}, 400,
     "more than the model can ever generate"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_predict": 2.5}}, 400, "num_predict"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"num_ctx": 0}}, 400, "num_ctx"),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                   "options": {"kv_cache_type": "q3_k"}}, 400, "valid types: f32, f16"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "options": {"cache_type_v": "int4"}}, 400,
     "q4_0"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "format": "yaml"}, 400, "format must be"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "truncate": False,
                       "options": {"num_ctx": 8}}, 400, "more than the context length"),
    ("/api/generate", {"model": "tiny", "prompt": "hi", "context": [1, 10**6]}, 400, "token ids"),
    ("/api/pull", {"model": "no such/model!"}, 400, "invalid model name"),
    ("/api/nothing", {"model": "tiny"}, 404, "404 page not found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_OLLAMA)
def test_bad_input_gets_ollama_errors_and_the_server_keeps_serving(server, path, body, status, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status
    assert message in r.json()["error"]
    ok = httpx.post(server.url + "/api/generate", timeout=30, json={
        "model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    assert ok.status_code == 200 and ok.json()["done"]


BAD_OPENAI = [
    ("/v1/chat/completions", b"{", 400, "invalid JSON"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 1}]}, 400, "content"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "not found"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": -1}, 400, "max_tokens must be at least 1"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400,
     "more than the model can ever generate"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 5},
     400, "n must be at most KVSLIM_NUM_PARALLEL (4)"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0},
     400, "n must be at least 1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "options": {"kv_cache_type": "q2"}}, 400,
     "valid types"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", ""]}, 400, "prompt must not be empty"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_OPENAI)
def test_bad_input_gets_openai_errors(server, path, body, status, message):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_oversized_body_is_413_declared_or_streamed(server, oai):
    big = {"model": "tiny", "prompt": "x" * (65 * 1024)}
    r = httpx.post(server.url + "/api/generate", json=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    chunks = (b"x" * 8192 for _ in range(10))  # chunked: no Content-Length to trust
    r = httpx.post(server.url + "/api/generate", content=chunks)
    assert r.status_code == 413
    with pytest.raises(openai.APIStatusError) as e:
        oai.completions.create(model="tiny", prompt="x" * (65 * 1024))
    assert e.value.status_code == 413


# ---------------------------------------------------------------- the pool


def _page_bytes(n_layers: int, n_kv_heads: int, head_dim: int, k: str, v: str, page: int) -> int:
    per_head = head_dim * formats.block_bytes(k) // formats.QK + head_dim * formats.block_bytes(v) // formats.QK
    return n_layers * n_kv_heads * per_head * page


def test_cache_type_option_rebuilds_the_pool_with_exact_bytes(server, client):
    """The pool is sized from the server's num_ctx (tiny: 256) x num_parallel whatever
    num_ctx a request asks; a request that sets no type gets the server's f16 back."""
    t = tiny_llama.Tiny()
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1, "kv_cache_type": "q8_0",
                                                        "num_ctx": 128})
    m = ps_model(server.url, "tiny")
    kv = m["kv_cache"]
    assert (kv["requested_k"], kv["requested_v"], kv["type_k"], m["context_length"]) == \
        ("q8_0", "q8_0", "q8_0", 256)
    pages = 4 * 256 // 64  # num_parallel x the server's num_ctx, in pages
    assert kv["pages_total"] == pages
    assert kv["bytes"] == pages * _page_bytes(t.n_layers, t.n_kv_heads, t.head_dim,
                                              kv["type_k"], kv["type_v"], 64)
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1})  # the server's types
    kv = ps_model(server.url, "tiny")["kv_cache"]
    assert (kv["type_k"], kv["type_v"], kv["pages_total"]) == ("f16", "f16", 16)


def test_kv_coding_options_rebuild_the_pool_and_show_in_ps(server, client):
    """options.kv_centering / kv_rounding are part of the pool's configuration: a change
    rebuilds it and /api/ps reports it; an unknown value is a 400."""
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1, "kv_cache_type": "q4_0"})
    kv = ps_model(server.url, "tiny")["kv_cache"]  # tiny's head_dim 32 has no Hadamard block
    assert (kv["kv_rotation"], kv["kv_centering"], kv["kv_rounding"]) == ("off", "K", "lsq")
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1, "kv_cache_type": "q4_0",
                                                        "kv_centering": "off", "kv_rounding": "ggml"})
    kv = ps_model(server.url, "tiny")["kv_cache"]
    assert (kv["type_k"], kv["kv_centering"], kv["kv_rounding"]) == ("q4_0", "off", "ggml")
    r = httpx.post(f"{server.url}/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                       "options": {"kv_rotation": "sideways"}})
    assert r.status_code == 400 and "kv_rotation must be one of auto, on, off" in r.json()["error"]
    client.generate(model="tiny", prompt="hi", options={"num_predict": 1, "kv_cache_type": "f16",
                                                        "kv_centering": "auto", "kv_rounding": "auto"})


def test_kv_memory_budget_sizes_the_pool_in_whole_pages(tiny_path):
    t = tiny_llama.Tiny()
    budget = 300_000
    with running_server(ServerSettings.from_env({"KVSLIM_KV_MEMORY": str(budget),
                                           "KVSLIM_KV_CACHE_TYPE": "q8_0"}), {"tiny": tiny_path}) as s:
        ollama.Client(host=s.url).generate(model="tiny")
        kv = ps_model(s.url, "tiny")["kv_cache"]
    page = _page_bytes(t.n_layers, t.n_kv_heads, t.head_dim, kv["type_k"], kv["type_v"], 64)
    assert kv["pages_total"] == budget // page and kv["bytes"] == kv["pages_total"] * page <= budget


# ---------------------------------------------------------------- the other endpoints


def test_tags_show_ps_version_and_models(server, client):
    names = [m.model for m in client.list().models]
    assert "tiny:latest" in names
    shown = client.show("tiny")
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 256
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # big arrays only when verbose
    assert httpx.get(server.url + "/api/version").json()["version"]
    client.generate(model="tiny")
    running = client.ps().models
    assert running[0].model == "tiny:latest" and running[0].context_length > 0
    assert running[0].size > ps_model(server.url, "tiny")["kv_cache"]["bytes"]
    assert httpx.get(server.url + "/v1/models/tiny").json()["id"] == "tiny"
    assert httpx.get(server.url + "/v1/models/nope").status_code == 404
    assert httpx.get(server.url + "/").text == "kvslim is running"


def test_empty_prompt_loads_and_keep_alive_zero_unloads(server):
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny"}).json()
    assert r["done_reason"] == "load"
    r = httpx.post(server.url + "/api/chat", json={"model": "tiny", "messages": [], "keep_alive": 0}).json()
    assert r["done_reason"] == "unload" and r["message"]["content"] == ""
    assert httpx.get(server.url + "/api/ps").json()["models"] == []


# ---------------------------------------------------------------- scheduling and failures


def _ask_generate(url: str, options: dict) -> httpx.Response:
    return httpx.post(url + "/api/generate", timeout=60, json={
        "model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 3} | options})


def test_other_cache_types_run_side_by_side_in_a_pool_of_their_own(tiny_path):
    """Memory allows (no KVSLIM_KV_MEMORY): a q8_0 request gets its own pool and answers
    while a long f16 request (slowed to 50 ms a step) still runs in the f16 pool."""
    with running_server(ServerSettings.from_env({}, num_parallel=2), {"tiny": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "tiny"})
        runner = served.runner("tiny")
        f16_engine, real_step = runner.engine, runner.engine.step

        def slow_step():
            time.sleep(0.05)
            return real_step()

        f16_engine.step = slow_step
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                f16 = pool.submit(_ask_generate, served.url, {"num_predict": 150} | GREEDY)
                wait_until(lambda: f16_engine.running, what="the f16 request running")
                q8 = _ask_generate(served.url, {"kv_cache_type": "q8_0"})
                assert q8.status_code == 200 and q8.json()["load_duration"] > 0  # its pool's build
                assert f16_engine.running and not f16.done()  # side by side
                pools = ps_model(served.url, "tiny")["kv_pools"]
                assert sorted((p["type_k"], p["running"]) for p in pools) == [("f16", 1), ("q8_0", 0)]
            finally:
                f16_engine.step = real_step
            assert f16.result().status_code == 200
        assert runner.scheduler.counters["rebuilds"] == 1
        m = ps_model(served.url, "tiny")
        assert m["size"] == runner.weight_bytes + sum(p["bytes"] for p in m["kv_pools"])


def test_other_cache_types_wait_when_the_budget_holds_one_pool(tiny_path):
    """KVSLIM_KV_MEMORY is one budget for all the model's pools: the f16 pool fills it, so
    a q8_0 request waits for the running f16 one, then the idle f16 pool is dropped for
    its pool; a request that sets nothing after it gets the server's f16 back."""
    t = tiny_llama.Tiny()
    budget = 8 * _page_bytes(t.n_layers, t.n_kv_heads, t.head_dim, "f16", "f16", 64)
    settings = ServerSettings.from_env({"KVSLIM_KV_MEMORY": str(budget)}, num_parallel=2)
    with running_server(settings, {"tiny": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "tiny"})
        runner = served.runner("tiny")
        gate = StepGate(runner)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            try:
                f16 = pool.submit(_ask_generate, served.url, {})
                wait_until(lambda: runner.engine.waiting, what="the f16 request in the engine")
                q8 = pool.submit(_ask_generate, served.url, {"kv_cache_type": "q8_0"})
                wait_until(lambda: runner.scheduler.waiting() == 2, what="the q8_0 request queued")
                default = pool.submit(_ask_generate, served.url, {})  # behind the q8_0 one
                wait_until(lambda: runner.scheduler.waiting() == 3, what="the third request queued")
                assert runner.cache_config.type_k == "f16" and len(runner.pools) == 1
            finally:
                gate.open()
            results = [f.result() for f in (f16, q8, default)]
        assert [r.status_code for r in results] == [200, 200, 200]
        assert results[1].json()["load_duration"] > 0  # the rebuild is its load time
        assert results[2].json()["load_duration"] > 0  # and the rebuild back
        assert runner.cache_config.type_k == "f16" and runner.scheduler.counters["rebuilds"] == 2
        assert len(runner.pools) == 1 and runner.engine.cache.nbytes <= budget


def test_a_pool_too_large_for_memory_is_refused_not_allocated(server, monkeypatch):
    import kvslim.server.models as models

    httpx.post(server.url + "/api/generate", json={"model": "tiny"})
    monkeypatch.setattr(models, "_available_memory", lambda device: 1000)
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x",
                                                       "options": {"kv_cache_type": "f32"}})
    assert r.status_code == 500 and "does not fit" in r.json()["error"]
    monkeypatch.undo()
    assert httpx.post(server.url + "/api/generate", json={
        "model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}}).status_code == 200


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(server, client):
    client.generate(model="tiny")
    engine = server.runner("tiny").engine
    real_step = engine.step

    def broken():  # one real step (admission, pages taken), then a failure
        engine.step = real_step
        real_step()
        raise RuntimeError("simulated kernel failure")

    engine.step = broken
    r = httpx.post(server.url + "/api/generate", timeout=30, json={
        "model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 2}})
    assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]
    engine.step = broken
    with pytest.raises(ollama.ResponseError, match="simulated"):  # the stream's last line
        list(client.generate(model="tiny", prompt="x", stream=True, options={"num_predict": 2}))
    wait_until(lambda: settled(server.url, "tiny"), what="pages back")
    assert client.generate(model="tiny", prompt="x", options={"num_predict": 2}).done


def _held_steps(server, num_predict: int):
    """The tiny model loaded and its steps held at a gate: (runner, its cancels so far,
    the gate, a non-streaming generate body)."""
    ollama.Client(host=server.url).generate(model="tiny")  # load
    runner = server.runner("tiny")
    body = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": num_predict}}
    return runner, runner.scheduler.counters["finished_cancel"], StepGate(runner), body


def test_client_leaving_before_a_whole_answer_cancels_it(server):
    runner, before, gate, body = _held_steps(server, 100)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, server.url + "/api/generate", json=body,
                                 timeout=httpx.Timeout(30, read=1.0))
            wait_until(lambda: runner.engine.waiting, what="the request in the engine")
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                answer.result()
        wait_until(lambda: runner.engine.waiting[0].cancelled, what="the request to be cancelled")
    finally:
        gate.open()
    wait_until(lambda: runner.scheduler.counters["finished_cancel"] == before + 1, what="cancel")
    wait_until(lambda: settled(server.url, "tiny"), what="pages back")


def test_client_leaving_while_queued_is_counted_and_dequeued(server):
    """A request whose client leaves before the scheduler takes it ends in the queue,
    counted as a cancel (as one that ran would be), and never reaches the engine."""
    runner, before, gate, body = _held_steps(server, 2)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, server.url + "/api/generate", json=body, timeout=60)
            wait_until(gate.held.is_set, what="the first request's step at the gate")
            leaving = pool.submit(httpx.post, server.url + "/api/generate", json=body,
                                  timeout=httpx.Timeout(30, read=1.0))
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while queued
                leaving.result()
            wait_until(lambda: runner.scheduler.counters["finished_cancel"] == before + 1,
                       what="the queued request counted as cancelled")
            assert runner.scheduler.waiting() == 1  # the running one only
            gate.open()
            assert running.result().status_code == 200
    finally:
        gate.open()
    wait_until(lambda: settled(server.url, "tiny"), what="pages back")
    assert runner.scheduler.counters["finished_cancel"] == before + 1
