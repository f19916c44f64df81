"""Quantize / dequantize throughput per block format, beside the machine's copy bandwidth.

    python benchmarks/quant.py [--mib 64] [--repeat 5] [--threads N]

Throughput is GB/s of float32 values in (quantize) or out (dequantize); the copy
column is a float32 tensor copy of the same size timed in the same run (read + write
bytes / time), so the ratio is comparable across machines.

Two paths: ``formats.quantize`` / ``formats.dequantize`` (vectorised torch, byte-exact
with gguf, the API and the oracle) and the cache's write (``KVCache.write``: the fused
quantize-on-write a model step runs, numba on CPU, K and V rows of 8 heads x 128 into
reserved slots, ggml rounding, no codec). f32 dequantize is a reinterpretation of the
bytes (no copy), hence its figure.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvslim import formats
from kvslim.cache import KVCache
from kvslim.kernels import cpu_write


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="float32 MiB per call")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    n = args.mib * 2**20 // 4 // 64 * 64
    x = torch.randn(n // 64, 64)
    nbytes = x.numel() * 4
    dst = torch.empty_like(x)
    copy_s = timed(lambda: dst.copy_(x), args.repeat)
    copy_gbs = 2 * nbytes / copy_s / 1e9  # read + write

    print(f"{x.numel() / 1e6:.1f}M float32 values ({nbytes / 2**20:.0f} MiB), "
          f"{args.threads} threads, median of {args.repeat}")
    print(f"copy bandwidth (read+write): {copy_gbs:.1f} GB/s\n")
    print(f"{'type':8} {'B/value':>8} {'quantize GB/s':>14} {'dequantize GB/s':>16} "
          f"{'q / copy':>9} {'dq / copy':>10} {'cache write GB/s':>17} {'write / copy':>13}")
    for t in formats.TYPES:
        q = formats.quantize(x, t)
        qs = timed(lambda: formats.quantize(x, t), args.repeat)
        ds = timed(lambda: formats.dequantize(q, t), args.repeat)
        ws = cache_write_seconds(x, t, args.repeat)
        qg, dg, wg = nbytes / qs / 1e9, nbytes / ds / 1e9, nbytes / ws / 1e9
        print(f"{t:8} {formats.bytes_per_element(t):8.4f} {qg:14.2f} {dg:16.2f} "
              f"{qg / copy_gbs:9.3f} {dg / copy_gbs:10.3f} {wg:17.2f} {wg / copy_gbs:13.3f}")


def cache_write_seconds(x: torch.Tensor, t: str, repeat: int) -> float:
    """Median seconds of the CPU cache writer (kernels.cpu_write) storing all of x as K and
    V rows [n, 8, 128] of type t."""
    heads, dim = 8, 128
    n = x.numel() // (2 * heads * dim)
    k = x.reshape(-1)[:n * heads * dim].view(n, heads, dim)
    v = x.reshape(-1)[n * heads * dim:2 * n * heads * dim].view(n, heads, dim)
    cache = KVCache(1, heads, dim, -(-n // 64), page_size=64, cache_type_k=t, cache_type_v=t)
    slots = cache.reserve(cache.new_sequence(), n)
    return timed(lambda: cpu_write.write(cache, 0, slots, k, v), repeat)


if __name__ == "__main__":
    main()
