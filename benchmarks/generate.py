"""Prefill and decode tokens/s of a real model per K/V cache type and prompt length.

    python benchmarks/generate.py                      # smollm2, f16,q8_0,q4_0, 512,4096
    python benchmarks/generate.py --types q8_0 --lengths 4096 --decode 64 --profile
    python benchmarks/generate.py --weights quantized,dequantize --types q8_0   # both, in turn

Each row runs one request through an engine (the path `kvslim run` takes): a prompt of
L tokens of English prose prefilled in chunks, then greedy decoding. The types' engines
share the weights and step in turn, so machine load falls on all of them alike. Decode tok/s counts
only decode steps (the first token comes from the prefill). The floor column is what
one decode step must read (the weights as held + the K/V cache at that length) over the
streaming-read bandwidth measured in the same run. Numbers drift with machine load:
compare rows of one run, and note the load average printed at the top. Decode tok/s is
1 / the median decode step time. The attention columns are the median time a decode step
spends in one layer's attention, for the layers on a sliding window and for the global
ones: a windowed layer reads its window only, so its time should not grow with the prompt.
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import LLM  # noqa: E402
from kvslim.engine import Engine  # noqa: E402
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


def measure(llms: dict[str, LLM], types: list[tuple[str, str]], ids: list[int], n_decode: int) -> dict:
    """{(weights mode, k, v): (engine, prefill tok/s, median decode tok/s, best decode tok/s,
    {layer kind: attention s per decode step})} for one prompt; every engine of every model
    steps in turn."""
    engines = {(mode, k, v): Engine(llm.model, llm.tokenizer, cache_type_k=k, cache_type_v=v,
                                    num_ctx=len(ids) + n_decode + 8)
               for mode, llm in llms.items() for k, v in types}
    return {key: (engines[key], pre, 1 / med, 1 / best, attn)
            for key, (pre, med, best, attn) in interleaved(engines, ids, n_decode).items()}


def kv_read_bytes(e: Engine, n: int) -> int:
    """K/V bytes one decode step at context n reads: every position of the global layers,
    the last ``window`` of the windowed ones."""
    c = e.cache
    return sum(g.nbytes // (g.n_pages * c.page_size) * (min(n, g.window) if g.window else n)
               for g in c.groups)


def per_layer_us(e: Engine, attn: dict[str, float]) -> tuple[str, str]:
    """(windowed, global) attention microseconds per layer and decode step, '-' for none."""
    windows = e.model.layer_windows()
    n = {"window": sum(1 for w in windows if w), "global": sum(1 for w in windows if not w)}
    return tuple(f"{attn[k] / n[k] * 1e6:.0f}" if n[k] else "-" for k in ("window", "global"))


def time_attention(e: Engine) -> dict[str, float]:
    """Seconds ``e``'s attention spends in windowed and in global layers, summed as it runs
    (the backend's ``attend`` wrapped in place; on CPU, ``write_attend``, one job that
    writes the step's rows first and codes the queries: its time includes the cache write
    and the codec's query coding and output restore)."""
    spent = {"window": 0.0, "global": 0.0}
    backend = e.attn.backend

    def timed(fn):
        def run(*args, window=0, softcap=0.0):
            t0 = time.perf_counter()
            out = fn(*args, window=window, softcap=softcap)
            spent["window" if window else "global"] += time.perf_counter() - t0
            return out
        return run
    backend.attend = timed(backend.attend)
    if getattr(backend, "write_attend", None) is not None:
        backend.write_attend = timed(backend.write_attend)
    return spent


def interleaved(engines: dict, ids: list[int], n_decode: int) -> dict:
    """{key: (prefill tok/s, median decode step s, best decode step s, {layer kind: median
    s per decode step in that kind's attention})}: ``ids`` then ``n_decode`` greedy tokens
    on every engine (which share the model's weights).

    The engines' steps are interleaved round robin, so load from other processes falls on
    every row alike. Decode uses the median step time (a few steps stall behind other
    processes); the best step shows what the code costs when it has the cores.
    """
    params = SamplingParams(max_tokens=n_decode + 1, temperature=0, repeat_penalty=1.0,
                            ignore_eos=True)
    runs = {}
    for key, e in engines.items():
        e.add_request(ids[:64], SamplingParams(max_tokens=4))  # warm up (numba compiles once)
        while e.has_work():
            e.step()
        runs[key] = (e, e.add_request(ids, params), [0.0], [], time_attention(e), [])
    while any(e.has_work() for e, *_ in runs.values()):
        for e, seq, prefill, decode, spent, attn in runs.values():
            if e.has_work():
                decoding = seq.n_cached >= seq.n_prompt
                before = dict(spent)
                t = _timed(e.step)
                decode.append(t) if decoding else prefill.__setitem__(0, prefill[0] + t)
                if decoding:
                    attn.append({k: spent[k] - before[k] for k in spent})
    return {key: (len(ids) / pre[0], statistics.median(dec), min(dec),
                  {k: statistics.median(a[k] for a in attn) for k in spent})
            for key, (_, _, pre, dec, spent, attn) in runs.items()}


def profile_decode(e: Engine, ids: list[int], steps: int = 16) -> None:
    """torch.profiler table of decode steps after a prefill of ``ids``.

    The fused attention, the quantize-on-write, the quantized-weight matmuls, the
    row ops (norms, RoPE, SiLU) and a llama decode layer as one job run in numba,
    invisible to the profiler, so they are labelled here.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(fn, name):
        def run(*args, **kw):
            with record_function(name):
                return fn(*args, **kw)
        return run

    b = e.attn.backend
    b.attend, b.write = labelled(b.attend, "attention"), labelled(b.write, "cache write")
    if getattr(b, "write_attend", None) is not None:  # CPU: the two as one kernel job
        b.write_attend = labelled(b.write_attend, "cache write + attention + codec")
    from kvslim.kernels import qmatmul

    for name in ("gemv", "dequantize_rows"):  # the quantized weights' numba kernels
        setattr(qmatmul, name, labelled(getattr(qmatmul, name), f"weights {name}"))
    from kvslim.kernels import rowops

    for name in ("_norm_rows", "_add_norm_rows", "_rope_rows", "_silu_mul_rows"):
        setattr(rowops, name, labelled(getattr(rowops, name), f"rowops {name.strip('_')}"))
    from kvslim.models import fused

    # a decode step of a llama-family model on CPU: one job for every layer (models.fused)
    fused.step_job = labelled(fused.step_job, "decode step job (attention, matmuls, row ops)")
    seq = e.add_request(ids, SamplingParams(max_tokens=steps + 8, temperature=0,
                                            repeat_penalty=1.0, ignore_eos=True))
    while seq.n_generated < 4:
        e.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            e.step()
    e.cancel(seq)
    e.reap()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="f16,q8_0,q4_0", help="comma list; K/V pairs as k/v")
    ap.add_argument("--lengths", default="512,4096")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default="quantized",
                    help="quantized|dequantize, or both (comma list: the models step in turn)")
    ap.add_argument("--profile", action="store_true", help="also profile decode at the last length")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    types = [(t.split("/") * 2)[:2] for t in args.types.split(",")]

    llms = {mode: LLM(args.model, num_ctx=64, device=args.device, progress=False,  # engines below
                      weights=mode) for mode in args.weights.split(",")}
    llm = next(iter(llms.values()))
    bw = read_bandwidth()
    held = {mode: m.model.weight_bytes for mode, m in llms.items()}
    print(f"# {llm.config.name} on {llm.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; read bandwidth {bw / 1e9:.1f} GB/s; "
          + "; ".join(f"{mode} weights {b / 1e6:.0f} MB" for mode, b in held.items()))
    print(f"{'weights':<12}{'K/V':<11}{'backend':<9}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'best step':>11}{'floor tok/s':>13}{'median/floor':>14}"
          f"{'attn us/window layer':>22}{'attn us/global layer':>22}")
    for n in lengths:
        ids = prompt_ids(llm, n)
        for (mode, k, v), (e, prefill, decode, best, attn) in measure(
                llms, types, ids, args.decode).items():
            info = e.cache_info()
            floor = bw / (held[mode] + kv_read_bytes(e, n))
            name = f"{info['type_k']}/{info['type_v']}"
            win, glob = per_layer_us(e, attn)
            print(f"{mode:<12}{name:<11}{info['backend']:<9}{n:>7}{prefill:>15.1f}{decode:>14.1f}"
                  f"{best:>11.1f}{floor:>13.1f}{decode / floor:>14.0%}{win:>22}{glob:>22}",
                  flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    if args.profile:
        k, v = types[-1]
        profile_decode(Engine(llm.model, llm.tokenizer, cache_type_k=k, cache_type_v=v,
                              num_ctx=len(ids) + 32), ids)


if __name__ == "__main__":
    main()
