"""Decode and prefill attention on CPU: fused kernels vs their memory floor and vs torch.

    python benchmarks/attention.py                 # the table in benchmarks/README.md
    python benchmarks/attention.py --contexts 4096 --shapes 8b --reps 50

Decode: time per layer of one query token (one sequence) at each context length. The
floor is the bytes of K+V the step must read divided by the streaming-read bandwidth
measured in the same run with the same threads; ratio = time / floor. Each timed call
reads a different layer of a cache several times larger than the last-level cache, so
every layer comes from DRAM as in a real forward pass (a single layer would sit in
cache and beat the floor).

Prefill: one 4,096-token prompt (empty prefix) attended against a q8_0 cache by the
fused backend, vs torch SDPA (causal, GQA) on float32 K/V.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from numba import get_num_threads, njit, prange

from kvslim.attention import Step
from kvslim.cache import KVCache
from kvslim.kernels import cpu, cpu_write, reference

SHAPES = {"smollm2": (9, 3, 64), "8b": (32, 8, 128)}  # q heads, kv heads, head dim
PAIRS = {"f16": ("f16", "f16"), "q8_0": ("q8_0", "q8_0"), "q4_0": ("q4_0", "q4_0"),
         "q8_0/q4_0": ("q8_0", "q4_0")}
COLD_BYTES = 256 << 20  # total cache per benchmark: >> the 32 MiB L3 of this machine


@njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a):
    """[threads, n] float32: one contiguous stream per thread."""
    out = np.zeros(a.shape[0], np.float32)
    for t in prange(a.shape[0]):
        s = np.float32(0.0)
        for i in range(a.shape[1]):
            s += a[t, i]
        out[t] = s
    return out


def bandwidth(reps: int = 15) -> float:
    """Streaming-read bytes/s with numba's threads over a 512 MiB buffer (median)."""
    a = np.ones((get_num_threads(), (512 << 20) // 4 // get_num_threads()), np.float32)
    return a.nbytes / median_time(lambda i: _stream_sum(a), reps, warmup=1)


def median_time(fn, reps: int, warmup: int = 3) -> float:
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_cache(shape, kt: str, vt: str, ctx: int, page_size: int = 64):
    """A cache whose every layer holds the same random ctx-token sequence; its decode meta."""
    _, hkv, d = shape
    per_layer = KVCache.bytes_per_token(1, hkv, d, kt, vt) * ctx
    layers = max(2, int(COLD_BYTES // per_layer))
    cache = KVCache(layers, hkv, d, -(-ctx // page_size), page_size=page_size,
                    cache_type_k=kt, cache_type_v=vt)
    seq = cache.new_sequence()
    if ctx > 1:
        first = Step.reserve(cache, [seq], [ctx - 1])
        cpu_write.write(cache, 0, first.slots, torch.randn(ctx - 1, hkv, d),
                        torch.randn(ctx - 1, hkv, d))
    meta = Step.reserve(cache, [seq], [1])
    cpu.Backend().prepare(meta)
    cpu_write.write(cache, 0, meta.slots, torch.randn(1, hkv, d), torch.randn(1, hkv, d))
    for planes in (cache.k_planes, cache.v_planes):
        for t in planes.values():
            t[1:] = t[0]
    return cache, meta, per_layer


def time_layers(fn, cache, meta, q, reps: int) -> float:
    """Median seconds of fn(q, cache, layer, meta, scale), a different layer each call."""
    scale = cache.head_dim ** -0.5
    return median_time(lambda i: fn(q, cache, i % cache.n_layers, meta, scale), reps)


def bench_decode(shape, ctx: int, reps: int, bw: float, rows: list) -> None:
    hq, hkv, d = shape
    q = torch.randn(1, hq, d)
    for label, (kt, vt) in PAIRS.items():
        cache, meta, nbytes = decode_cache(shape, kt, vt, ctx)
        rows.append((ctx, label, "fused", time_layers(cpu.attention, cache, meta, q, reps),
                     nbytes / bw))
        if label == "q8_0":
            t = time_layers(reference.attention, cache, meta, q, max(3, reps // 10))
            rows.append((ctx, label, "reference", t, nbytes / bw))
    # torch SDPA on a float32 cache: K, V [1, Hkv, ctx, D], also rotated through copies
    nbytes = 2 * hkv * ctx * d * 4
    copies = max(2, COLD_BYTES // nbytes)
    kv = [torch.randn(2, 1, hkv, ctx, d) for _ in range(copies)]
    q4 = q.transpose(0, 1).unsqueeze(0)
    t = median_time(lambda i: F.scaled_dot_product_attention(
        q4, kv[i % copies][0], kv[i % copies][1], scale=d ** -0.5, enable_gqa=True), reps)
    rows.append((ctx, "f32", "torch sdpa", t, nbytes / bw))


def bench_prefill(shape, n: int, reps: int) -> tuple[float, float, float]:
    """Seconds: fused q8_0 attention, torch SDPA on float32 K/V, and the q8_0 cache write."""
    hq, hkv, d = shape
    cache = KVCache(1, hkv, d, -(-n // 64), page_size=64, cache_type_k="q8_0",
                    cache_type_v="q8_0")
    seq = cache.new_sequence()
    meta = Step.reserve(cache, [seq], [n])
    cpu.Backend().prepare(meta)
    k, v, q = torch.randn(n, hkv, d), torch.randn(n, hkv, d), torch.randn(n, hq, d)
    t_write = median_time(lambda i: cpu_write.write(cache, 0, meta.slots, k, v), reps, warmup=1)
    t_fused = median_time(lambda i: cpu.attention(q, cache, 0, meta, d ** -0.5), reps, warmup=1)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
    t_sdpa = median_time(lambda i: F.scaled_dot_product_attention(
        q4, k4, v4, is_causal=True, scale=d ** -0.5, enable_gqa=True), reps, warmup=1)
    return t_fused, t_sdpa, t_write


_FIRST_CALL = """
import time, torch
from kvslim.attention import Step
from kvslim.cache import KVCache
cache = KVCache(1, 3, 64, 4, page_size=64, cache_type_k="q8_0", cache_type_v="q4_0")
seq = cache.new_sequence()
meta = Step.reserve(cache, [seq], [5])
t0 = time.perf_counter()
from kvslim.kernels import cpu, cpu_write
cpu.Backend().prepare(meta)
t1 = time.perf_counter()
cpu_write.write(cache, 0, meta.slots, torch.randn(5, 3, 64), torch.randn(5, 3, 64))
t2 = time.perf_counter()
cpu.attention(torch.randn(5, 9, 64), cache, 0, meta, 0.125)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def first_call_times() -> list[tuple[str, float, float, float]]:
    """(state, import s, first write s, first attention s): with an empty numba cache
    (compiling) and again with the cache that run left (loading)."""
    import subprocess
    import sys
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        for state in ("cold (compile)", "warm (cached)"):
            got = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            rows.append((state, *map(float, got)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="smollm2,8b")
    ap.add_argument("--contexts", default="512,4096,16384")
    ap.add_argument("--reps", type=int, default=200, help="decode repetitions (median)")
    ap.add_argument("--prefill", type=int, default=4096, help="prompt tokens (0: skip)")
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--compile-time", action="store_true",
                    help="also time the first calls with an empty numba cache")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"threads: numba {get_num_threads()}, torch {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    bw = bandwidth()
    print(f"streaming read bandwidth: {bw / 1e9:.1f} GB/s\n")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        print(f"## {name}: {shape[0]} q heads, {shape[1]} kv heads, head dim {shape[2]}")
        print(f"{'context':>8} {'K/V':>10} {'path':>11} {'ms/layer':>9} {'floor ms':>9} "
              f"{'ratio':>6}")
        rows: list = []
        for ctx in map(int, args.contexts.split(",")):
            bench_decode(shape, ctx, args.reps, bw, rows)
        for ctx, label, path, t, floor in rows:
            print(f"{ctx:>8} {label:>10} {path:>11} {t * 1e3:>9.3f} {floor * 1e3:>9.3f} "
                  f"{t / floor:>6.2f}")
        if args.prefill:
            tf, ts, tw = bench_prefill(shape, args.prefill, args.prefill_reps)
            print(f"prefill {args.prefill}: fused q8_0 {tf * 1e3:.1f} ms, torch sdpa f32 "
                  f"{ts * 1e3:.1f} ms, ratio {tf / ts:.2f}; q8_0 cache write {tw * 1e3:.1f} ms")
        print()
    if args.compile_time:
        print("first call (numba cache empty, then filled): import / write / attention")
        for state, imp, write, attn in first_call_times():
            print(f"  {state:15} {imp:6.2f} s {write:6.2f} s {attn:6.2f} s")


if __name__ == "__main__":
    main()
