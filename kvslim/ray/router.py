"""The Serve request router of the kvslim replicas: ``kvslim.ray.routing`` over Serve's
view of the replicas.

Serve builds one router per deployment handle, in the process that holds the handle (the
ingress). Replicas report their pools through ``record_routing_stats`` every
``STATS_PERIOD_S``; the router ranks the replicas for each request from the ``route``
argument the ingress passes (``RouteInfo`` fields). Serve then sends the request to the
first replica of the ranking whose Serve queue is not full, so a dead or restarting
replica is passed over like a full one.
"""
from __future__ import annotations

import collections
from typing import List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvslim.ray.routing import HashRing, LoadBook, RouteInfo, rank, register_router

__all__ = ["KvslimRouter", "STATS_PERIOD_S"]

# Serve pickles this module by value into every process that routes: module state kept
# here would be a copy, so routers register in kvslim.ray.routing (imported by reference).
STATS_PERIOD_S = 0.5  # how often a replica reports its pools
BOOKED_MAX = 10_000  # request ids remembered as counted (a request is ranked for a moment)


def _route(pending: PendingRequest | None) -> RouteInfo:
    given = (pending.kwargs.get("route") if pending is not None else None) or {}
    return RouteInfo(**given)


class KvslimRouter(RequestRouter):
    """Prefix affinity on a consistent-hash ring, skipping replicas that cannot admit."""

    def initialize_state(self):
        self.ring, self.book = HashRing(), LoadBook()
        self._booked: collections.OrderedDict[str, None] = collections.OrderedDict()
        register_router(self._deployment_id.name, self)

    def update_replicas(self, replicas: List[RunningReplica]):
        super().update_replicas(replicas)
        ids = {r.replica_id.unique_id for r in replicas}
        for gone in self.ring.nodes - ids:
            self.ring.remove(gone)
        for new in ids:
            self.ring.add(new)
        self.book.forget(ids)

    def _refresh(self, replicas: List[RunningReplica]) -> None:
        for r in replicas:
            stats = r.routing_stats
            if stats:
                self.book.update(r.replica_id.unique_id, stats.get("version"),
                                 stats.get("models", {}), stats.get("ongoing", 0))

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        self._refresh(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        info = _route(pending_request)
        order = rank(list(by_id), info, self.book, self.ring)
        self._book(pending_request, order[0] if order else None, info)
        return [[by_id[i]] for i in order]

    def _book(self, pending: PendingRequest | None, replica: str | None, info: RouteInfo) -> None:
        """Count the request against its first choice until that replica reports again.
        (Serve tells a router where a request went only when it enforces max_ongoing_requests
        strictly; the first choice is where it goes unless that replica's Serve queue is
        full. A request ranked again after a backoff is counted once.)"""
        rid = getattr(getattr(pending, "metadata", None), "internal_request_id", None)
        if replica is None or rid is None or rid in self._booked:
            return
        self._booked[rid] = None
        while len(self._booked) > BOOKED_MAX:
            self._booked.popitem(last=False)
        self.book.routed(replica, info)

    def reports(self) -> list[dict]:
        """The last report of every replica known now (those that have reported)."""
        return [dict(r.routing_stats) for r in list(self._replicas.values()) if r.routing_stats]
