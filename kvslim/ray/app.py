"""The Serve application: replicas (``kvslim.ray.replica``) behind one ingress
(``kvslim.ray.ingress``), routed by ``kvslim.ray.router``; and running it.

    from kvslim.ray import build_app
    serve.run(build_app(ServerSettings.from_env(), replicas=2), route_prefix="/")
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from kvslim.ray.ingress import Router, ingress_app
from kvslim.ray.replica import Replica
from kvslim.ray.router import STATS_PERIOD_S, KvslimRouter
from kvslim.ray.routing import routers
from kvslim.settings import ServerSettings

__all__ = ["build_app", "run", "REPLICA", "INGRESS"]

REPLICA, INGRESS = "kvslim-replica", "kvslim-ingress"


class Ingress:
    """The HTTP deployment: its app is built in the replica (``__serve_build_asgi_app__``)."""

    def __init__(self, replicas, settings: ServerSettings, models: dict[str, Path] | None,
                 affinity_pages: int):
        self.handle, self.settings = replicas, settings
        self.router = Router(settings, models, affinity_pages)  # 0 pages: no affinity

    async def _cluster(self) -> list[dict]:
        router = routers().get(REPLICA)
        if router is None:  # Serve builds the router at the handle's first call: make one
            async for _ in self.handle.options(stream=True).forward.remote(
                    "GET", "/api/version", "", [], b""):
                pass
            router = routers().get(REPLICA)
        deadline = time.monotonic() + 4 * STATS_PERIOD_S
        while router is not None and not router.reports() and time.monotonic() < deadline:
            await asyncio.sleep(STATS_PERIOD_S / 5)  # the first reports are on their way
        return router.reports() if router is not None else []

    def __serve_build_asgi_app__(self):
        return ingress_app(self.handle, self.router, self.settings, cluster=self._cluster)


def build_app(settings: ServerSettings, models: dict[str, Path] | None = None, *,
              replicas: int = 1, autoscale: tuple[int, int] | None = None, affinity: bool = True,
              affinity_pages: int = 1, replica_cpus: float = 1.0):
    """The kvslim Serve application: ``replicas`` kvslim runners (or ``autoscale`` =
    (min, max), scaled on requests in flight per replica against num_parallel), each with
    its own K/V pools, behind one ingress serving the Ollama and OpenAI APIs.

    ``affinity_pages``: the leading whole pages of prompt tokens that key a prefix;
    ``affinity`` False routes by load alone (least loaded first), for comparison. Both are
    the ingress's: changing them redeploys the ingress alone."""
    options = dict(
        name=REPLICA, ray_actor_options={"num_cpus": replica_cpus},
        # Serve holds a request back only past this; below it each replica's own queue
        # (KVSLIM_MAX_QUEUE, then 503) decides, as in one server
        max_ongoing_requests=settings.num_parallel + settings.max_queue,
        request_router_config=RequestRouterConfig(
            request_router_class=KvslimRouter,
            request_routing_stats_period_s=STATS_PERIOD_S, request_routing_stats_timeout_s=5.0),
        health_check_period_s=2.0, health_check_timeout_s=30.0)
    if autoscale is not None:
        lo, hi = autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                         "target_ongoing_requests": settings.num_parallel}
    else:
        options["num_replicas"] = replicas
    replica = serve.deployment(**options)(Replica)
    ingress = serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)(serve.ingress()(Ingress))
    return ingress.bind(replica.bind(settings, models), settings, models,
                        affinity_pages if affinity else 0)


def run(settings: ServerSettings, models: dict[str, Path] | None = None, *, replicas: int = 1,
        autoscale: tuple[int, int] | None = None, address: str | None = None) -> None:
    """``kvslim serve --ray``: start (or join, with ``address``) a Ray cluster, serve on the
    settings' host and port until interrupted."""
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        most = autoscale[1] if autoscale else replicas
        # one CPU each where there are enough; replicas on fewer cores share them
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / most)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings, models, replicas=replicas, autoscale=autoscale,
                            replica_cpus=cpus), name="kvslim", route_prefix="/")
        size = f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{replicas} replica(s)"
        print(f"kvslim serving on {settings.address} with Ray Serve, {size} (K "
              f"{settings.cache_type_k} / V {settings.cache_type_v}, {settings.num_parallel} "
              f"parallel each)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
