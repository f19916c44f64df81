"""kvslim on a local Ray cluster: two CPU replicas of SmolLM2 behind the Serve ingress
(slow: Ray and Serve take most of a minute to start here).

Requests spread, a prefix keeps its replica (and hits its prefix cache there), a killed
replica fails only its own stream and comes back, and greedy answers equal one server's.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from kvslim.gguf_loader import open_gguf  # noqa: E402
from kvslim.ray.app import build_app  # noqa: E402
from kvslim.ray.ingress import prompt_ids  # noqa: E402
from kvslim.ray.routing import HashRing, prefix_key  # noqa: E402
from kvslim.server.app import create_app  # noqa: E402
from kvslim.settings import ServerSettings  # noqa: E402
from kvslim.tokenizer import Tokenizer  # noqa: E402

from greedy import same_up_to_rounding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {"KVSLIM_KEEP_ALIVE": "-1"}
GREEDY = {"temperature": 0, "num_predict": 8}
TOPICS = ["the sea", "volcanoes", "old maps", "bread", "bees", "comets", "glass", "rivers"]


def _settings() -> ServerSettings:
    return ServerSettings.from_env(ENV, num_ctx=1024, num_parallel=4)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _system(topic: str) -> str:  # well over one 64-token page
    return (f"You are a patient teacher who explains {topic} to curious children. Use short "
            f"sentences, one idea at a time, and give an everyday example for each idea. ") * 2


def _wait_ps(url: str, ok, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        ps = httpx.get(url + "/api/ps", timeout=10).json()
        if ok(ps) or time.monotonic() > deadline:
            return ps
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(smollm2_gguf):
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = _port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_settings(), replicas=2), name="kvslim", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        ps = _wait_ps(url, lambda ps: len(ps["replicas"]) == 2)
        assert len(ps["replicas"]) == 2, ps
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return Tokenizer.from_gguf(open_gguf(smollm2_gguf))


def _owned(url: str, tokenizer) -> dict[str, list[str]]:
    """Topics by the replica their system prompt's first page hashes to (the router's ring),
    at least two for each replica: the replicas' ids are random, so the 8 named topics can
    all fall to one of them (CI met it once); more topics are drawn until each owns two."""
    ids = [r["replica"] for r in httpx.get(url + "/api/ps").json()["replicas"]]
    ring, out = HashRing(ids), {i: [] for i in ids}
    for t in TOPICS + [f"subject number {i}" for i in range(64)]:
        if all(len(v) >= 2 for v in out.values()):
            break
        msgs = [{"role": "system", "content": _system(t)}, {"role": "user", "content": "Hi"}]
        out[ring.owner(prefix_key(prompt_ids("/api/chat", {"messages": msgs}, tokenizer), 64))].append(t)
    return out


def _chat(url: str, topic: str, question: str, **extra) -> httpx.Response:
    body = {"model": "smollm2", "stream": False, "options": GREEDY,
            "messages": [{"role": "system", "content": _system(topic)},
                         {"role": "user", "content": question}]} | extra
    return httpx.post(url + "/api/chat", json=body, timeout=300)


def test_greedy_answers_equal_one_servers_and_requests_spread(cluster):
    """The replicas answer as one server does, up to rounding: a replica is a process of
    its own (Ray gives it one OpenMP thread), and its sums may round differently, so a
    near-tie may break the other way (``greedy.same_up_to_rounding``)."""
    prompts = ["Why is the sky blue?", "Name three fruits.", "What is 2 + 2?", "Say hello."]

    async def over(client):
        async def one(p):
            r = await client.post("/api/chat", json={
                "model": "smollm2", "stream": False, "options": GREEDY, "logprobs": True,
                "top_logprobs": 2, "messages": [{"role": "user", "content": p}]})
            assert r.status_code == 200, r.text
            return r.json(), r.headers.get("x-kvslim-replica")
        return await asyncio.gather(*(one(p) for p in prompts))

    async def main():
        async with httpx.AsyncClient(base_url=cluster, timeout=300) as c:
            cluster_out = await over(c)
        app = create_app(_settings())
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://localhost", timeout=300) as c:
                single = await over(c)
        finally:
            app.state.registry.close()
        return cluster_out, single

    cluster_out, single = asyncio.run(main())
    for (a, _), (b, _) in zip(cluster_out, single):
        assert same_up_to_rounding(a, b), (a, b)
    assert all(b["message"]["content"] for b, _ in single)
    # short prompts (no whole page, no key) go to the least loaded: both replicas answer
    assert len({r for _, r in cluster_out}) == 2


def test_same_prefix_lands_on_one_replica_and_hits_its_cache(cluster, tokenizer):
    owned = _owned(cluster, tokenizer)
    assert all(owned.values()), owned  # each of the two replicas owns some topics
    before = {m["replica"]: m["requests"].get("prompt_cache_hits", 0)
              for m in httpx.get(cluster + "/api/ps").json()["models"]}
    hits = 0
    for rid, topics in owned.items():
        for q in ("What is it?", "Tell me more.", "Why?"):
            r = _chat(cluster, topics[0], q)
            assert r.status_code == 200, r.text
            assert r.headers["x-kvslim-replica"] == rid  # the prefix's replica, every time
            hits += r.json()["prompt_cache_count"] > 0
    assert hits >= 4  # every repeat of a system prompt (the first may meet a cold cache)
    ps = _wait_ps(cluster, lambda ps: sum(m["requests"].get("prompt_cache_hits", 0)
                                          for m in ps["models"]) - sum(before.values()) >= hits)
    counted = {m["replica"]: m["requests"].get("prompt_cache_hits", 0) - before.get(m["replica"], 0)
               for m in ps["models"]}
    assert sum(counted.values()) >= hits and all(counted.get(r, 0) >= 2 for r in owned), counted


def _stream(url: str, topic: str, lines: list, started: threading.Event) -> None:
    body = {"model": "smollm2", "options": {"temperature": 0, "num_predict": 96},
            "messages": [{"role": "system", "content": _system(topic)},
                         {"role": "user", "content": "Tell me a long story."}]}
    try:
        with httpx.stream("POST", url + "/api/chat", json=body, timeout=120) as r:
            lines.append(("replica", r.headers.get("x-kvslim-replica")))
            for line in r.iter_lines():
                lines.append(json.loads(line))
                if len(lines) > 3:
                    started.set()
    except Exception as e:  # noqa: BLE001 - recorded for the test to see
        lines.append(("exception", repr(e)))
    finally:
        started.set()


def test_a_killed_replica_fails_only_its_own_stream_and_comes_back(cluster, tokenizer):
    owned = _owned(cluster, tokenizer)
    pids = {r["replica"]: r["pid"] for r in httpx.get(cluster + "/api/ps").json()["replicas"]}
    victim, other = sorted(owned)
    out = {victim: [], other: []}
    events = {victim: threading.Event(), other: threading.Event()}
    threads = [threading.Thread(target=_stream, args=(cluster, owned[r][0], out[r], events[r]))
               for r in (victim, other)]
    for t in threads:
        t.start()
    for e in events.values():
        assert e.wait(120)
    os.kill(pids[victim], signal.SIGKILL)
    for t in threads:
        t.join(120)
        assert not t.is_alive()  # never a hang
    dead, alive = out[victim], out[other]
    assert dead[0] == ("replica", victim) and alive[0] == ("replica", other)
    assert "error" in dead[-1] and not dead[-1].get("done"), dead[-3:]
    assert alive[-1].get("done") is True and alive[-1]["eval_count"] == 96, alive[-3:]
    # Serve replaces the dead replica: two replicas again, one of them new
    ps = _wait_ps(cluster, lambda ps: len(ps["replicas"]) == 2 and victim not in
                  {r["replica"] for r in ps["replicas"]})
    assert victim not in {r["replica"] for r in ps["replicas"]} and len(ps["replicas"]) == 2, ps
    r = _chat(cluster, owned[victim][0], "Still there?")
    assert r.status_code == 200, r.text
