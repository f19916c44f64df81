"""kvslim.ray without Ray: the hash ring, routing decisions, the replica's in-process ASGI
call and the ingress (over in-process replicas of a tiny model, and over replicas that
fail). The Ray cluster itself is tested in tests/test_ray_real.py (slow)."""
from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from kvslim.chat import max_length
from kvslim.ray.ingress import Router, ingress_app, prompt_ids
from kvslim.ray.replica import Replica, call_asgi
from kvslim.ray.routing import HashRing, LoadBook, ReplicaLoad, RouteInfo, prefix_key, rank
from kvslim.server.models import Runner
from kvslim.server.ollama import _generate_ids
from kvslim.server.schemas import GenerateRequest
from kvslim.settings import ServerSettings

PAGE = 64


# ---------------------------------------------------------------- keys and the ring


def test_prefix_key_is_the_first_pages_alone():
    rng = random.Random(0)
    head = [rng.randrange(50_000) for _ in range(PAGE)]
    a, b = head + [1, 2, 3], head + [rng.randrange(50_000) for _ in range(200)]
    assert prefix_key(head[:-1], PAGE) is None  # no whole page: nothing to share
    assert prefix_key(a, PAGE) == prefix_key(b, PAGE) == prefix_key(head, PAGE)
    other = [head[0] + 1] + head[1:]
    assert prefix_key(other, PAGE) != prefix_key(head, PAGE)
    # two pages: the second page counts, and a one-page prompt keys its one page
    assert prefix_key(b, PAGE, pages=2) != prefix_key(head + [7] * PAGE, PAGE, pages=2)
    assert prefix_key(a, PAGE, pages=2) == prefix_key(head, PAGE)


def test_prefix_key_is_the_same_in_another_process():
    """Every router process must map a prefix to the same replica (no per-process salt)."""
    ids = list(range(1000, 1000 + 2 * PAGE))
    code = ("import sys; sys.path.insert(0, %r); from kvslim.ray.routing import prefix_key, HashRing;"
            "print(prefix_key(%r, 64), HashRing(['a', 'b', 'c']).order(12345))"
            % (str(Path(__file__).resolve().parents[1]), ids))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(" ", 1) == [str(prefix_key(ids, PAGE)),
                                        str(HashRing(["a", "b", "c"]).order(12345)) + "\n"]


def test_ring_orders_every_node_once_and_adding_one_moves_few_keys():
    rng = random.Random(1)
    keys = [rng.getrandbits(64) for _ in range(8_000)]
    ring = HashRing([f"r{i}" for i in range(4)])
    for k in keys[:200]:
        order = ring.order(k)
        assert sorted(order) == sorted(ring.nodes) and order[0] == ring.owner(k)
    before = {k: ring.owner(k) for k in keys}
    ring.add("r4")
    moved = [k for k in keys if ring.owner(k) != before[k]]
    assert all(ring.owner(k) == "r4" for k in moved)  # keys only move to the new node
    assert 0.10 < len(moved) / len(keys) < 0.32  # about 1/5; a modulo hash would move 4/5
    share = {n: sum(ring.owner(k) == n for k in keys) / len(keys) for n in ring.nodes}
    assert max(share.values()) < 0.35 and min(share.values()) > 0.08
    ring.remove("r4")
    assert all(ring.owner(k) == before[k] for k in keys)  # removing restores the owners
    assert HashRing().order(5) == [] and HashRing().owner(5) is None


# ---------------------------------------------------------------- routing decisions


def _book(**loads) -> LoadBook:
    book = LoadBook()
    for rid, (avail, waiting) in loads.items():
        book.update(rid, 1, {"m": {"pages_available": avail, "page_size": PAGE, "num_ctx": 1024,
                                   "waiting": waiting}})
    return book


