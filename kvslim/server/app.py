"""The FastAPI application: Ollama and OpenAI routes over one registry of loaded models.

Errors are answered in the shape the client's API expects: ``{"error": "..."}`` under
/api (Ollama), ``{"error": {"message", "type", ...}}`` under /v1 (OpenAI). Bodies larger
than ``ServerSettings.max_body`` get 413 before any handler reads them, a body that
stalls 408; ``security.GuardMiddleware`` checks Host, Origin and the API key before that.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvslim.server.common import APIError, status_of
from kvslim.server.models import Registry
from kvslim.server.ollama import router as ollama_router
from kvslim.server.openai import error_body, router as openai_router
from kvslim.server.security import Guard, GuardMiddleware
from kvslim.settings import ServerSettings

log = logging.getLogger("kvslim.server")

RETRY_AFTER_S = 1  # a waiting slot frees as soon as one sequence finishes

__all__ = ["create_app"]


def error_response(path: str, status: int, message: str, code: str | None = None) -> JSONResponse:
    """The error body of the API that ``path`` belongs to."""
    body = error_body(status, message, code) if path.startswith("/v1") else {"error": message}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, e: Exception) -> JSONResponse:
    status = status_of(e)
    if status >= 500 and status != 503:
        log.error("%s %s failed: %s", request.method, request.url.path, e)
    code = "model_not_found" if status == 404 and not isinstance(e, HTTPException) else \
        getattr(e, "code", None)
    return error_response(request.url.path, status, str(e) or type(e).__name__, code)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    path = request.url.path
    message = f"404 page not found: no route {request.method} {path}" if e.status_code == 404 \
        else str(e.detail)
    return error_response(path, e.status_code, message)


# Ollama and OpenAI routes kvslim does not serve (yet): a 501 that names them tells a
# client what is missing, where a 404 looks like a wrong address. Registered after the
# real routes, so a route that gets implemented takes over from its entry here.
UNSUPPORTED = {
    "/api/push": ["POST"], "/api/blobs/{digest}": ["HEAD", "POST"],
}


async def _unsupported(request: Request) -> JSONResponse:
    route = request.scope["route"].path
    return error_response(request.url.path, 501, f"{request.method} {route} is not supported by "
                                                  f"kvslim (README: Server)", "not_implemented")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, declared or streamed; 408 for
    one that has not arrived within ``timeout`` seconds."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        body, more, size = [], True, 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while more:  # buffer the body (at most limit + one chunk), then replay it
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:  # a stalled upload (slowloris) must not hold a slot
                log.info("%s %s: request body not received within %g s", scope["method"],
                         scope["path"], self.timeout)
                response = error_response(scope["path"], 408, f"the request body did not arrive "
                                                              f"within {self.timeout:g} s")
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":  # an aborted upload: nobody to answer
                log.info("%s %s: client disconnected during the upload", scope["method"], scope["path"])
                return None
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope, receive, send):
        response = error_response(scope["path"], 413, f"request body too large: the limit is "
                                                       f"{self.limit:,} bytes (KVSLIM_MAX_BODY)")
        await response(scope, receive, send)


def _replay(chunks: list[bytes], receive):
    """A receive() that gives the buffered body as one message, then the real receive."""
    queue = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay():
        return queue.pop(0) if queue else await receive()
    return replay


def create_app(settings: ServerSettings | None = None, models: dict[str, Path] | None = None,
               guard: Guard | None = None) -> FastAPI:
    """The server app. ``models`` names extra .gguf files to serve besides the store's;
    ``guard``: the request checks (default from the settings' environment)."""
    settings = settings or ServerSettings.from_env()
    guard = guard or Guard.from_env(settings.env, settings.num_ctx)
    reg = Registry(settings, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        reg.close()

    app = FastAPI(title="kvslim", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.registry, app.state.settings, app.state.guard = reg, settings, guard
    app.include_router(ollama_router)
    app.include_router(openai_router)
    for path, methods in UNSUPPORTED.items():
        app.add_api_route(path, _unsupported, methods=methods, include_in_schema=False)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _api_error)
    for kind in (APIError, LookupError, ValueError, MemoryError, RuntimeError):
        app.add_exception_handler(kind, _api_error)
    app.add_middleware(BodyLimit, limit=settings.max_body, timeout=guard.body_timeout)
    app.add_middleware(GuardMiddleware, guard=guard, error_response=error_response)  # outermost
    return app
