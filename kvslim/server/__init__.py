"""``kvslim serve``: an Ollama- and OpenAI-compatible HTTP server over quantized K/V caches.

    kvslim serve                      # 127.0.0.1:11434, models from the store (kvslim pull)
    KVSLIM_HOST=0.0.0.0:8080 KVSLIM_KV_CACHE_TYPE=q8_0 KVSLIM_NUM_PARALLEL=16 kvslim serve

Modules: ``types`` (what a pool is built with, what a request asks of it, errors),
``models`` (loaded models and their pools), ``scheduler`` (the thread that batches each
model's requests), ``schemas`` (request bodies), ``ollama`` / ``openai`` (routes),
``app`` (the FastAPI app). Settings come from ``kvslim.settings``, the prefix cache from
``kvslim.prefix``. This file stays light: every ``kvslim`` command imports it.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

__all__ = ["cli_register", "serve"]


def cli_register(subparsers) -> None:
    from kvslim.cli import add_model_args

    p = subparsers.add_parser(
        "serve", help="serve the Ollama and OpenAI APIs (default 127.0.0.1:11434)",
        description="Serve models over Ollama's REST API and OpenAI's /v1 API. Flags override "
                    "the KVSLIM_* environment; per-request options override both.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="extra .gguf files to serve, named after the file (the store's models "
                        "are always served)")
    p.add_argument("--host", help="address, like OLLAMA_HOST: host[:port] (env KVSLIM_HOST; "
                                  "default 127.0.0.1:11434; 0.0.0.0 to listen on the network)")
    p.add_argument("--num-parallel", "-np", type=_positive,
                   help="sequences decoding together per model (env KVSLIM_NUM_PARALLEL; default 4)")
    p.add_argument("--kv-memory", metavar="SIZE",
                   help="K/V pool per model, e.g. 2GiB (env KVSLIM_KV_MEMORY; default "
                        "num_ctx x num_parallel)")
    p.add_argument("--max-queue", type=_positive,
                   help="waiting requests per model before 503 (env KVSLIM_MAX_QUEUE; default 512)")
    add_model_args(p)
    g = p.add_argument_group("Ray Serve (pip install 'kvslim[ray]'; README: Server on Ray)")
    g.add_argument("--ray", action="store_true",
                   help="serve with replicas on Ray Serve, each with its own K/V pool, routed by "
                        "prompt prefix and free pages")
    g.add_argument("--replicas", type=_positive, metavar="N", help="replicas (with --ray; default 1)")
    g.add_argument("--autoscale", type=_min_max, metavar="MIN:MAX",
                   help="scale between MIN and MAX replicas on requests in flight (with --ray)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster ('auto': the one on this machine; default: start "
                        "a local one)")
    p.set_defaults(func=cmd_serve)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _min_max(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit()) or not 1 <= int(lo) <= int(hi):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return int(lo), int(hi)


def _ray_options(args) -> dict | None:
    """``kvslim.ray.run``'s options from the flags; None without --ray (ValueError: misuse)."""
    given = [f for f, v in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                            ("--ray-address", args.ray_address)) if v is not None]
    if not args.ray:
        if given:
            raise ValueError(f"{given[0]} needs --ray")
        return None
    if args.replicas is not None and args.autoscale is not None:
        raise ValueError("give --replicas or --autoscale, not both")
    return {"replicas": args.replicas or 1, "autoscale": args.autoscale,
            "address": args.ray_address}


def cmd_serve(args) -> int:
    from kvslim.settings import ServerSettings

    settings = ServerSettings.from_env(
        host=args.host, kv_cache_type=args.kv_cache_type, cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v, flash_attn=args.flash_attn, num_ctx=args.num_ctx,
        num_parallel=args.num_parallel, kv_memory=args.kv_memory, max_queue=args.max_queue,
        device=args.device, kv_rotation=args.kv_rotation, kv_centering=args.kv_centering,
        kv_rounding=args.kv_rounding, weights=args.weights, kv_max_kld=args.kv_max_kld)
    ray = _ray_options(args)
    models = {}
    for item in args.models:
        path = Path(item).expanduser()
        if not path.is_file():
            raise FileNotFoundError(2, "no such model file", str(path))
        models[path.stem] = path.resolve()  # replicas run in other processes (and cwds)
    if ray is not None:
        if importlib.util.find_spec("ray") is None:
            raise ValueError("kvslim serve --ray needs Ray Serve: pip install 'kvslim[ray]'")
        from kvslim.ray import run
        run(settings, models, **ray)
        return 0
    serve(settings, models)
    return 0


def serve(settings=None, models: dict[str, Path] | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import logging

    import uvicorn

    from kvslim.server.app import create_app
    from kvslim.settings import ServerSettings, is_loopback

    settings = settings or ServerSettings.from_env()
    log = logging.getLogger("kvslim.server")
    if not is_loopback(settings.host) and not settings.env.get("KVSLIM_API_KEY"):
        log.warning("listening on %s: reachable from the network, with no authentication "
                    "(set KVSLIM_API_KEY; README: Security)", settings.address)
    print(f"kvslim serving on {settings.address} (K {settings.cache_type_k} / V "
          f"{settings.cache_type_v}, {settings.num_parallel} parallel)", flush=True)
    uvicorn.run(create_app(settings, models), host=settings.host, port=settings.port,
                log_level="warning", timeout_keep_alive=30)
