"""Prefill and decode tokens/s of a real model per K/V cache type and prompt length.

    python benchmarks/generate.py                      # smollm2, f16,q8_0,q4_0, 512,4096
    python benchmarks/generate.py --types q8_0 --lengths 4096 --decode 64 --profile

Each row runs one request through the engine (the path `kvslim run` takes): a prompt of
L tokens of English prose prefilled in chunks, then greedy decoding. Decode tok/s counts
only decode steps (the first token comes from the prefill). The floor column is what
one decode step must read (float32 weights + the K/V cache at that length) over the
streaming-read bandwidth measured in the same run. Numbers drift with machine load:
compare rows of one run, and note the load average printed at the top.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import LLM  # noqa: E402
from kvslim.sampling import SamplingParams  # noqa: E402

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")


def read_bandwidth(mib: int = 512, repeat: int = 5) -> float:
    """Bytes/s of a streaming float32 reduction over a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeat))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prompt_ids(llm: LLM, n: int) -> list[int]:
    if JARGON.exists():
        with gzip.open(JARGON, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids = llm.tokenize(text[20000:20000 + 8 * n])
    else:  # any token ids measure speed just as well
        ids = [(i * 7919) % llm.config.vocab_size for i in range(n)]
    if len(ids) < n:
        raise SystemExit(f"not enough text for {n} tokens")
    return ids[:n]


def run_one(llm: LLM, ids: list[int], n_decode: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy request."""
    e = llm.engine
    seq = e.add_request(ids, SamplingParams(max_tokens=n_decode + 1, temperature=0,
                                            repeat_penalty=1.0, ignore_eos=True))
    while e.has_work():
        e.step()
    s = seq.stats
    return s.prompt_eval_count / s.prompt_eval_duration, (seq.n_generated - 1) / s.eval_duration


def profile_decode(llm: LLM, ids: list[int], steps: int = 16) -> None:
    """torch.profiler table of decode steps after a prefill of ``ids``."""
    from torch.profiler import ProfilerActivity, profile

    e = llm.engine
    seq = e.add_request(ids, SamplingParams(max_tokens=steps + 8, temperature=0,
                                            repeat_penalty=1.0, ignore_eos=True))
    while seq.n_generated < 4:
        e.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            e.step()
    e.cancel(seq)
    e.reap()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="comma list; K/V pairs as k/v")
    ap.add_argument("--lengths", default="512,4096")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="also profile decode at the last length")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    types = [(t.split("/") * 2)[:2] for t in args.types.split(",")]

    llm = LLM(args.model, num_ctx=max(lengths) + args.decode + 8, device=args.device, progress=False)
    bw = read_bandwidth()
    weights = sum(p.numel() * p.element_size() for p in _tensors(llm.model))
    print(f"# {llm.config.name} on {llm.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; "
          f"read bandwidth {bw / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB")
    print(f"{'K/V':<11}{'backend':<10}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'floor tok/s':>13}{'of floor':>10}")
    for k, v in types:
        llm.reconfigure(cache_type_k=k, cache_type_v=v)
        info = llm.kv_cache_info()
        run_one(llm, prompt_ids(llm, 64), 4)  # warm up kernels (numba compiles on first call)
        for n in lengths:
            prefill, decode = run_one(llm, prompt_ids(llm, n), args.decode)
            floor = bw / (weights + n * info["bytes_per_token"])
            name = f"{info['type_k']}/{info['type_v']}"
            print(f"{name:<11}{info['backend']:<10}{n:>7}{prefill:>15.1f}{decode:>14.1f}"
                  f"{floor:>13.1f}{decode / floor:>10.0%}", flush=True)
    if args.profile:
        profile_decode(llm, prompt_ids(llm, lengths[-1]))


def _tensors(model):
    seen = {}
    for name in ("embed", "output", "output_norm"):
        t = getattr(model, name)
        seen[t.data_ptr()] = t
    for layer in model.layers:
        for t in vars(layer).values():
            if t is not None:
                seen[t.data_ptr()] = t
    return list(seen.values())


if __name__ == "__main__":
    main()
