"""A client leaving a stream (Ollama and OpenAI routes, one answer, n answers, several
prompts) cancels every engine job of it at once, with no engine step and no garbage
collection in between, and the pool's free pages come back to what they were before
the request. Real HTTP: httpx against uvicorn on loopback, the stream closed early."""
from __future__ import annotations

import asyncio
import contextlib
import gc

import httpx
import pytest
from starlette.requests import ClientDisconnect

from kvslim.server import common
from kvslim.server import openai as openai_routes
from kvslim.settings import ServerSettings

from test_server import StepGate, running_server, wait_until

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
MESSAGES = [{"role": "user", "content": "a long answer"}]

# (route, body, sequences the request runs)
CASES = [
    ("/api/generate", {"model": "tiny", "prompt": "a long answer", "options": {"num_predict": 80, **GREEDY}}, 1),
    ("/api/chat", {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 80, **GREEDY}}, 1),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 80, "stream": True}, 1),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 80, "stream": True,
                              "n": 3}, 3),
    ("/v1/completions", {"model": "tiny", "prompt": ["a long answer", "another answer"], "n": 2,
                         "max_tokens": 80, "stream": True}, 4),
    ("/v1/responses", {"model": "tiny", "input": "a long answer", "max_output_tokens": 80,
                       "stream": True}, 1),
]


@pytest.fixture(scope="module")
def server(tiny_path):
    # no prefix cache: a cancelled sequence keeps no page, so every page must come back
    settings = ServerSettings.from_env({}, num_parallel=4, prefix_cache=False)
    with running_server(settings, {"tiny": tiny_path}) as served:
        httpx.post(served.url + "/api/generate", json={"model": "tiny"}, timeout=60)  # load
        yield served


@pytest.mark.parametrize("route, body, n_seqs", CASES, ids=[
    "ollama-generate", "ollama-chat", "openai-chat", "openai-chat-n3", "openai-completions-2x2",
    "openai-responses"])
def test_leaving_a_stream_cancels_its_jobs_and_returns_the_pages(server, route, body, n_seqs):
    runner = server.runner("tiny")
    engine = runner.engine
    wait_until(lambda: not engine.has_work(), what="an idle engine")
    before = engine.cache.free_per_group()
    gate = StepGate(runner)
    gc.disable()  # the generators must be closed by the server, not finalized by the collector
    try:
        with httpx.stream("POST", server.url + route, json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            with gate.trickle():  # a step at a time until every answer has begun
                next(lines)
                wait_until(lambda: len(engine.running) == n_seqs and
                           all(s.n_generated for s in engine.running), what="every answer running")
            seqs = list(engine.running)
            assert engine.cache.free_per_group() != before  # they hold pages now
        # the client is gone; no step runs while the gate is shut
        wait_until(lambda: all(s.cancelled for s in seqs), timeout=10,
                   what="every sequence of the request cancelled")
    finally:
        gc.enable()
        gate.open()
    wait_until(lambda: engine.cache.free_per_group() == before and not engine.has_work(),
               what="the pages back")
    engine.cache.check()


# ---------------------------------------------------------------- the mechanism, without a server


class FakeJob:
    """A job whose outputs come from a queue and which records being left early (as
    ``Job.outputs`` cancels its ticket in its finally block)."""

    def __init__(self, n_outputs: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        for i in range(n_outputs):
            self.queue.put_nowait(f"output {i}")
        self.cancelled = False

    async def outputs(self):
        try:
            while True:
                yield await self.queue.get()
        finally:
            self.cancelled = True


def test_closing_a_merged_stream_between_reads_cancels_every_job():
    """The stream is closed while its generators wait at a yield (the client left while
    a chunk was being sent): each level closes the one below, so every job is left at
    once, even though the merged generator is still referenced (no finalization)."""
    async def scenario():
        jobs = [FakeJob(1), FakeJob(1), FakeJob(0)]
        merged = openai_routes._merged(jobs)
        items = common.with_keepalives(merged)
        first = await items.__anext__()
        assert first[1] == "output 0"
        await items.aclose()
        return [j.cancelled for j in jobs], merged

    cancelled, _ = asyncio.run(scenario())
    assert cancelled == [True, True, True]


def _asgi(disconnect_after: float | None, fail_send_at: int | None):
    """(scope, receive, send, sent) of an HTTP request on ASGI spec 2.4: ``receive``
    reports a disconnect after ``disconnect_after`` seconds (None: never); ``send`` raises
    OSError (as uvicorn does once the client is gone) on body message ``fail_send_at``."""
    sent = []

    async def receive():
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and len(sent) == fail_send_at:
            raise OSError("client gone")
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}
    return scope, receive, send, sent


@pytest.mark.parametrize("outputs, disconnect_after, fail_send_at", [(2, None, 2), (1, 0.05, None)],
                         ids=["send-fails", "disconnect-while-waiting"])
def test_job_stream_closes_its_body_when_the_client_leaves(outputs, disconnect_after, fail_send_at):
    """Whether the client's departure shows as a failed write or only as a disconnect
    message while the body waits for output (nothing written), the body is closed."""
    async def scenario():
        job = FakeJob(outputs)

        async def body():
            async for out in job.outputs():
                yield out.encode()

        scope, receive, send, sent = _asgi(disconnect_after, fail_send_at)
        response = common.JobStream(body())
        with contextlib.suppress(ClientDisconnect):
            await asyncio.wait_for(response(scope, receive, send), 5)
        return job.cancelled, sent, response

    cancelled, sent, _ = asyncio.run(scenario())
    assert cancelled and [m.get("body") for m in sent[1:]] == [b"output 0"]
