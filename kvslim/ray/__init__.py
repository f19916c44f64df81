"""kvslim on Ray Serve: replicas with their own K/V pools behind one Ollama/OpenAI ingress,
routed by prompt prefix (consistent hashing) and by what each pool can admit.

    kvslim serve --ray --replicas 2             # a local Ray cluster, one ingress on :11434
    kvslim serve --ray --autoscale 1:4 --ray-address auto   # an existing cluster

    from kvslim.ray import build_app            # your own Serve application
    serve.run(build_app(ServerSettings.from_env(), replicas=2), route_prefix="/")

Modules: ``routing`` (the hash ring and routing decisions, no Ray), ``replica`` (one
kvslim server driven in process), ``router`` (Serve's request router over ``routing``),
``ingress`` (the HTTP front end), ``app`` (the deployments and ``run``). Ray is an
optional dependency (``pip install "kvslim[ray]"``): this file imports none of it.
"""
from __future__ import annotations

__all__ = ["build_app", "run"]


def build_app(*args, **kwargs):
    """``kvslim.ray.app.build_app``: the Serve application (imports Ray)."""
    from kvslim.ray.app import build_app as build
    return build(*args, **kwargs)


def run(*args, **kwargs):
    """``kvslim.ray.app.run``: ``kvslim serve --ray`` (imports Ray)."""
    from kvslim.ray.app import run as run_app
    return run_app(*args, **kwargs)
