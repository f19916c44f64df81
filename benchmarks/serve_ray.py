"""kvslim on Ray Serve: prefix-hit rate, throughput and routing overhead with 1 vs 2
replicas and prefix affinity on vs off, in one run.

    python benchmarks/serve_ray.py                    # a local Ray cluster on this machine's cores
    python benchmarks/serve_ray.py --address auto     # an existing cluster (ray start --head ...)
    python benchmarks/serve_ray.py --conversations 16 --systems 4 --turns 2 --num-predict 16

Workload: --conversations chats (16) sharing --systems system prompts (4, each over one
64-token page), --turns turns each (the second turn resends the first answer, as chat
clients do), --concurrency conversations at once; greedy, --num-predict tokens per answer.
Each configuration gets system prompts of its own, so no run starts with another's cache.

Per configuration: wall time, requests/s and generated tok/s; the prefix-hit rate
(prompt tokens served from a replica's prefix cache over all prompt tokens, and the
share of requests with a hit); the replicas used. Routing overhead: what the ingress
adds to a request before a replica sees it: its route (tokenizing the prompt and hashing
its first page), measured here on the workload's requests, and the whole hop (Serve
proxy, ingress, router, handle call, replica) as the latency of GET /api/version through
the cluster minus the same request to one `kvslim serve` (uvicorn on loopback, in this
process).

On one machine the replicas share its cores, so 2 replicas cannot decode faster than 1:
the hit rate and the overhead are the figures. On a multi-node cluster (one replica per
node: `ray start --head` on one, `ray start --address HEAD:6379` on the others, then
`--address auto` here) throughput scales with the replicas while affinity keeps the hit
rate of one server; affinity off lowers it as conversations land where their prefix is not.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvslim.ray.ingress import Router  # noqa: E402
from kvslim.server.app import create_app  # noqa: E402
from kvslim.settings import ServerSettings  # noqa: E402

TOPICS = ["the sea", "volcanoes", "old maps", "bread", "bees", "comets", "glass", "rivers",
          "clocks", "forests", "trains", "salt"]
QUESTIONS = ["What is it made of?", "Why does it matter?", "How old is it?", "Where is it found?",
             "Who studies it?", "What would change without it?"]


def _system(topic: str) -> str:
    return (f"You are a patient teacher who explains {topic} to curious children. Use short "
            f"sentences, one idea at a time, and give an everyday example for each idea. ") * 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _conversation(client, system: str, q: int, args, out: list) -> None:
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": QUESTIONS[q % len(QUESTIONS)]}]
    for turn in range(args.turns):
        t0 = time.perf_counter()
        r = await client.post("/api/chat", json={
            "model": args.model, "stream": False, "messages": messages,
            "options": {"temperature": 0, "num_predict": args.num_predict}})
        r.raise_for_status()
        body = r.json()
        out.append({"prompt": body["prompt_eval_count"], "cached": body["prompt_cache_count"],
                    "generated": body["eval_count"], "replica": r.headers.get("x-kvslim-replica"),
                    "seconds": time.perf_counter() - t0})
        messages += [body["message"], {"role": "user", "content": "Tell me more."}]


async def _workload(url: str, systems: list[str], args) -> tuple[list, float]:
    out, gate = [], asyncio.Semaphore(args.concurrency)

    async def one(i):
        async with gate:
            await _conversation(client, systems[i % len(systems)], i, args, out)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.conversations)))
        return out, time.perf_counter() - t0


async def _warm(url: str, n: int, model: str) -> None:
    """Load the model on every replica (short prompts have no key: least loaded first)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(client.post("/api/generate", json={
            "model": model, "prompt": f"Count to {i + 2}.", "raw": True, "stream": False,
            "options": {"num_predict": 1}}) for i in range(n)))


async def _hop(url: str, n: int) -> float:
    """Median seconds of GET /api/version."""
    times = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            (await client.get("/api/version")).raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _direct_hop(settings: ServerSettings, n: int) -> float:
    """_hop against one `kvslim serve` app (uvicorn over loopback, in a thread)."""
    import threading

    import uvicorn

    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        return asyncio.run(_hop(f"http://127.0.0.1:{port}", n))
    finally:
        server.should_exit = True
        thread.join(10)


