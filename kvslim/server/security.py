"""What a request must show before any handler runs: a local ``Host``, an allowed
``Origin``, the API key when one is set; and how much prompt text it may carry.

A local HTTP server is reachable from every web page the user opens: the browser sends
the page's requests (a "simple" POST needs no CORS preflight) and, after DNS rebinding
(the page's own name re-resolved to 127.0.0.1), reads the answers too. As Ollama does:

- ``Host`` must name this machine: an IP literal, ``localhost`` (or ``*.localhost``),
  the machine's hostname, or a name in ``KVSLIM_ALLOWED_HOSTS`` (``*``: any). A rebound
  name (``evil.example``) is refused; a browser that typed an IP has that IP as origin.
- ``Origin``, which browsers add to cross-site requests, must be a local page
  (``http(s)://localhost|127.0.0.1|[::1]|0.0.0.0`` on any port, ``app://``, ``file://``,
  ``tauri://``, ``vscode-webview://``) or match ``KVSLIM_ORIGINS`` / ``OLLAMA_ORIGINS``
  (comma-separated, ``*`` wildcards). Allowed origins get CORS headers.
- ``KVSLIM_API_KEY``: when set, every request but ``GET /`` needs
  ``Authorization: Bearer <key>`` (OpenAI clients send their ``api_key`` so).

Content-Type is not checked: it is no defence (a form post is a simple request) and
Ollama's documented ``curl -d '{...}'`` sends a form type.
"""
from __future__ import annotations

import contextvars
import functools
import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Guard", "GuardMiddleware", "current"]

LOCAL_ORIGINS = tuple(f"{scheme}://{host}{port}" for scheme in ("http", "https")
                      for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")
                      for port in ("", ":*")) + \
    ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
CHARS_PER_TOKEN = 32  # a generous bound: real text averages 3-5, long space runs 64
BODY_TIMEOUT_S = 30.0  # a body that has not fully arrived by then is a stalled upload


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (value or "").split(",") if x.strip())


def _positive(env: Mapping[str, str], name: str, kind=int):
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


@dataclass(frozen=True)
class Guard:
    """The server's request checks and limits (env ``KVSLIM_*``)."""

    allowed_hosts: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    api_key: str | None = None
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN x the request's num_ctx
    max_prompt_tokens: int | None = None  # None: the context rules alone (truncate or 400)
    body_timeout: float = BODY_TIMEOUT_S
    default_num_ctx: int = 4096

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_num_ctx: int | None = None) -> "Guard":
        origins = _split(env.get("OLLAMA_ORIGINS")) + _split(env.get("KVSLIM_ORIGINS"))
        return cls(
            allowed_hosts=tuple(h.lower() for h in _split(env.get("KVSLIM_ALLOWED_HOSTS"))),
            origins=origins, api_key=env.get("KVSLIM_API_KEY") or None,
            max_prompt_chars=_positive(env, "KVSLIM_MAX_PROMPT_CHARS"),
            max_prompt_tokens=_positive(env, "KVSLIM_MAX_PROMPT_TOKENS"),
            body_timeout=_positive(env, "KVSLIM_BODY_TIMEOUT", float) or BODY_TIMEOUT_S,
            default_num_ctx=default_num_ctx or cls.default_num_ctx)

    # ---------------------------------------------------------------- checks

    def host_allowed(self, host_header: str) -> bool:
        host = _hostname(host_header).lower()
        if "*" in self.allowed_hosts or host in self.allowed_hosts:
            return True
        try:
            ipaddress.ip_address(host)
            return True  # an IP literal: no name that a page's DNS could rebind
        except ValueError:
            pass
        return host in ("localhost", _machine_name()) or host.endswith(".localhost")

    def origin_allowed(self, origin: str) -> bool:
        return any(_wildcard(p).fullmatch(origin.lower()) for p in LOCAL_ORIGINS + self.origins)

    def key_ok(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    def prompt_chars_limit(self, num_ctx: int | None) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN * max(num_ctx or 0, self.default_num_ctx)


@functools.lru_cache(maxsize=256)
def _wildcard(pattern: str) -> re.Pattern:
    """An origin pattern where only ``*`` is special (``[::1]`` is literal, unlike fnmatch)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.lower().split("*")))


def _hostname(host_header: str) -> str:
    """The name of a Host header without its port: 'a:1' -> 'a', '[::1]:2' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _machine_name() -> str:
    return socket.gethostname().lower()


_CURRENT: contextvars.ContextVar["Guard"] = contextvars.ContextVar("kvslim_guard")


def current() -> "Guard":
    """The guard of the app serving this request (handlers run in its context)."""
    return _CURRENT.get(None) or Guard()


class GuardMiddleware:
    """ASGI middleware: 403 for a foreign Host or Origin, 401 without the API key; CORS
    headers (and preflight answers) for allowed origins."""

    def __init__(self, app, guard: Guard, error_response):
        self.app, self.guard, self.error = app, guard, error_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _CURRENT.set(self.guard)  # this request's task context only
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        refusal = self._refusal(scope, headers, origin)
        if refusal is not None:
            return await self.error(scope["path"], *refusal)(scope, receive, send)
        if origin is None:
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(origin, headers, send)
        await self.app(scope, receive, _with_cors(send, origin))

    def _refusal(self, scope, headers: dict, origin: str | None) -> tuple[int, str] | None:
        g = self.guard
        if not g.host_allowed(headers.get("host", "")):
            return 403, (f"host {headers.get('host', '')!r} is not allowed: add it to "
                         f"KVSLIM_ALLOWED_HOSTS to serve it")
        if origin is not None and not g.origin_allowed(origin):
            return 403, f"origin {origin!r} is not allowed: add it to KVSLIM_ORIGINS to serve it"
        preflight = scope["method"] == "OPTIONS" and origin is not None
        public = scope["path"] == "/" and scope["method"] in ("GET", "HEAD")
        if not (preflight or public or g.key_ok(headers.get("authorization"))):
            return 401, "missing or wrong API key: send 'Authorization: Bearer <KVSLIM_API_KEY>'"
        return None

    @staticmethod
    async def _preflight(origin: str, headers: dict, send) -> None:
        allow = [(b"access-control-allow-origin", origin.encode("latin-1")),
                 (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS, HEAD"),
                 (b"access-control-allow-headers",
                  headers.get("access-control-request-headers", "").encode("latin-1")),
                 (b"access-control-max-age", b"600"), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": 204, "headers": allow})
        await send({"type": "http.response.body", "body": b""})


def _with_cors(send, origin: str):
    async def cors_send(message):
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send(message)
    return cors_send
