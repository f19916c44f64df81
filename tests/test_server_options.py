"""Per-request options as Ollama treats them (issue 16): a request that sets nothing gets
the server's defaults whatever came before; num_ctx is a per-sequence limit in one pool."""
from __future__ import annotations

import concurrent.futures
import logging

import httpx
import ollama
import pytest

from kvslim.settings import ServerSettings

from test_server import StepGate, ps_model, running_server, settled, wait_until

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def server(tiny_path):
    with running_server(ServerSettings.from_env({}, num_parallel=2), {"tiny": tiny_path}) as served:
        yield served


def _long_prompt(n_words: int) -> str:
    return " ".join(f"word{i % 37}" for i in range(n_words))


def test_one_requests_num_ctx_never_cuts_a_later_prompt(server):
    """The reported defect: num_ctx 64 once, then a 200-token prompt was cut to fit 64."""
    client = ollama.Client(host=server.url)
    prompt = _long_prompt(60)
    full = client.generate(model="tiny", prompt=prompt, raw=True, options={"num_predict": 1})
    assert 150 < full.prompt_eval_count < 256  # the tiny model's context is 256
    small = client.generate(model="tiny", prompt=prompt, raw=True,
                            options={"num_predict": 1, "num_ctx": 64})
    assert small.prompt_eval_count < 64  # truncated to its own num_ctx
    again = client.generate(model="tiny", prompt=prompt, raw=True, options={"num_predict": 1})
    assert again.prompt_eval_count == full.prompt_eval_count
    assert server.runner("tiny").scheduler.counters["rebuilds"] == 0


def test_different_num_ctx_run_side_by_side(server):
    httpx.post(server.url + "/api/generate", json={"model": "tiny"})
    runner = server.runner("tiny")
    gate = StepGate(runner)

    def ask(num_ctx: int) -> httpx.Response:
        return httpx.post(server.url + "/api/generate", timeout=60, json={
            "model": "tiny", "prompt": "x", "stream": False,
            "options": GREEDY | {"num_predict": 4, "num_ctx": num_ctx}})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            a, b = pool.submit(ask, 32), pool.submit(ask, 200)
            wait_until(lambda: runner.scheduler.waiting() == 2, what="both queued")
            gate.allow(2)  # two steps admit both into the same pool (4 tokens each: still running)
            wait_until(lambda: len(runner.engine.running) == 2, what="both running")
            short, long = sorted(s.max_len for s in runner.engine.running)
            assert short <= 32 < long  # each sequence bounded by its own num_ctx
        finally:
            gate.open()
        assert [f.result().status_code for f in (a, b)] == [200, 200]
    assert runner.scheduler.counters["rebuilds"] == 0
    assert ps_model(server.url, "tiny")["context_length"] == 256  # the server's, unchanged


def test_num_ctx_above_the_models_maximum_is_clamped_with_a_warning(server, caplog):
    with caplog.at_level(logging.WARNING, logger="kvslim.server"):
        r = httpx.post(server.url + "/api/generate", timeout=60, json={
            "model": "tiny", "prompt": _long_prompt(60), "raw": True, "stream": False,
            "options": {"num_predict": 1, "num_ctx": 100000}})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] > 150
    assert any("num_ctx 100000" in m and "maximum 256" in m for m in caplog.messages)


def test_a_larger_num_ctx_waits_for_its_pages_or_is_a_400_if_it_never_fits(tiny_path):
    # pool: 2 x 64 tokens = 2 pages; num_ctx 128 takes both, 256 can never fit
    with running_server(ServerSettings.from_env({}, num_parallel=2, num_ctx=64),
                        {"tiny": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "tiny"})
        runner = served.runner("tiny")
        r = httpx.post(served.url + "/api/generate", timeout=60, json={
            "model": "tiny", "prompt": "x", "stream": False, "options": {"num_ctx": 256}})
        assert r.status_code == 400 and "can never fit" in r.json()["error"]
        gate = StepGate(runner)

        def ask(options: dict) -> httpx.Response:
            return httpx.post(served.url + "/api/generate", timeout=60, json={
                "model": "tiny", "prompt": "x", "stream": False, "options": GREEDY | options})

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                big = pool.submit(ask, {"num_ctx": 128, "num_predict": 100})
                wait_until(lambda: runner.engine.waiting, what="the big request in the engine")
                gate.allow(1)
                wait_until(lambda: runner.engine.running, what="the big request running")
                small = pool.submit(ask, {"num_predict": 2})
                wait_until(lambda: runner.scheduler.waiting() == 1, what="the small one queued")
                gate.allow(3)  # it joins the engine, which has no pages for it yet
                wait_until(lambda: runner.engine.waiting, what="the small one waiting for pages")
                assert len(runner.engine.running) == 1
            finally:
                gate.open()
            assert [f.result().status_code for f in (big, small)] == [200, 200]
        wait_until(lambda: settled(served.url, "tiny"), what="pages back")