def test_pages_needed_is_the_engines_reservation():
    rng = random.Random(2)
    load = ReplicaLoad(100, PAGE, 2048)
    for _ in range(500):
        n_prompt, num_ctx = rng.randrange(1, 3000), rng.choice([None, 100, 512, 4096])
        max_tokens = rng.choice([None, 1, 16, 700])
        info = RouteInfo("m", None, n_prompt, max_tokens, num_ctx)
        want = -(-max_length(n_prompt, num_ctx or 2048, max_tokens) // PAGE)
        assert load.pages_needed(info) == want, (n_prompt, num_ctx, max_tokens)


def test_rank_follows_the_ring_and_skips_replicas_that_cannot_admit():
    ring = HashRing(["a", "b", "c"])
    key = next(k for k in range(10_000) if ring.order(k) == ["a", "b", "c"])
    info = RouteInfo("m", key, n_prompt=100, max_tokens=100)  # 4 pages
    assert rank(["a", "b", "c"], info, _book(a=(10, 0), b=(10, 0), c=(10, 0)), ring) == ["a", "b", "c"]
    # a's pool is short of pages, b's waiting requests will take its pages: c takes it
    assert rank(["a", "b", "c"], info, _book(a=(3, 0), b=(10, 2), c=(10, 0)), ring) == ["c", "a", "b"]
    # one request waiting where pages are plenty (a queue entry between steps): a keeps it
    assert rank(["a", "b", "c"], info, _book(a=(8, 1), b=(10, 0), c=(10, 0)), ring)[0] == "a"
    # none can admit: it waits at its own replica (then 503 there, as one server)
    assert rank(["a", "b", "c"], info, _book(a=(1, 0), b=(1, 0), c=(1, 0)), ring)[0] == "a"
    # no report yet (or the model is not loaded there): as far as anyone knows it can
    assert rank(["a", "b", "c"], info, _book(b=(10, 0)), ring) == ["a", "b", "c"]
    assert rank(["a", "b"], info, _book(a=(10, 0), b=(10, 0)), ring) == ["a", "b"]  # c gone


def test_rank_without_key_or_affinity_is_least_loaded_first():
    book = LoadBook()
    for rid, running, avail in (("a", 3, 50), ("b", 1, 20), ("c", 1, 40)):
        book.update(rid, 1, {"m": {"pages_available": avail, "page_size": PAGE, "num_ctx": 256,
                                   "waiting": 0}}, ongoing=running)
    info = RouteInfo("m", key=None, n_prompt=10, max_tokens=10)
    assert rank(["a", "b", "c"], info, book, HashRing(["a", "b", "c"])) == ["c", "b", "a"]
    keyed = RouteInfo("m", key=7, n_prompt=10, max_tokens=10)
    assert rank(["a", "b", "c"], keyed, book, None) == ["c", "b", "a"]  # affinity off
    book.routed("c", info)  # what was sent since the reports counts: a burst spreads
    assert rank(["a", "b", "c"], info, book, None) == ["b", "c", "a"]
    fresh = LoadBook()  # nothing reported yet (the model loads on first use): round the replicas
    for want in ("a", "b", "a"):
        got = rank(["a", "b"], info, fresh, None)[0]
        assert got == want
        fresh.routed(got, info)
    # a report before the model is loaded still counts the requests the replica holds
    fresh.update("a", 2, {}, ongoing=2)
    fresh.update("b", 2, {}, ongoing=0)
    assert rank(["a", "b"], info, fresh, None)[0] == "b"


def test_load_book_counts_what_was_routed_until_the_next_report():
    book = _book(a=(10, 0))
    info = RouteInfo("m", 1, n_prompt=100, max_tokens=100)  # 4 pages each
    book.routed("a", info)
    book.routed("a", info)
    assert book.load("a", "m").pages_available == 2
    assert not book.load("a", "m").can_admit(info)
    book.update("a", 1, {"m": {"pages_available": 10, "page_size": PAGE, "num_ctx": 1024}})
    assert book.load("a", "m").pages_available == 2  # the same report again: still counted
    book.update("a", 2, {"m": {"pages_available": 6, "page_size": PAGE, "num_ctx": 1024}})
    assert book.load("a", "m").pages_available == 6  # a new report includes them
    assert book.load("a", "other") is None and book.load("zz", "m") is None
    book.forget(["b"])
    assert book.load("a", "m") is None


# ---------------------------------------------------------------- the replica's ASGI call


def test_call_asgi_streams_and_tells_the_app_when_the_client_leaves():
    app, seen = FastAPI(), {}

    @app.post("/s")
    async def s():
        async def gen():
            try:
                for i in range(100):
                    yield f"{i}\n"
                    await asyncio.sleep(0.01)
            finally:
                seen["stopped"] = True
        return StreamingResponse(gen(), media_type="application/x-ndjson")

    async def main():
        got = []
        async for item in call_asgi(app, "POST", "/s", "", [], b"{}"):
            got.append(item)
            if len(got) == 4:
                break
        return got

    got = asyncio.run(main())
    assert got[0]["status"] == 200 and (b"content-type", b"application/x-ndjson") in got[0]["headers"]
    assert got[1:] == [b"0\n", b"1\n", b"2\n"]
    assert seen.get("stopped")  # the generator was closed: a job there would be cancelled


# ---------------------------------------------------------------- the ingress


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf(ctx=512)


@pytest.fixture(scope="module")
def settings():
    return ServerSettings.from_env({"KVSLIM_KEEP_ALIVE": "-1"}, num_ctx=256, num_parallel=2)


def test_ingress_prompt_ids_equal_the_replicas(tiny, settings):
    """The ingress keys a request by the ids the replica will evaluate."""
    runner = Runner("tiny", tiny, settings)
    try:
        tok = runner.tokenizer
        msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
        assert prompt_ids("/api/chat", {"messages": msgs}, tok) == runner.chat_ids(msgs)
        parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
        assert prompt_ids("/v1/chat/completions", {"messages": parts}, tok) == \
            runner.chat_ids([{"role": "user", "content": "Hi there"}])
        for body in ({"prompt": "Why?", "system": "Be brief."}, {"prompt": "Why?", "raw": True},
                     {"prompt": "And?", "context": [5, 6, 7]}):
            req = GenerateRequest.model_validate({"model": "tiny", **body})
            assert prompt_ids("/api/generate", body, tok) == _generate_ids(runner, req)
        assert prompt_ids("/v1/completions", {"prompt": "Once"}, tok) == runner.text_ids("Once")
        assert prompt_ids("/v1/completions", {"prompt": [3, 4]}, tok) == [3, 4]
    finally:
        runner.close()


class _Stream:
    """What a Serve handle's streaming call returns: an async iterator with cancel()."""

    def __init__(self, agen):
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self.agen.__aiter__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """A deployment handle over in-process replicas, routed as KvslimRouter routes."""

    def __init__(self, replicas: dict[str, object]):
        self.replicas, self.ring, self.book = replicas, HashRing(replicas), LoadBook()
        self.routes: list[tuple[str, dict | None]] = []
        self.forward = self

    def options(self, stream: bool):
        assert stream
        return self

    def remote(self, *args, route=None):
        info = RouteInfo(**(route or {}))
        for rid, rep in self.replicas.items():
            if hasattr(rep, "record_routing_stats"):
                stats = rep.record_routing_stats()
                self.book.update(rid, stats["version"], stats["models"], stats["ongoing"])
        rid = rank(list(self.replicas), info, self.book, self.ring)[0]
        self.book.routed(rid, info)
        self.routes.append((rid, route))
        return _Stream(self.replicas[rid].forward(*args, route=route))

    async def reports(self):
        return [r.record_routing_stats() for r in self.replicas.values()]


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")


def test_ingress_routes_same_prefix_to_one_replica_and_serves_both_apis(tiny, settings):
    reps = {r: Replica(settings, {"tiny": tiny}, replica_id=r) for r in ("r0", "r1")}
    handle = FakeHandle(reps)
    app = ingress_app(handle, Router(settings, {"tiny": tiny}), settings, cluster=handle.reports)
    system = "You answer questions about the sea. " * 3  # more than one page of tokens
    opts = {"temperature": 0, "num_predict": 4}

    async def main():
        async with _client(app) as c:
            outs = []
            for q in ("What is salt?", "Why waves?", "How deep?"):
                r = await c.post("/api/chat", json={"model": "tiny", "stream": False, "options": opts,
                                                    "messages": [{"role": "system", "content": system},
                                                                 {"role": "user", "content": q}]})
                assert r.status_code == 200, r.text
                outs.append(r.json())
            r = await c.post("/v1/chat/completions", json={
                "model": "tiny", "stream": True, "max_tokens": 3, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            assert r.text.rstrip().endswith("data: [DONE]")
            ps = (await c.get("/api/ps")).json()
            bad = await c.post("/api/chat", json={"model": "tiny", "messages": "x"})
            missing = await c.post("/api/generate", json={"model": "nope", "prompt": "x"})
            foreign = await c.get("/api/tags", headers={"host": "evil.example"})
            return outs, ps, bad, missing, foreign

    try:
        outs, ps, bad, missing, foreign = asyncio.run(main())
    finally:
        for r in reps.values():
            r.close()
    chosen = {rid for rid, route in handle.routes if route and route["key"] is not None}
    assert len(chosen) == 1  # one system prompt, one replica
    assert [o["prompt_cache_count"] > 0 for o in outs] == [False, True, True]  # its prefix cache hits
    owner = chosen.pop()
    entry = next(m for m in ps["models"] if m["replica"] == owner)
    assert entry["requests"]["prompt_cache_hits"] >= 2 and {r["replica"] for r in ps["replicas"]} == {"r0", "r1"}
    assert bad.status_code == 400 and "messages" in bad.json()["error"]  # the replica's own checks
    assert missing.status_code == 404
    assert foreign.status_code == 403  # the ingress guards Host as kvslim serve does


class _Failing:
    """A replica that dies: before answering, or after its first piece."""

    def __init__(self, after_head: bool):
        self.after_head = after_head

    async def forward(self, method, path, query, headers, body, route=None):
        if self.after_head:
            kind = b"text/event-stream" if path.startswith("/v1") else b"application/x-ndjson"
            yield {"status": 200, "headers": [(b"content-type", kind)]}
            yield b'{"response": "partial", "done": false}\n' if kind != b"text/event-stream" \
                else b'data: {"choices": []}\n\n'
        raise RuntimeError("ActorDiedError: the actor died unexpectedly")


def test_a_replica_failure_ends_its_stream_with_an_error(settings, tiny):
    router = Router(settings, {"tiny": tiny})

    async def ask(replica, path, body):
        app = ingress_app(FakeHandle({"x": replica}), router, settings)
        async with _client(app) as c:
            return await c.post(path, json=body)

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    r = asyncio.run(ask(_Failing(True), "/api/chat", chat))
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.status_code == 200 and lines[0]["response"] == "partial"
    assert "replica serving this request failed" in lines[-1]["error"]
    r = asyncio.run(ask(_Failing(True), "/v1/chat/completions", chat | {"stream": True}))
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and "failed" in json.loads(events[-2][6:])["error"]["message"]
    r = asyncio.run(ask(_Failing(False), "/api/chat", chat))
    assert r.status_code == 503 and "failed" in r.json()["error"]
    r = asyncio.run(ask(_Failing(False), "/v1/models", None))
    assert r.status_code == 503 and "failed" in r.json()["error"]["message"]


# ---------------------------------------------------------------- kvslim serve --ray


@pytest.mark.parametrize("argv,want", [
    (["--ray"], {"replicas": 1, "autoscale": None, "address": None}),
    (["--ray", "--replicas", "3", "--num-parallel", "8"], {"replicas": 3, "autoscale": None, "address": None}),
    (["--ray", "--autoscale", "1:4", "--ray-address", "auto"], {"replicas": 1, "autoscale": (1, 4), "address": "auto"}),
])
def test_serve_ray_flags(monkeypatch, tiny, argv, want):
    import kvslim.ray
    from kvslim import cli

    seen = {}
    monkeypatch.setattr(kvslim.ray, "run", lambda settings, models, **kw: seen.update(
        settings=settings, models=models, **kw))
    assert cli.main(["serve", *argv, str(tiny)]) == 0
    assert {k: seen[k] for k in want} == want
    assert seen["models"] == {"tiny": Path(tiny).resolve()}  # absolute: replicas run elsewhere
    if "--num-parallel" in argv:
        assert seen["settings"].num_parallel == 8  # the flags reach every replica's settings


@pytest.mark.parametrize("argv,match", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray-address", "auto"], "--ray-address needs --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
])
def test_serve_ray_misuse_is_one_error_line(capsys, argv, match):
    from kvslim import cli

    assert cli.main(["serve", *argv]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("Error: ") and match in err[0]


@pytest.mark.parametrize("bad", ["3:1", "0:2", "2", "a:b"])
def test_autoscale_needs_min_max(capsys, bad):
    from kvslim import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--ray", "--autoscale", bad])
    assert "MIN:MAX" in capsys.readouterr().err
