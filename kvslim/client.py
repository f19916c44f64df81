"""A client of a running ``kvslim serve`` (its Ollama API), for ``kvslim run``, ``ps`` and ``stop``.

``Client.find()`` answers the server at ``KVSLIM_HOST`` / ``OLLAMA_HOST`` (default
127.0.0.1:11434) when it is a kvslim server (``GET /`` says "kvslim is running"), else
None: then ``kvslim run`` runs the model in-process. An Ollama server at that address is
not used, since it holds other models. ``KVSLIM_API_KEY`` is sent as a bearer token.

Only the standard library (``http.client``): streaming NDJSON is read line by line, and
closing the connection (Ctrl-C) cancels the request on the server.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Iterator, Mapping

from kvslim.settings import env_value, parse_host

__all__ = ["Client", "ServerError", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 1.0  # a server on loopback answers `GET /` in milliseconds
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # bound everywhere: dial loopback


class ServerError(RuntimeError):
    """An error answer of the server (its message and HTTP status), or a failed connection
    (status None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, host: str, port: int, api_key: str | None = None):
        self.host, self.port = _WILDCARDS.get(host, host), port
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Client":
        env = os.environ if env is None else env
        host, port = parse_host(env_value(env, "KVSLIM_HOST"))
        return cls(host, port, env.get("KVSLIM_API_KEY"))

    @classmethod
    def find(cls, env: Mapping[str, str] | None = None) -> "Client | None":
        """The kvslim server of the environment's address, if one answers there."""
        client = cls.from_env(env)
        return client if client.is_kvslim() else None

    def is_kvslim(self) -> bool:
        conn = self._connect(PROBE_TIMEOUT_S)
        try:
            conn.request("GET", "/", headers=self.headers)
            r = conn.getresponse()
            return r.status == 200 and r.read(64).startswith(b"kvslim")
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    # ---------------------------------------------------------------- requests

    def _connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _send(self, method: str, path: str, body: dict | None, timeout: float | None):
        conn = self._connect(timeout)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         headers=self.headers)
            r = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerError(f"kvslim server at {self.address}: {_reason(e)}") from None
        if r.status >= 400:
            text = r.read().decode(errors="replace")
            conn.close()
            raise ServerError(_error_text(text, r.status), r.status)
        return conn, r

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float | None = 60.0) -> dict:
        """One JSON answer."""
        conn, r = self._send(method, path, body, timeout)
        try:
            return json.loads(r.read() or b"{}")
        finally:
            conn.close()

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """NDJSON objects as they come; an ``error`` object raises ServerError. Closing
        the iterator (or a KeyboardInterrupt inside it) drops the connection, which the
        server takes as a cancel."""
        conn, r = self._send("POST", path, body, None)
        try:
            while True:
                try:
                    line = r.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ServerError(f"kvslim server at {self.address}: {_reason(e)}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                obj = json.loads(line)
                if obj.get("error"):
                    raise ServerError(obj["error"])
                yield obj
        finally:
            conn.close()

    # ---------------------------------------------------------------- Ollama's verbs

    def ps(self) -> list[dict]:
        return self.request("GET", "/api/ps")["models"]

    def show(self, model: str) -> dict:
        return self.request("POST", "/api/show", {"model": model})

    def has(self, model: str) -> bool:
        try:
            self.show(model)
            return True
        except ServerError as e:
            if e.status == 404:
                return False
            raise

    def pull(self, model: str) -> Iterator[dict]:
        return self.stream("/api/pull", {"model": model, "stream": True})

    def stop(self, model: str) -> None:
        """Unload ``model`` (keep_alive 0, as ``ollama stop``); an error if it is not loaded."""
        loaded = self.ps()
        names = {m["name"] for m in loaded} | {m["model"] for m in loaded}
        if model not in names and f"{model}:latest" not in names:
            raise ServerError(f"couldn't find model \"{model}\" to stop")
        self.request("POST", "/api/generate", {"model": model, "keep_alive": 0})


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _error_text(body: str, status: int) -> str:
    """The server's ``{"error": ...}`` message (Ollama and OpenAI shapes), else the body."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err or body.strip() or f"HTTP {status}")