def _generate(url: str, options: dict) -> httpx.Response:
    return httpx.post(url + "/api/generate", timeout=60, json={
        "model": "tiny", "prompt": "x", "stream": False, "options": options})


def test_number_options_accept_integral_floats_as_ollama_does(server):
    as_ints = _generate(server.url, {"num_predict": 8, "num_ctx": 200, "seed": 3, "top_k": 5,
                                     "temperature": 1})
    as_floats = _generate(server.url, {"num_predict": 8.0, "num_ctx": 200.0, "seed": 3.0,
                                       "top_k": 5.0, "temperature": 1})
    assert as_ints.status_code == as_floats.status_code == 200
    assert as_floats.json()["eval_count"] == 8
    assert as_floats.json()["response"] == as_ints.json()["response"]  # same seed, same text


@pytest.mark.parametrize("options, field", [
    ({"num_predict": 8.5}, "options.num_predict"), ({"num_ctx": "x"}, "options.num_ctx"),
    ({"seed": 3.25}, "options.seed"), ({"top_k": True}, "options.top_k"),
])
def test_number_options_refuse_real_type_errors_naming_the_field(server, options, field):
    r = _generate(server.url, options)
    assert r.status_code == 400 and r.json()["error"].startswith(field)


# ---------------------------------------------------------------- HTTP conventions


