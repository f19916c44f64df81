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

from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvslim.ray.routing import HashRing, LoadBook, RouteInfo, rank, register_router

__all__ = ["KvslimRouter", "STATS_PERIOD_S"]

# Serve pickles this module by value into every process that routes: module state kept
# here would be a copy, so routers register in kvslim.ray.routing (imported by reference).
STATS_PERIOD_S = 0.5  # how often a replica reports its pools

def _route(pending: PendingRequest | None) -> RouteInfo:
    given = (pending.kwargs.get("route") if pending is not None else None) or {}
    return RouteInfo(**given)


class KvslimRouter(RequestRouter):
    """Prefix affinity on a consistent-hash ring, skipping replicas that cannot admit."""

    def initialize_state(self, affinity: bool = True):
        self.affinity = affinity
        self.ring, self.book = HashRing(), LoadBook()
        self.counts: dict[str, int] = {}  # requests routed per replica (by this router)
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
                self.book.update(r.replica_id.unique_id, stats.get("version"), stats.get("models", {}))

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        self._refresh(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = rank(list(by_id), _route(pending_request), self.book,
                     self.ring if self.affinity else None)
        return [[by_id[i]] for i in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result):
        rid = replica_id.unique_id
        self.book.routed(rid, _route(pending_request))
        self.counts[rid] = self.counts.get(rid, 0) + 1

    def reports(self) -> list[dict]:
        """The last report of every replica known now (those that have reported)."""
        return [dict(r.routing_stats) for r in list(self._replicas.values()) if r.routing_stats]
