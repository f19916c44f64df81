"""Cache-aware routing between kvslim replicas: pure logic, no Ray.

A request goes to the replica that most likely holds its prefix in its K/V pool, unless
that replica cannot admit it now:

- **Affinity.** The key of a request is a hash of its first ``pages`` whole pages of
  prompt tokens (the pages the prefix cache shares). A consistent-hash ring maps keys to
  replicas, so a prefix keeps its replica while the others come and go, and adding one
  replica to N moves about 1/(N+1) of the keys.
- **Load.** A replica whose pool has fewer pages available (free and not promised to
  running sequences, plus those only the prefix cache holds) than the request may need,
  counting as much again for each request already waiting there, is skipped: the next
  replica on the ring takes it. When none can admit it, it goes to its
  ring replica anyway and waits in that replica's queue (then 503, as one server does).
- A prompt shorter than one page has no key (nothing to share): least loaded first.

The Serve router (``kvslim.ray.router``) feeds this module the replicas' reported pools
(``kvslim.ray.replica.Replica.record_routing_stats``) and the request's ``RouteInfo``.
"""
from __future__ import annotations

import bisect
import hashlib
import threading
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

__all__ = ["prefix_key", "HashRing", "RouteInfo", "ReplicaLoad", "LoadBook", "rank",
           "register_router", "routers"]