def _deploy(serve, settings, replicas: int, affinity: bool, url: str, model: str) -> None:
    from kvslim.ray.app import build_app

    serve.run(build_app(settings, replicas=replicas, affinity=affinity), name="kvslim",
              route_prefix="/")
    deadline = time.monotonic() + 300
    while len(httpx.get(url + "/api/ps", timeout=30).json()["replicas"]) != replicas:
        if time.monotonic() > deadline:
            raise SystemExit(f"{replicas} replicas did not come up in 300 s")
        time.sleep(0.5)
    asyncio.run(_warm(url, replicas, model))


def _row(name: str, out: list, wall: float) -> str:
    prompt, cached = sum(o["prompt"] for o in out), sum(o["cached"] for o in out)
    hits = sum(o["cached"] > 0 for o in out)
    per = {}
    for o in out:
        per[o["replica"]] = per.get(o["replica"], 0) + 1
    return (f"| {name} | {len(out)} | {wall:.1f} | {len(out) / wall:.2f} | "
            f"{sum(o['generated'] for o in out) / wall:.1f} | {cached / prompt:.1%} | "
            f"{hits / len(out):.0%} | {' / '.join(str(v) for v in sorted(per.values(), reverse=True))} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--address", help="an existing Ray cluster ('auto'); default: start a local one")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--num-predict", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--hops", type=int, default=30, help="requests for the hop overhead")
    args = ap.parse_args()
    if args.systems * 3 > len(TOPICS):
        raise SystemExit(f"at most {len(TOPICS) // 3} system prompts")

    import ray
    from ray import serve

    env = {"KVSLIM_KEEP_ALIVE": "-1"}
    settings = ServerSettings.from_env(env, num_ctx=2048, num_parallel=args.concurrency)
    router = Router(settings, None)
    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), object_store_memory=200 * 2**20, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = _port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"Ray up in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows, hop = [], {}
    configs = [(2, True), (2, False), (1, True)]  # 2 replicas first: the 1-replica run reuses one
    try:
        for i, (n, affinity) in enumerate(configs):
            _deploy(serve, settings, n, affinity, url, args.model)
            systems = [_system(t) for t in TOPICS[i * args.systems:(i + 1) * args.systems]]
            out, wall = asyncio.run(_workload(url, systems, args))
            name = f"{n} replica{'s' if n > 1 else ''}, affinity {'on' if affinity else 'off'}"
            rows.append(_row(name, out, wall))
            print(rows[-1], flush=True)
            if i == 0:
                hop["ray"] = asyncio.run(_hop(url, args.hops))
    finally:
        serve.shutdown()
        ray.shutdown()
    hop["direct"] = _direct_hop(settings, args.hops)
    route_ms = []
    for t in TOPICS[:args.systems]:
        for q in QUESTIONS[:4]:
            body = ('{"model": "%s", "messages": [{"role": "system", "content": "%s"}, '
                    '{"role": "user", "content": "%s"}]}' % (args.model, _system(t), q)).encode()
            t1 = time.perf_counter()
            router.route("/api/chat", body)
            route_ms.append((time.perf_counter() - t1) * 1e3)
    print(f"\n{args.conversations} conversations x {args.turns} turns, {args.systems} system prompts, "
          f"{args.concurrency} at once, {args.num_predict} tokens per answer; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| configuration | requests | wall s | req/s | gen tok/s | prompt tokens cached | "
          "requests with a hit | requests per replica |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nrouting at the ingress (tokenize + first-page hash), median of {len(route_ms)}: "
          f"{statistics.median(route_ms):.2f} ms")
    print(f"GET /api/version, median of {args.hops}: through Ray {hop['ray'] * 1e3:.1f} ms, "
          f"one kvslim serve {hop['direct'] * 1e3:.2f} ms: Ray adds "
          f"{(hop['ray'] - hop['direct']) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
