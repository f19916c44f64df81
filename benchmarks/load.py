"""Load time of a model: GGUF header, tokenizer, and the whole `LLM(...)`.

    python benchmarks/load.py [MODEL ...]      # default: smollm2 and gemma3:270m

Each model loads in a fresh process (nothing cached in Python), after one read of the
file so the page cache holds it; prints seconds per stage (`LLM` with a 512-token
context, or the model's maximum when smaller).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from kvslim import LLM, gguf_loader, store
from kvslim.tokenizer import Tokenizer
path = store.resolve(sys.argv[1])
t1 = time.perf_counter()
reader = gguf_loader.open_gguf(path)
t2 = time.perf_counter()
Tokenizer.from_gguf(reader)
t3 = time.perf_counter()
ctx = min(512, gguf_loader.ModelConfig.from_gguf(reader).context_length)
LLM(str(path), num_ctx=ctx, num_parallel=1, progress=False)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "header": t2 - t1, "tokenizer": t3 - t2, "LLM": t4 - t3}))
"""


def main() -> None:
    from kvslim import store

    models = sys.argv[1:] or ["smollm2", "gemma3:270m"]
    print("| model | import s | GGUF header s | tokenizer s | LLM(...) s |")
    print("|---|---|---|---|---|")
    for name in models:
        with open(store.resolve(name), "rb") as f:  # into the page cache
            while f.read(1 << 24):
                pass
        out = subprocess.run([sys.executable, "-c", _CHILD, name], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name}: {out.stderr.strip().splitlines()[-1]}")
        t = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {t['import']:.2f} | {t['header']:.2f} | {t['tokenizer']:.2f} | {t['LLM']:.2f} |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
