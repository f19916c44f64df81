"""K/V bytes of a model with sliding-window layers: the windowed pool against a full one.

Loads the model through ``LLM`` (its engine sizes the pool: global layers for num_ctx
tokens, windowed layers for their window plus a prefill chunk), allocates a full pool
of the same pages for comparison (every layer keeps every position, as before the
windowed cache), and prints both from the pools' ``nbytes`` beside ``kvslim plan``'s
arithmetic. ``--fill N`` then feeds N tokens of prose into one sequence and counts the
pages each group holds, so the release of pages out of the window is seen in the pool.

    python benchmarks/window_memory.py                      # Gemma 3 270M, 32,768 tokens, q8_0
    python benchmarks/window_memory.py --fill 2048 --type q4_0
"""
from __future__ import annotations

import argparse
import gzip
import time

from kvslim import planner
from kvslim.cache import KVCache
from kvslim.engine import run_step
from kvslim.llm import LLM

GEMMA = "/work/models/gemma/gemma-3-270m-q4_k_m.gguf"
TEXT = "/usr/share/doc/jargon-text/jargon.txt.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=GEMMA)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--type", default="q8_0", help="K and V cache type")
    ap.add_argument("--fill", type=int, default=0, help="tokens of prose to feed (0: none)")
    a = ap.parse_args()
    llm = LLM(a.model, cache_type_k=a.type, cache_type_v=a.type, num_ctx=a.ctx, progress=False)
    cache, config = llm.engine.cache, llm.model.config
    full = KVCache(cache.n_layers, cache.n_kv_heads, cache.head_dim, cache.n_pages,
                   page_size=cache.page_size, cache_type_k=a.type, cache_type_v=a.type)
    planned = planner.kv_bytes(config, a.ctx, 1, a.type, a.type, cache.page_size)
    print(f"{a.model}: {a.ctx:,} tokens, K/V {a.type}, {cache}")
    print("| pool | bytes | MiB |\n|---|---|---|")
    for name, n in (("windowed (pool nbytes)", cache.nbytes), ("kvslim plan", planned),
                    ("full (pool nbytes)", full.nbytes)):
        print(f"| {name} | {n:,} | {n / 2**20:.1f} |")
    print(f"full / windowed: {full.nbytes / cache.nbytes:.2f}x")
    if a.fill:
        fill(llm, cache, a.fill)


def fill(llm, cache: KVCache, n: int) -> None:
    with gzip.open(TEXT, "rt", encoding="utf-8", errors="replace") as f:
        ids = llm.tokenizer.encode(f.read(40 * n))[:n]
    cid, chunk, t0 = cache.new_sequence(), llm.engine.max_batch_tokens, time.perf_counter()
    for lo in range(0, len(ids), chunk):
        part = ids[lo:lo + chunk]
        run_step(llm.model, llm.engine.attn, cache, [cid], [len(part)], part)
    held = [sum(1 for p in cache.pages(cid, g) if p >= 0) for g in range(len(cache.groups))]
    print(f"after {len(ids):,} tokens ({time.perf_counter() - t0:.1f} s): pages held per group "
          + ", ".join(f"window {g.window or 'none'}: {h} of {g.n_pages}"
                      for g, h in zip(cache.groups, held)))
    cache.check()
    cache.free(cid)


if __name__ == "__main__":
    main()
