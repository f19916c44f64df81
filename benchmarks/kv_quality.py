"""KL divergence from the f16 cache per K/V type and coding, on several texts.

    python benchmarks/kv_quality.py --texts jargon=/usr/share/doc/jargon-text/jargon.txt.gz,austen=/tmp/pride.txt
    python benchmarks/kv_quality.py --types q4_0 --codings off,rotation,auto --chunks 1

Scored exactly as ``kvslim bench`` scores (kvslim.bench: chunks of --ctx tokens from the
start of the text, BOS first, the second half of each chunk scored, KL over the whole
vocabulary in float32), with one f16-cache pass per chunk shared by every row. Codings
are kvslim's settings (``CodecSettings``) plus variants built here for the record:

    off          no rotation, no centering, ggml rounding (the plain cache)
    rotation     Hadamard rotation only
    rot+lsq      rotation, least-squares scales
    rot+center   rotation, key centering
    auto         the default: rotation, key centering, least-squares scales
    auto+vcenter auto with the values centered too (kv_centering=on)
    auto+signs   auto with a random-sign diagonal in the rotation (variant)
    center+lsq   no rotation; key centering, least-squares scales
    auto-vlsq    auto with ggml rounding on V (lsq on K only; variant)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import LLM, bench  # noqa: E402
from kvslim.codec import CodecSettings, KVCodec  # noqa: E402
from kvslim.engine import Engine  # noqa: E402
from kvslim.rotation import Rotation  # noqa: E402

SETTINGS = {
    "off": CodecSettings("off", "off", "ggml"),
    "rotation": CodecSettings("auto", "off", "ggml"),
    "rot+lsq": CodecSettings("auto", "off", "lsq"),
    "rot+center": CodecSettings("auto", "auto", "ggml"),
    "auto": CodecSettings(),
    "auto+vcenter": CodecSettings("auto", "on", "auto"),
    "center+lsq": CodecSettings("off", "auto", "auto"),
}


def _variant(name: str, c: KVCodec) -> KVCodec:
    """A variant of the auto codec ``c`` that kvslim does not offer as a setting."""
    if name == "auto+signs":  # R = H S with a seeded random-sign diagonal S per side
        signs = lambda seed: Rotation.make(c.rotation_k.dim, random_signs=True, seed=seed)  # noqa: E731
        return KVCodec(c.n_heads, signs(1), signs(2), c.mu_k, c.mu_v, c.rounding_k, c.rounding_v)
    if name == "auto-vlsq":
        return KVCodec(c.n_heads, c.rotation_k, c.rotation_v, c.mu_k, c.mu_v, c.rounding_k, "ggml")
    raise ValueError(f"unknown coding {name!r}")


def engine(llm: LLM, k: str, v: str, coding: str, ctx: int) -> Engine:
    base = SETTINGS.get(coding, SETTINGS["auto"])
    e = Engine(llm.model, llm.tokenizer, cache_type_k=k, cache_type_v=v, num_ctx=ctx, codec=base)
    if coding not in SETTINGS:
        c = e.cache
        e.cache = llm.model.new_cache(c.n_pages, c.page_size, k, v, codec=_variant(coding, c.codec))
    return e


def logprobs(e: Engine, chunk: list[int]) -> torch.Tensor:
    return torch.log_softmax(e.score(chunk)[bench.scored_span(len(chunk))].float(), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--texts", default=f"jargon={bench.DEFAULT_TEXT}", help="name=FILE,...")
    ap.add_argument("--types", default="q4_0,q8_0/q4_0,q8_0", help="comma list; K/V pairs as k/v")
    ap.add_argument("--codings", default="off,rotation,rot+center,auto")
    ap.add_argument("--ctx", type=int, default=bench.DEFAULT_CTX)
    ap.add_argument("--chunks", type=int, default=bench.DEFAULT_CHUNKS)
    args = ap.parse_args()
    texts = dict(t.split("=", 1) for t in args.texts.split(","))
    types = [tuple((t.split("/") * 2)[:2]) for t in args.types.split(",")]
    codings = args.codings.split(",")
    llm = LLM(args.model, num_ctx=64, device="cpu", progress=False)
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    print(f"# {llm.config.name}; ctx {args.ctx}, {args.chunks} chunks per text; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    t0 = time.time()
    for tname, path in texts.items():
        ids = llm.tokenize(bench.load_text(path))
        for chunk in bench.chunk_tokens(ids, args.ctx, args.chunks, bos):
            ref = logprobs(Engine(llm.model, llm.tokenizer, num_ctx=args.ctx,
                                  codec=SETTINGS["off"]), chunk)
            targets = bench._targets(chunk)
            for k, v in types:
                for coding in codings:
                    lp = logprobs(engine(llm, k, v, coding, args.ctx), chunk)
                    results.setdefault((tname, k, v, coding), bench.Scores()).add(
                        *bench.token_stats(ref, lp, targets))
        print(f"# {tname} done after {time.time() - t0:.0f} s", flush=True)
    print("| K/V | coding | " + " | ".join(f"{t} KLD | {t} top-1" for t in texts) + " |")
    print("|---|---|" + "---|---|" * len(texts))
    for k, v in types:
        for coding in codings:
            cells = []
            for t in texts:
                s = results[(t, k, v, coding)].summary()
                cells += [f"{s['kld']:.5f}", f"{100 * s['top1']:.2f}%"]
            print(f"| {k}/{v} | {coding} | " + " | ".join(cells) + " |")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
