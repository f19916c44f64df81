"""The ingress of a kvslim cluster: one HTTP front end for every replica.

It checks each request as ``kvslim serve`` does (Host, Origin, API key, body size), finds
the request's route (model, prefix key of its first prompt pages, the pages it may need)
and hands the raw request to a replica through the deployment handle, whose router
(``kvslim.ray.router``) picks the replica. The replica answers with the same Ollama and
OpenAI routes as one server, streams included. A replica that dies mid-stream ends that
stream with an error message in the stream's own format (NDJSON line or SSE event);
before the first byte it is a 503. ``/api/ps`` lists the models of every replica.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kvslim.cache import DEFAULT_PAGE_SIZE
from kvslim.chat import render_chat
from kvslim.gguf_loader import open_gguf
from kvslim.ray.routing import RouteInfo, prefix_key
from kvslim.server.app import BodyLimit, error_response
from kvslim.server.models import Registry
from kvslim.server.openai import error_body
from kvslim.server.security import Guard, GuardMiddleware
from kvslim.settings import ServerSettings
from kvslim.tokenizer import Tokenizer

log = logging.getLogger("kvslim.ray")

__all__ = ["prompt_ids", "Router", "ingress_app"]

GENERATION = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions")
STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
DROP_HEADERS = {b"origin", b"authorization", b"content-length"}  # the ingress answers these


def _text(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _messages(items) -> list[dict]:
    return [{"role": m.get("role", "user"), "content": _text(m.get("content"))}
            for m in items if isinstance(m, dict)]


def prompt_ids(path: str, data: dict, tok: Tokenizer) -> list[int]:
    """The prompt's token ids as the replica's handler renders them (the whole chat: a
    chat cut to fit num_ctx keeps its first messages, so its first pages are the same)."""
    encode = lambda text: tok.encode(text, add_special=True, parse_special=True)  # noqa: E731
    if path in ("/api/chat", "/v1/chat/completions"):
        return render_chat(tok, _messages(data.get("messages") or []))
    if path == "/v1/completions":
        p = data.get("prompt")
        p = p[0] if isinstance(p, list) and p and isinstance(p[0], str) else p
        return list(p) if isinstance(p, list) else encode(p or "")
    if data.get("raw"):  # /api/generate
        return encode(data.get("prompt") or "")
    turns = ([{"role": "system", "content": data["system"]}] if data.get("system") else []) + \
        [{"role": "user", "content": data.get("prompt") or ""}]
    ids, context = render_chat(tok, turns), data.get("context")
    if isinstance(context, list) and context:
        ids = list(context) + (ids[1:] if ids and ids[0] == tok.bos_id else ids)
    return ids


def _limits(path: str, data: dict) -> tuple[int | None, int | None]:
    """(max_tokens, num_ctx) a request asks for; None where it leaves them to the server."""
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    n = options.get("num_predict")
    if path.startswith("/v1"):
        n = data.get("max_completion_tokens") or data.get("max_tokens") or n
    ctx = options.get("num_ctx")
    ok = lambda v: int(v) if isinstance(v, (int, float)) and v >= 1 else None  # noqa: E731
    return ok(n), ok(ctx)


class Router:
    """Route information of requests: the model's tokenizer (loaded once per file) gives
    the prompt's first pages; no weights are read."""

    def __init__(self, settings: ServerSettings, models: dict[str, Path] | None,
                 affinity_pages: int = 1, page_size: int = DEFAULT_PAGE_SIZE):
        self.registry = Registry(settings, models)  # names to files only: it loads nothing here
        self.pages, self.page_size = affinity_pages, page_size  # pages 0: no key, load alone
        self._tokenizers: dict[Path, Tokenizer] = {}

    def tokenizer(self, model: str) -> tuple[str, Tokenizer]:
        name, path = self.registry.resolve(model)
        if path not in self._tokenizers:
            self._tokenizers[path] = Tokenizer.from_gguf(open_gguf(path))
        return name, self._tokenizers[path]

    def route(self, path: str, body: bytes) -> RouteInfo:
        """What the router needs of one request; an empty RouteInfo when the body is not a
        generation request the ingress can read (the replica answers it, errors included)."""
        if path not in GENERATION:
            return RouteInfo()
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or not isinstance(data.get("model"), str):
                return RouteInfo()
            name, tok = self.tokenizer(data["model"])
        except (ValueError, LookupError, OSError):
            return RouteInfo()
        max_tokens, num_ctx = _limits(path, data)
        try:
            ids = prompt_ids(path, data, tok)
        except Exception:  # noqa: BLE001 - a malformed body: the replica says what is wrong
            return RouteInfo(model=name, max_tokens=max_tokens, num_ctx=num_ctx)
        return RouteInfo(model=name, key=prefix_key(ids, self.page_size, self.pages),
                         n_prompt=len(ids), max_tokens=max_tokens, num_ctx=num_ctx)


