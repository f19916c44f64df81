"""Decode and prefill speed of the K/V coding (rotation, centering, lsq rounding) on vs off.

    python benchmarks/kv_speed.py                         # smollm2; q8_0,q4_0,q8_0/q4_0; 4,096
    python benchmarks/kv_speed.py --types q4_0 --length 4096 --decode 64

One engine per (cache type, coding) shares the model's weights; their steps run in turn,
so load from other processes falls on every row alike (as benchmarks/generate.py does).
Codings: "off" (rotation, centering off, ggml rounding: the plain cache), "rotation"
(rotation only, ggml rounding), "auto" (the default: rotation, key centering, lsq).
Decode tok/s is 1 / the median decode step; "cost" is the median step time over the
"off" row's of the same type, minus 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import interleaved, prompt_ids  # noqa: E402

from kvslim import LLM  # noqa: E402
from kvslim.codec import CodecSettings  # noqa: E402
from kvslim.engine import Engine  # noqa: E402

CODINGS = {
    "off": CodecSettings("off", "off", "ggml"),
    "rotation": CodecSettings("on", "off", "ggml"),
    "auto": CodecSettings(),
}


def measure(llm: LLM, rows: list[tuple[str, str, str]], ids: list[int], n_decode: int) -> dict:
    """{(k, v, coding): (prefill tok/s, median decode step s, best step s, attention s per
    layer kind)}, steps interleaved."""
    engines = {(k, v, coding): Engine(llm.model, llm.tokenizer, cache_type_k=k, cache_type_v=v,
                                      num_ctx=len(ids) + n_decode + 8, codec=CODINGS[coding])
               for k, v, coding in rows}
    return interleaved(engines, ids, n_decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--types", default="q8_0,q4_0,q8_0/q4_0", help="comma list; K/V pairs as k/v")
    ap.add_argument("--codings", default="off,rotation,auto", help=f"of {', '.join(CODINGS)}")
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens before decoding")
    ap.add_argument("--decode", type=int, default=64, help="decode steps timed per row")
    args = ap.parse_args()
    types = [(t.split("/") * 2)[:2] for t in args.types.split(",")]
    codings = args.codings.split(",")
    llm = LLM(args.model, num_ctx=64, device="cpu", progress=False)  # engines below
    ids = prompt_ids(llm, args.length)
    print(f"# {llm.config.name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}; prompt {args.length}, {args.decode} decode steps")
    got = measure(llm, [(k, v, c) for k, v in types for c in codings], ids, args.decode)
    print("| K/V | coding | prefill tok/s | decode tok/s | best step tok/s | decode cost vs off |")
    print("|---|---|---|---|---|---|")
    for (k, v, c), (prefill, med, best, _attn) in got.items():
        off = got.get((k, v, "off"))
        cost = f"{med / off[1] - 1:+.1%}" if off else "-"
        print(f"| {k}/{v} | {c} | {prefill:.1f} | {1 / med:.1f} | {1 / best:.1f} | {cost} |")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
