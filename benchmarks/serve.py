"""Serving benchmark: aggregate decode tokens/s through `kvslim serve` with 1, 4 and 16
streams per K/V cache type, how many 4,096-token conversations fit in a K/V budget, the
latency of a short request during a long prefill, and the per-token cost of constrained
decoding.

    python benchmarks/serve.py                          # smollm2; f16,q8_0,q4_0; 1,4,16 streams
    python benchmarks/serve.py --types q8_0 --streams 16 --decode 32 --budget 2GiB
    python benchmarks/serve.py --skip-throughput --skip-capacity --prefill 4096,8000
    python benchmarks/serve.py --skip-throughput --skip-capacity --prefill '' --constrained 1,4

Throughput: `kvslim serve` runs in a subprocess (KVSLIM_NUM_PARALLEL = the most streams);
N concurrent streaming /api/generate requests with distinct prose prompts ask for the
cache type in their options (the server builds a pool per type). Aggregate
decode tok/s counts the tokens that arrive while all N streams are decoding (from the
moment the last one got its first token until the first one ends) over that window:
continuous batching at width N, HTTP included. The floor column is what one batched
decode step must read (float32 weights + N contexts of K/V) over the streaming-read
bandwidth measured in this process, turned into tok/s.

Capacity: conversations of 4,096 tokens that fit in --budget bytes, from the exact page
bytes (block scales included), beside the count an Ollama-style 2 / 1 / 0.5 bytes per
value estimate gives, then verified: a pool of that budget admits exactly that many
4,096-token requests (one more waits), and every admitted one can really take its
4,096 slots while one more conversation cannot.

Long prefill (--prefill N,...; issue 15 item 4): a server with two slots and a context
of N + 64. A short prompt alone (time to first token, median gap between tokens), an
N-token prose prompt alone (its prompt tok/s, server-side), then another N-token prompt
(not a prefix-cache hit) with the short one sent 1 s after it: the short one's time to
first token, the gaps between its tokens that arrive while the long prompt is still
prefilling (inter-token latency), and the long prompt's prompt tok/s while shared.

Constrained decoding (--constrained N,...; issue 16): N concurrent chat streams of
--decode tokens, as free text and with a JSON-schema ``format`` (a long string field, so
no answer ends early), alternated over --rounds rounds in one server. Per token: the
server's eval_duration / eval_count of each stream (the decode steps it took part in),
mean over streams and rounds; aggregate decode tok/s as in the throughput table.

The machine is shared: the load average is printed with the numbers; compare rows of
one run.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import formats, store  # noqa: E402
from kvslim.cache import CacheFull  # noqa: E402
from kvslim.engine import Engine  # noqa: E402
from kvslim.gguf_loader import ModelConfig, open_gguf  # noqa: E402
from kvslim.models import load_model  # noqa: E402
from kvslim.planner import parse_memory  # noqa: E402
from kvslim.sampling import SamplingParams  # noqa: E402
from kvslim.tokenizer import Tokenizer  # noqa: E402

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
CONVERSATION = 4096
# The short request of the prefill table: several tokens, so it has a prefill of its own
# (a 1-token prompt is a decode row from the start)
SHORT = "Once upon a time, there was a little"  # 9 tokens, continued for 24 and more


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def read_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s of a streaming float32 reduction over a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def prompts(n: int, chars: int) -> list[str]:
    """n distinct prose prompts of about ``chars`` characters (distinct from the first page)."""
    if JARGON.exists():
        with gzip.open(JARGON, "rt", encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read()[30000:30000 + 2 * n * chars].split())
    else:
        text = " ".join(f"word{i}" for i in range(n * chars // 5))
    return [f"{i}: " + text[i * chars:(i + 1) * chars] for i in range(n)]


# ---------------------------------------------------------------- throughput through the server


class Server:
    """`kvslim serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, parallel: int, num_ctx: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "kvslim.cli", "serve", "--host", f"127.0.0.1:{port}",
               "--num-parallel", str(parallel), "--num-ctx", str(num_ctx)]
        env = dict(os.environ, KVSLIM_MAX_LOADED_MODELS="1")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(self.url + "/api/version", timeout=1)
                break
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("kvslim serve did not start")
                time.sleep(0.2)
        httpx.post(self.url + "/api/generate", json={"model": model}, timeout=300)  # load

    def ps(self) -> dict:
        return httpx.get(self.url + "/api/ps").json()["models"][0]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[list[float], dict]:
    """Arrival times of the text pieces of one streamed answer, and its final object."""
    times, final = [], {}
    async with client.stream("POST", "/api/generate", json=body) as r:
        async for line in r.aiter_lines():
            obj = json.loads(line)
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("done"):
                final = obj
            elif obj.get("response"):
                times.append(time.perf_counter())
    return times, final


async def run_streams(url: str, model: str, texts: list[str], kv: str, decode: int,
                      extra: dict | None = None) -> dict:
    """N concurrent streams; the decode window in which all N decode together. ``extra``:
    more request fields (``format``, ``raw``)."""
    options = {"num_predict": decode, "temperature": 0, "repeat_penalty": 1.0, "kv_cache_type": kv}
    body = {"model": model, "raw": True, "options": options} | (extra or {})
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*[_stream(client, body | {"prompt": t}) for t in texts])
    start = max(times[0] for times, _ in results)  # every stream has its first token
    end = min(times[-1] for times, _ in results)  # no stream has ended yet
    tokens = sum(sum(start < t <= end for t in times) for times, _ in results)
    prompt = sum(f["prompt_eval_count"] for _, f in results) / len(results)
    ms = [f["eval_duration"] / 1e6 / f["eval_count"] for _, f in results]
    return {"tok_s": tokens / (end - start) if end > start else float("nan"), "prompt": prompt,
            "ms_per_token": sum(ms) / len(ms), "tokens": sum(f["eval_count"] for _, f in results)}


def throughput(args, bandwidth: float) -> list[tuple]:
    server = Server(args.model, max(args.streams), args.num_ctx)
    rows = []
    try:
        for kv in args.types:
            asyncio.run(run_streams(server.url, args.model, prompts(1, 40), kv, 4))  # rebuild + JIT
            for n in args.streams:
                got = asyncio.run(run_streams(server.url, args.model,
                                              prompts(n, args.prompt_chars), kv, args.decode))
                m = server.ps()
                kvc = m["kv_cache"]
                weights = m["size"] - kvc["bytes"]
                ctx = got["prompt"] + args.decode / 2  # mean context over the decode steps
                floor = n * bandwidth / (weights + n * ctx * kvc["bytes_per_token"])
                rows.append((f"{kvc['type_k']}/{kvc['type_v']}", n, f"{got['prompt']:.0f}",
                             f"{got['tok_s']:.1f}", f"{got['tok_s'] / n:.2f}", f"{floor:.0f}",
                             m["attention"]["backend"]))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        server.close()
    return rows


# ---------------------------------------------------------------- a short request during a long prefill


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


async def _timed(client: httpx.AsyncClient, model: str, text: str, n: int,
                 delay: float = 0.0) -> tuple[float, list[float], dict]:
    """(send time, token arrival times, final object) of one raw greedy stream."""
    await asyncio.sleep(delay)
    options = {"num_predict": n, "temperature": 0, "repeat_penalty": 1.0}
    t0 = time.perf_counter()
    times, final = await _stream(client, {"model": model, "prompt": text, "raw": True,
                                          "options": options})
    return t0, times, final


def _prompt_tok_s(final: dict) -> float:
    return final["prompt_eval_count"] / (final["prompt_eval_duration"] / 1e9)


async def prefill_latency(url: str, model: str, long_texts: list[str], short_text: str,
                          decode: int) -> dict:
    """Two distinct long prompts: the second must not be a prefix-cache hit of the first."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0, short, _ = await _timed(client, model, short_text, decode)
        if not short:
            raise SystemExit(f"{short_text!r} gave no text: the table needs a prompt it continues")
        alone = {"ttft": short[0] - t0, "itl": _median(_gaps(short))}
        _, _, final = await _timed(client, model, long_texts[0], 1)
        alone["long_tok_s"] = _prompt_tok_s(final)
        (l0, long, lfinal), (s0, short, _) = await asyncio.gather(
            _timed(client, model, long_texts[1], 1), _timed(client, model, short_text, decode, 1.0))
    during = [t for t in short if t < long[0]]  # tokens that came while the long one prefilled
    return {"tokens": lfinal["prompt_eval_count"], "alone": alone,
            "ttft": short[0] - s0, "itl": _median(_gaps(during)),
            "itl_max": max(_gaps(during), default=float("nan")),
            "n_during": len(during), "long_tok_s": _prompt_tok_s(lfinal), "long_ttft": long[0] - l0}


def long_prefill(args) -> list[tuple]:
    path = store.resolve(args.model, pull_missing=True)
    reader = open_gguf(path)
    tokenizer = Tokenizer.from_gguf(reader)
    ctx_max = ModelConfig.from_gguf(reader).context_length
    texts = prompts(2, 50000)
    rows = []
    for n in args.prefill:
        if n + 64 > ctx_max:
            print(f"  skipped {n:,}: the model's context is {ctx_max:,}", file=sys.stderr)
            continue
        long_texts = [tokenizer.decode(tokenizer.encode(t)[:n]) for t in texts]
        server = Server(args.model, 2, n + 64)
        try:
            asyncio.run(prefill_latency(server.url, args.model, ["1: warm", "2: up"], "Hi", 2))  # JIT
            r = asyncio.run(prefill_latency(server.url, args.model, long_texts, SHORT, args.decode))
        finally:
            server.close()
        a = r["alone"]
        rows.append((f"{r['tokens']:,}", f"{a['ttft']:.2f}", f"{r['ttft']:.2f}",
                     f"{r['ttft'] / a['ttft']:.1f}x", f"{a['itl']:.3f}", f"{r['itl']:.3f}",
                     f"{r['itl_max']:.3f}", r["n_during"], f"{r['long_ttft']:.1f}",
                     f"{a['long_tok_s']:.0f}", f"{r['long_tok_s']:.0f}",
                     f"{r['long_tok_s'] / a['long_tok_s']:.2f}"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- constrained decoding

# a schema whose answer cannot end within --decode tokens: every stream decodes them all
STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                          "story": {"type": "string", "minLength": 4000}},
         "required": ["title", "story"], "additionalProperties": False}


def constrained(args) -> list[tuple]:
    server = Server(args.model, max(args.constrained), args.num_ctx)
    kinds = {"free text": {"raw": False}, "JSON schema": {"raw": False, "format": STORY}}
    rows = []
    try:
        for extra in kinds.values():  # JIT, the grammar engine's tokenizer table
            asyncio.run(run_streams(server.url, args.model, prompts(1, 40), "f16", 4, extra))
        for n in args.constrained:
            texts = [f"Write a long story about {t}" for t in prompts(n, 60)]
            got = {k: [] for k in kinds}
            for _ in range(args.rounds):
                for kind, extra in kinds.items():
                    got[kind].append(asyncio.run(run_streams(server.url, args.model, texts, "f16",
                                                             args.decode, extra)))
            mean = {k: {f: sum(r[f] for r in v) / len(v) for f in ("ms_per_token", "tok_s", "tokens")}
                    for k, v in got.items()}
            free, json_ = mean["free text"], mean["JSON schema"]
            rows.append((n, f"{free['tokens']:.0f}", f"{json_['tokens']:.0f}",
                         f"{free['ms_per_token']:.1f}", f"{json_['ms_per_token']:.1f}",
                         f"{json_['ms_per_token'] - free['ms_per_token']:+.2f}",
                         f"{json_['ms_per_token'] / free['ms_per_token']:.3f}",
                         f"{free['tok_s']:.1f}", f"{json_['tok_s']:.1f}"))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        server.close()
    return rows


# ---------------------------------------------------------------- capacity in a budget


def capacity(args) -> list[tuple]:
    path = store.resolve(args.model, pull_missing=True)
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    model = load_model(reader, config, progress=False)
    tokenizer = Tokenizer.from_gguf(reader)
    rows, base = [], None
    for kv in args.types:
        engine = Engine(model, tokenizer, cache_type_k=kv, cache_type_v=kv, num_ctx=CONVERSATION,
                        num_parallel=1, n_pages=1)  # only to learn the effective types
        k, v = engine.plan.effective_k, engine.plan.effective_v
        engine.cache = None
        per_token = config.n_layers * config.n_kv_heads * (
            model.cache_head_dim * formats.block_bytes(k) // formats.QK
            + model.cache_head_dim * formats.block_bytes(v) // formats.QK)
        page_bytes = per_token * 64
        conversation = -(-CONVERSATION // 64) * page_bytes
        fit = args.budget // conversation
        ollama_est = args.budget // int(CONVERSATION * config.n_layers * config.n_kv_heads *
                                        model.cache_head_dim * 2 * _ollama_bytes(kv))
        admitted, extra_fits = verify(model, tokenizer, k, v, args.budget // page_bytes, fit)
        base = base or fit
        rows.append((f"{k}/{v}", f"{per_token:,}", f"{conversation / 2**20:.1f} MiB", fit,
                     ollama_est, admitted, "yes" if not extra_fits else "NO", f"{fit / base:.2f}x"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _ollama_bytes(kv: str) -> float:
    """Ollama's estimate per value (llm/memory.go): 2, 1 and 0.5 bytes; block scales left out."""
    return {"f16": 2, "q8_0": 1, "q4_0": 0.5}.get(kv, formats.bytes_per_element(kv))


def verify(model, tokenizer, k: str, v: str, n_pages: int, fit: int) -> tuple[int, bool]:
    """(requests a pool of n_pages admits, whether one more 4,096-token conversation fits
    physically after each admitted one took its 4,096 slots)."""
    engine = Engine(model, tokenizer, cache_type_k=k, cache_type_v=v, num_ctx=CONVERSATION,
                    num_parallel=fit + 1, n_pages=n_pages)
    params = SamplingParams(temperature=0, max_tokens=CONVERSATION - 2)
    for i in range(fit + 1):
        engine.add_request([1, 100 + i], params)  # each may grow to 4,096 tokens
    engine.step()  # admission, and one forward over the admitted ones
    admitted = len(engine.running)
    assert len(engine.waiting) == fit + 1 - admitted
    cache = engine.cache
    for seq in engine.running:
        cache.reserve(seq.cache_id, CONVERSATION - cache.length(seq.cache_id))
    try:
        cache.reserve(cache.new_sequence(), CONVERSATION)
        extra_fits = True
    except CacheFull:
        extra_fits = False
    engine.cache = None
    return admitted, extra_fits


# ---------------------------------------------------------------- output


def table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--types", default="f16,q8_0,q4_0", type=lambda s: s.split(","))
    p.add_argument("--streams", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--decode", type=int, default=24, help="tokens per stream")
    p.add_argument("--prompt-chars", type=int, default=200, help="prose characters per prompt")
    p.add_argument("--num-ctx", type=int, default=512)
    p.add_argument("--budget", type=parse_memory, default=parse_memory("1GiB"),
                   help="K/V memory budget for the capacity table")
    p.add_argument("--prefill", default="4096", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="long prompt tokens for the prefill-latency table ('' skips it)")
    p.add_argument("--constrained", default="1,4", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="streams for the constrained-decoding table ('' skips it)")
    p.add_argument("--rounds", type=int, default=2, help="free/JSON rounds of that table")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-capacity", action="store_true")
    args = p.parse_args()
    print(f"# kvslim serve benchmark, {args.model}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; {load_average()}")
    if not args.skip_throughput:
        bandwidth = read_bandwidth()
        print(f"\nAggregate decode tok/s through the server ({args.decode} tokens per stream; "
              f"read bandwidth {bandwidth / 1e9:.1f} GB/s)\n")
        table(["K/V", "streams", "prompt tok", "decode tok/s", "per stream", "floor tok/s",
               "attention"], throughput(args, bandwidth))
    if args.prefill:
        print(f"\nA short request ({SHORT!r}, {args.decode} tokens) during a long prefill: seconds, "
              f"prompt tok/s\n")
        table(["long prompt", "TTFT alone", "TTFT during", "ratio", "ITL alone", "ITL during",
               "ITL max", "tokens during", "long TTFT", "long tok/s alone", "long tok/s shared",
               "ratio"], long_prefill(args))
    if args.constrained:
        print(f"\nConstrained decoding: free text vs a JSON schema, {args.decode} tokens per stream, "
              f"{args.rounds} rounds alternated; ms per token (server-side), aggregate tok/s\n")
        table(["streams", "tokens free", "tokens JSON", "ms/token free", "ms/token JSON",
               "difference", "ratio", "tok/s free", "tok/s JSON"], constrained(args))
    if not args.skip_capacity:
        print(f"\nConcurrent {CONVERSATION:,}-token conversations in {args.budget / 2**30:g} GiB of K/V\n")
        table(["K/V", "bytes/token", "per conversation", "fit (exact)", "Ollama-style estimate",
               "admitted", "one more refused", "vs first"], capacity(args))
    print(f"\n# {load_average()}")


if __name__ == "__main__":
    main()
