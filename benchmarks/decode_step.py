"""Median decode step of one request, for comparing thread settings process by process.

    python benchmarks/decode_step.py                                # kvslim's default spin
    GOMP_SPINCOUNT=300000 python benchmarks/decode_step.py          # libgomp's default
    OMP_WAIT_POLICY=PASSIVE python benchmarks/decode_step.py

OpenMP reads its settings once, when torch loads it, so each setting needs its own
process (benchmarks/README.md, "Threads on a shared machine"). kvslim is imported before
torch here, as the CLI does, so its GOMP_SPINCOUNT default applies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import LLM, bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--type", default="q8_0", help="K and V cache type")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens (the default text)")
    ap.add_argument("--decode", type=int, default=40, help="decode steps; the first 5 are not counted")
    args = ap.parse_args()
    llm = LLM(args.model, kv_cache_type=args.type, num_ctx=args.prompt + args.decode + 64,
              progress=False, device="cpu")
    ids = llm.tokenize(bench.load_text(bench.DEFAULT_TEXT))[:args.prompt]
    steps, t = [], time.perf_counter()
    for _ in llm.generate_stream(ids, max_tokens=args.decode, temperature=0, ignore_eos=True):
        now = time.perf_counter()
        steps.append(now - t)
        t = now
    spin = os.environ.get("GOMP_SPINCOUNT", "-")
    policy = os.environ.get("OMP_WAIT_POLICY", "-")
    print(f"GOMP_SPINCOUNT={spin} OMP_WAIT_POLICY={policy} OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}: median decode step "
          f"{1000 * statistics.median(steps[5:]):.1f} ms (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