def _stream_error(path: str, message: str) -> bytes:
    """The last message of a stream cut by a replica failure, in the stream's format."""
    if path.startswith("/v1"):
        return b"data: " + json.dumps(error_body(502, message)).encode() + b"\n\ndata: [DONE]\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


def _failure(e: BaseException) -> str:
    return f"the replica serving this request failed: {type(e).__name__}: {e}".split("\n")[0]


async def _relay(path: str, rest: AsyncIterator, cancel: Callable) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in rest:
            yield chunk
        finished = True
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        log.warning("%s: %s", path, _failure(e))
        finished = True
        yield _stream_error(path, _failure(e))
    finally:
        if not finished:  # the client left: the replica's stream is cancelled
            cancel()


def ingress_app(handle, router: Router, settings: ServerSettings, guard: Guard | None = None,
                cluster: Callable[[], Awaitable[list[dict]]] | None = None) -> FastAPI:
    """The ingress app. ``handle``: the replicas' deployment handle; ``cluster``: the
    replicas' last reports (``Replica.record_routing_stats``), for ``/api/ps``."""
    guard = guard or Guard.from_env(settings.env, settings.num_ctx)
    app = FastAPI(title="kvslim (Ray)", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/api/ps")
    async def ps():
        reports = sorted(await cluster() if cluster else [], key=lambda r: r.get("replica", ""))
        models = [e | {"replica": r["replica"], "node": r.get("node")}
                  for r in reports for e in r.get("ps", [])]
        replicas = [{k: r.get(k) for k in ("replica", "node", "pid", "started", "reported")} |
                    {"models": sorted(r.get("models", {}))} for r in reports]
        return {"models": models, "replicas": replicas}

    @app.api_route("/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
    async def forward(request: Request):
        path, body = request.url.path, await request.body()
        route = await run_in_threadpool(router.route, path, body)  # tokenizing: off the loop
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() not in DROP_HEADERS]
        gen = handle.options(stream=True).forward.remote(
            request.method, path, request.url.query, headers, body,
            route=route.__dict__ if route.model else None)
        it = gen.__aiter__()
        try:
            head = await it.__anext__()
        except Exception as e:  # noqa: BLE001 - no replica answered: nothing was sent yet
            log.warning("%s: %s", path, _failure(e))
            return error_response(path, 503, _failure(e))
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head["headers"]
               if k.lower() != b"content-length"]
        kind = dict((k.lower(), v) for k, v in out).get("content-type", "")
        if kind.startswith(STREAM_TYPES):
            resp = StreamingResponse(_relay(path, it, gen.cancel), status_code=head["status"])
        else:
            try:
                data = b"".join([chunk async for chunk in it])
            except asyncio.CancelledError:  # the client left: so does the replica's job
                gen.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - a whole answer that did not arrive
                log.warning("%s: %s", path, _failure(e))
                return error_response(path, 503, _failure(e))
            resp = Response(data, status_code=head["status"])
        for k, v in out:  # the replica's own headers (content type, Retry-After, ...)
            resp.headers.append(k, v)
        return resp

    app.add_middleware(BodyLimit, limit=settings.max_body, timeout=guard.body_timeout)
    app.add_middleware(GuardMiddleware, guard=guard, error_response=error_response)
    return app
