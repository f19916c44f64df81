"""Cache files (``LLM.save_cache``) per cache type: bytes on disk against the cache bytes
of the same tokens, and the time to save (a prefill included) and to load.

'full bytes' is what the tokens would take with every layer holding every position: a
model with sliding-window layers (Gemma 3) saves only the pages its window layers still
hold, so its files are smaller than that.

    python benchmarks/cache_files.py                 # SmolLM2, 1,000 tokens of the Jargon File
    python benchmarks/cache_files.py --tokens 200 --types f16,q4_0
    python benchmarks/cache_files.py --model /work/models/gemma/gemma-3-270m-q4_k_m.gguf \
        --tokens 2000 --types q8_0,q4_0
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="/usr/share/doc/jargon-text/jargon.txt.gz")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--types", default="f16,q8_0,q8_0/q4_0,q4_0")
    args = ap.parse_args()

    from kvslim.cache import KVCache
    from kvslim.llm import LLM

    opener = gzip.open if args.text.endswith(".gz") else open
    with opener(args.text, "rt", encoding="utf-8") as f:
        text = f.read()[20000:20000 + 8 * args.tokens]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.types.split(","):
            k, _, v = spec.partition("/")
            llm = LLM(args.model, cache_type_k=k, cache_type_v=v or k, progress=False,
                      num_ctx=max(2048, 2 * args.tokens))
            ids = llm.tokenize(text)[:args.tokens]
            path = Path(tmp) / f"{k}_{v or k}.kvc"
            t0 = time.perf_counter()
            info = llm.save_cache(path, ids)
            t1 = time.perf_counter()
            LLM.load_cache(llm, path)  # read, checked, restored (as a new process would)
            t2 = time.perf_counter()
            base = base or info["bytes"]
            c = llm.engine.cache
            full = KVCache.bytes_per_token(c.n_layers, c.n_kv_heads, c.head_dim, c.cache_type_k,
                                           c.cache_type_v, c.v_head_dim) * info["tokens"]
            rows.append((spec, info["tokens"], round(full), info["cache_bytes"], info["bytes"],
                         info["bytes"] / base, t1 - t0, t2 - t1))
    print(f"{'K/V':<12}{'tokens':>8}{'full bytes':>14}{'cache bytes':>14}{'file bytes':>14}"
          f"{'vs first':>10}{'save s':>9}{'load s':>9}")
    for spec, n, full, cache, file, ratio, save, load in rows:
        print(f"{spec:<12}{n:>8}{full:>14,}{cache:>14,}{file:>14,}{ratio:>10.3f}{save:>9.2f}"
              f"{load:>9.3f}")


if __name__ == "__main__":
    main()