VNODES = 64  # points per replica on the ring: the keys each holds vary by about 1/sqrt(64)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_key(ids: Sequence[int], page_size: int, pages: int = 1) -> int | None:
    """A stable 64-bit hash of the first ``pages`` whole pages of ``ids`` (fewer when the
    prompt has fewer); None for a prompt shorter than one page, or for pages 0 (no affinity)."""
    n = min(pages, len(ids) // page_size) * page_size
    if n == 0:
        return None
    return _h64(b"".join(int(t).to_bytes(4, "little", signed=True) for t in ids[:n]))


class HashRing:
    """Consistent hashing of keys onto nodes (any hashable with a stable ``str``)."""

    def __init__(self, nodes: Iterable[Hashable] = (), vnodes: int = VNODES):
        self.vnodes = vnodes
        self._points: list[int] = []  # sorted
        self._owner: dict[int, Hashable] = {}
        self.nodes: set[Hashable] = set()
        for n in nodes:
            self.add(n)

    def add(self, node: Hashable) -> None:
        if node in self.nodes:
            return
        self.nodes.add(node)
        for i in range(self.vnodes):
            p = _h64(f"{node}#{i}".encode())
            if p not in self._owner:  # a 64-bit collision: the first owner keeps it
                self._owner[p] = node
                bisect.insort(self._points, p)

    def remove(self, node: Hashable) -> None:
        if node not in self.nodes:
            return
        self.nodes.discard(node)
        gone = {p for p, n in self._owner.items() if n == node}
        self._points = [p for p in self._points if p not in gone]
        for p in gone:
            del self._owner[p]

    def order(self, key: int) -> list[Hashable]:
        """Every node once, clockwise from ``key``: the first owns it, the rest are the
        fallbacks in order (the same for every router that knows the same nodes)."""
        out: list[Hashable] = []
        n = len(self._points)
        start = bisect.bisect_left(self._points, key)
        for i in range(n):
            node = self._owner[self._points[(start + i) % n]]
            if node not in out:
                out.append(node)
                if len(out) == len(self.nodes):
                    break
        return out

    def owner(self, key: int) -> Hashable | None:
        order = self.order(key)
        return order[0] if order else None


@dataclass(frozen=True)
class RouteInfo:
    """What the router knows of a request: its model, prefix key, prompt length and the
    limits that decide the pages it may need (None: the replica's defaults)."""

    model: str | None = None
    key: int | None = None
    n_prompt: int = 0
    max_tokens: int | None = None
    num_ctx: int | None = None


@dataclass(frozen=True)
class ReplicaLoad:
    """One model's pool on one replica, as last reported."""

    pages_available: int  # free, plus pages only the prefix cache holds (evictable)
    page_size: int
    num_ctx: int  # the replica's default per-request context
    waiting: int = 0  # requests there waiting for pages or a decode slot

    @classmethod
    def from_stats(cls, s: Mapping) -> "ReplicaLoad":
        return cls(s["pages_available"], s["page_size"], s["num_ctx"], s.get("waiting", 0))

    def pages_needed(self, info: RouteInfo) -> int:
        """Pages the engine reserves to admit it: prompt + num_predict, at most num_ctx."""
        ctx = info.num_ctx or self.num_ctx
        tokens = ctx if info.max_tokens is None else min(info.n_prompt + info.max_tokens, ctx)
        return -(-max(tokens, 1) // self.page_size)

    def can_admit(self, info: RouteInfo) -> bool:
        """Pages for it and for each request waiting there (taken to need as much: a queue
        entry between two steps is no reason to leave a prefix's replica, a queue that
        will use the pages is)."""
        return self.pages_available >= self.pages_needed(info) * (1 + self.waiting)


class LoadBook:
    """Each replica's last reported pools, less what was routed to it since the report
    (reports come every fraction of a second; a burst must not all see the same free pages)."""

    def __init__(self):
        self._reports: dict[Hashable, tuple[object, dict[str, ReplicaLoad], int]] = {}
        self._sent: dict[tuple[Hashable, str], int] = {}  # (replica, model) -> pages since report
        self._count: dict[Hashable, int] = {}  # replica -> requests since its report

    def update(self, replica: Hashable, version: object, models: Mapping[str, Mapping],
               ongoing: int = 0) -> None:
        """A replica's report (``version`` changes with each one): its loaded models' pools
        and the requests it has in hand (``ongoing``, loading a model included)."""
        old = self._reports.get(replica)
        if old is not None and old[0] == version:
            return
        self._reports[replica] = (version, {m: ReplicaLoad.from_stats(s) for m, s in models.items()},
                                  ongoing)
        for k in [k for k in self._sent if k[0] == replica]:
            del self._sent[k]
        self._count.pop(replica, None)

    def forget(self, keep: Iterable[Hashable]) -> None:
        keep = set(keep)
        for r in [r for r in self._reports if r not in keep]:
            del self._reports[r]
        for k in [k for k in self._sent if k[0] not in keep]:
            del self._sent[k]
        for r in [r for r in self._count if r not in keep]:
            del self._count[r]

    def load(self, replica: Hashable, model: str | None) -> ReplicaLoad | None:
        """The pool ``model`` has on ``replica`` now; None when unknown (not loaded there, or
        no report yet: the replica can take it as far as anyone knows)."""
        report = self._reports.get(replica)
        load = report[1].get(model) if report and model else None
        if load is None:
            return None
        sent = self._sent.get((replica, model), 0)
        return load if sent == 0 else ReplicaLoad(load.pages_available - sent, load.page_size,
                                                  load.num_ctx, load.waiting)

    def busy(self, replica: Hashable, model: str | None) -> tuple[int, int]:
        """Sort key, least loaded first: requests there (reported, and routed since), then
        the most pages available."""
        report, load = self._reports.get(replica), self.load(replica, model)
        ongoing = (report[2] if report else 0) + self._count.get(replica, 0)
        return ongoing, (0 if load is None else -load.pages_available)

    def routed(self, replica: Hashable, info: RouteInfo) -> None:
        self._count[replica] = self._count.get(replica, 0) + 1
        load = self.load(replica, info.model)
        if load is not None:
            k = (replica, info.model)
            self._sent[k] = self._sent.get(k, 0) + load.pages_needed(info)


def rank(replicas: Sequence[Hashable], info: RouteInfo, book: LoadBook,
         ring: HashRing | None) -> list[Hashable]:
    """``replicas`` in the order to try: those that can admit the request first, each group
    in ring order from the request's key (``ring`` None or no key: least loaded first)."""
    loads = {r: book.load(r, info.model) for r in replicas}
    if ring is not None and info.key is not None:
        order = [r for r in ring.order(info.key) if r in loads]
        order += [r for r in replicas if r not in order]  # not on the ring yet
    else:
        order = sorted(replicas, key=lambda r: book.busy(r, info.model))
    fits = [r for r in order if loads[r] is None or loads[r].can_admit(info)]
    return fits + [r for r in order if r not in fits]


_ROUTERS: dict[str, object] = {}  # deployment name -> its router in this process
_LOCK = threading.Lock()  # Serve runs routers on an event-loop thread of their own


def register_router(deployment: str, router: object) -> None:
    """Serve builds routers itself; the ingress finds its replicas' one here."""
    with _LOCK:
        _ROUTERS[deployment] = router


def routers() -> dict[str, object]:
    with _LOCK:
        return dict(_ROUTERS)