def test_an_unknown_route_is_a_json_404_naming_it(server):
    r = httpx.post(server.url + "/api/nothing", json={})
    assert r.status_code == 404 and "POST /api/nothing" in r.json()["error"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "GET /v1/nothing" in r.json()["error"]["message"]


def test_known_but_unsupported_routes_are_501_naming_them(server):
    client = ollama.Client(host=server.url)
    calls = [(lambda: client.push("tiny"), "/api/push")]
    for call, route in calls:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 501 and route in str(e.value), route
    r = httpx.post(server.url + "/api/blobs/sha256-00", content=b"x")
    assert r.status_code == 501 and "/api/blobs/{digest}" in r.json()["error"]
    assert httpx.head(server.url + "/api/blobs/sha256-00").status_code == 501
    r = httpx.post(server.url + "/api/push", json={"model": "tiny"})
    assert r.status_code == 501 and "/api/push" in r.json()["error"]


def test_cors_preflight_for_a_local_page_and_ollama_origins(tiny_path):
    env = {"OLLAMA_ORIGINS": "https://app.example"}
    with running_server(ServerSettings.from_env(env), {"tiny": tiny_path}) as served:
        for origin in ("http://localhost:3000", "https://app.example"):
            for path in ("/api/chat", "/v1/chat/completions"):
                r = httpx.options(served.url + path, headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type, authorization"})
                assert r.status_code == 204 and r.headers["access-control-allow-origin"] == origin
                assert "POST" in r.headers["access-control-allow-methods"]
            r = httpx.get(served.url + "/api/version", headers={"Origin": origin})
            assert r.headers["access-control-allow-origin"] == origin
        r = httpx.options(served.url + "/api/chat", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------- keep_alive


def _loaded(url: str) -> list[str]:
    return [m["model"] for m in httpx.get(url + "/api/ps").json()["models"]]


def test_keep_alive_durations_set_the_expiry_and_idle_models_unload(server):
    import datetime as dt
    import time

    client = ollama.Client(host=server.url)
    client.generate(model="tiny", prompt="x", options={"num_predict": 1})
    expires = client.ps().models[0].expires_at  # the server's default: 5m as Ollama
    assert 290 < (expires - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 300
    client.generate(model="tiny", prompt="x", options={"num_predict": 1}, keep_alive=-1)
    assert client.ps().models[0].expires_at.year > 2300  # forever
    client.generate(model="tiny", prompt="x", options={"num_predict": 1}, keep_alive="1h30m")
    left = (client.ps().models[0].expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 5390 < left <= 5400
    t0 = time.monotonic()
    client.chat(model="tiny", messages=[{"role": "user", "content": "x"}],
                options={"num_predict": 1}, keep_alive="1.5s")
    assert _loaded(server.url) == ["tiny:latest"]
    wait_until(lambda: not _loaded(server.url), timeout=10, what="the idle model unloaded")
    assert time.monotonic() - t0 >= 1.5
    client.generate(model="tiny", prompt="x", options={"num_predict": 1}, keep_alive=0)
    wait_until(lambda: not _loaded(server.url), timeout=5, what="keep_alive 0 unloads after the answer")
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x", "keep_alive": "soon"})
    assert r.status_code == 400 and "keep_alive must be" in r.json()["error"]


def test_ollama_keep_alive_from_the_environment(tiny_path):
    with running_server(ServerSettings.from_env({"OLLAMA_KEEP_ALIVE": "1s"}),
                        {"tiny": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "tiny"})
        assert _loaded(served.url) == ["tiny:latest"]
        wait_until(lambda: not _loaded(served.url), timeout=10, what="unloaded after 1s idle")


# ---------------------------------------------------------------- stream keep-alives


@pytest.fixture
def quick_keepalives(monkeypatch):
    import kvslim.server.common as common

    monkeypatch.setattr(common, "STREAM_KEEPALIVE_S", 0.1)


def _held_stream(server, read):
    """Run ``read()`` (a streaming request) while the engine's steps are held for a while
    (a long prefill, as the client sees it), then let them go."""
    import time

    runner = server.runner("tiny")
    gate = StepGate(runner)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            answer = pool.submit(read)
            time.sleep(0.6)  # several keep-alive intervals with no step
        finally:
            gate.open()
        return answer.result(timeout=60)


def test_ndjson_streams_send_empty_pieces_while_waiting(server, quick_keepalives):
    client = ollama.Client(host=server.url)
    client.generate(model="tiny")
    body = {"model": "tiny", "prompt": "x", "options": GREEDY | {"num_predict": 4}}
    solo = client.generate(**body).response
    pieces = _held_stream(server, lambda: list(client.generate(stream=True, **body)))
    assert [p.response for p in pieces[:2]] == ["", ""] and not pieces[0].done  # keep-alives
    assert "".join(p.response for p in pieces) == solo and pieces[-1].done
    chat = _held_stream(server, lambda: list(client.chat(
        model="tiny", messages=[{"role": "user", "content": "x"}], stream=True,
        options=GREEDY | {"num_predict": 2})))
    assert chat[0].message.content == "" and chat[0].message.role == "assistant" and chat[-1].done


def test_sse_streams_send_comments_while_waiting(server, quick_keepalives):
    import openai

    httpx.post(server.url + "/api/generate", json={"model": "tiny"})
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 0, "stream": True}

    def raw() -> list[str]:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            return list(r.iter_lines())

    lines = _held_stream(server, raw)
    assert lines.count(": keep-alive") >= 2 and lines[-2] == "data: [DONE]"
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chunks = _held_stream(server, lambda: list(oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
        temperature=0, stream=True)))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_an_idle_model_makes_room_for_another_but_a_claimed_one_does_not(tiny_path):
    with running_server(ServerSettings.from_env({"OLLAMA_MAX_LOADED_MODELS": "1"}),
                        {"a": tiny_path, "b": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "a"})
        httpx.post(served.url + "/api/generate", json={"model": "b"})
        assert _loaded(served.url) == ["b:latest"]
        served.runner("b").claim(None)  # a request between its lookup and its submit
        r = httpx.post(served.url + "/api/generate", json={"model": "a"})
        assert r.status_code == 503 and "KVSLIM_MAX_LOADED_MODELS=1" in r.json()["error"]
        served.runner("b").release()
        httpx.post(served.url + "/api/generate", json={"model": "a"})
        assert _loaded(served.url) == ["a:latest"]
