"""One kvslim replica: a whole ``kvslim serve`` app (registry, pools, schedulers) that the
ingress reaches through a Ray Serve handle instead of a socket.

``forward`` runs one HTTP request through the app in process (ASGI) and yields the
response start, then the body as it is produced, so streams stay streams. The ingress
has already checked Host, Origin and the API key; the replica's own guard keeps the
prompt limits only. ``record_routing_stats`` reports each loaded model's pool for the
router (``kvslim.ray.routing``) and the entries of ``/api/ps``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path
from typing import AsyncIterator

from kvslim.server.app import create_app
from kvslim.server.ollama import ps_entry
from kvslim.server.security import Guard
from kvslim.settings import ServerSettings

__all__ = ["Replica", "call_asgi"]


async def call_asgi(app, method: str, path: str, query: str, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> AsyncIterator[dict | bytes]:
    """One request through an ASGI app: {"status", "headers"} first, then body chunks.

    Leaving the iteration early tells the app the client disconnected (a stream's job is
    cancelled and its pages return at the next step)."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 0), "state": {}}
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            get = asyncio.ensure_future(sent.get())
            await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():  # the app returned without finishing the response
                get.cancel()
                task.result()  # its exception, if it raised one
                return
            msg = get.result()
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"], "headers": list(msg.get("headers", []))}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                task.cancel()


def _replica_id() -> str:
    """Serve's id of this replica (its unique part), or the pid outside Serve."""
    if "ray.serve" not in sys.modules:  # not in a Serve replica: never import Ray for it
        return f"pid{os.getpid()}"
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests, tools)
        return f"pid{os.getpid()}"


class Replica:
    """A kvslim server with its own K/V pools, driven by the ingress (a Serve deployment
    class: ``kvslim.ray.app`` wraps it)."""

    def __init__(self, settings: ServerSettings, models: dict[str, Path] | None = None,
                 replica_id: str | None = None):
        guard = dataclasses.replace(Guard.from_env(settings.env, settings.num_ctx),
                                    allowed_hosts=("*",), origins=(), api_key=None)
        self.app = create_app(settings, models, guard)
        self.registry = self.app.state.registry
        self.id, self.pid, self.node = replica_id or _replica_id(), os.getpid(), socket.gethostname()
        self.started, self._reports = time.time(), 0
        self.ongoing = 0  # requests in hand (forward calls not finished)

    async def forward(self, method: str, path: str, query: str, headers: list, body: bytes,
                      route: dict | None = None) -> AsyncIterator[dict | bytes]:
        """The app's answer to one request (``route`` is for the router, unused here)."""
        self.ongoing += 1
        try:
            async for item in call_asgi(self.app, method, path, query,
                                        [(bytes(k), bytes(v)) for k, v in headers], body):
                if isinstance(item, dict):  # say which replica answered (logs, tests, clients)
                    item["headers"].append((b"x-kvslim-replica", self.id.encode()))
                yield item
        finally:
            self.ongoing -= 1

    def record_routing_stats(self) -> dict:
        """Each loaded model's pool (what the router needs) and its ``/api/ps`` entry."""
        self._reports += 1
        models, ps = {}, []
        for runner in self.registry.loaded():
            snap = runner.scheduler.snapshot
            models[runner.name] = {
                "pages_available": snap["pages_available"], "page_size": snap["page_size"],
                "num_ctx": runner.num_ctx, "waiting": runner.scheduler.waiting()}
            ps.append(ps_entry(self.registry, runner))
        return {"replica": self.id, "version": f"{self.id}/{self._reports}", "pid": self.pid,
                "ongoing": self.ongoing,
                "node": self.node, "started": self.started, "reported": time.time(),
                "models": models, "ps": ps}

    def close(self) -> None:
        self.registry.close()

    def __del__(self):
        self.close()
