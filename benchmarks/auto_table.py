"""What `--kv-cache-type auto` measures: the quality table of a model (KLD vs an f16 cache
of every candidate pair on the calibration text), how long measuring it takes against one
f16 forward over the same text (the ratio holds on a shared machine), and the pair auto
picks at a few budgets. Nothing is read from or written to the store.

    python benchmarks/auto_table.py                  # SmolLM2, default coding
    python benchmarks/auto_table.py --model path/to/model.gguf --kv-rotation off
"""
from __future__ import annotations

import argparse
import time

import torch

from kvslim import calibration, models, store
from kvslim.autotype import choose_auto
from kvslim.cache import KVCache
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.settings import resolve_codec
from kvslim.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--kv-rotation")
    p.add_argument("--budgets", default="0.001,0.003,0.005,0.01,0.02")
    args = p.parse_args()
    reader = open_gguf(store.resolve(args.model, pull_missing=True))
    model = models.load_model(reader, ModelConfig.from_gguf(reader), torch.device("cpu"),
                              torch.float32, progress=False)
    tok = Tokenizer.from_gguf(reader)
    codec = resolve_codec(args.kv_rotation, env={})
    ids = calibration.calibration_ids(model, tok)
    calibration._all_logits(model, ids, "f16", "f16", "auto", None)  # warm: compiled kernels
    t0 = time.perf_counter()
    calibration._all_logits(model, ids, "f16", "f16", "auto", None)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = calibration._measure_table(model, tok, ids, codec, "auto", calibration.AUTO_CANDIDATES,
                                       False)
    took = time.perf_counter() - t0
    per = lambda k, v: KVCache.bytes_per_token(model.n_layers, model.n_kv_heads,  # noqa: E731
                                               model.cache_head_dim, k, v)
    print(f"{args.model}: {len(ids)} calibration tokens, coding {codec}")
    print(f"measuring {len(table)} pairs: {took:.1f} s = {took / one:.1f} f16 forwards "
          f"({one:.2f} s each), calibration forwards included\n")
    print(f"| K/V | bytes/token | KLD vs f16 |\n|---|---|---|")
    for name, kld in sorted(table.items(), key=lambda kv: per(*kv[0].split("/"))):
        print(f"| {name} | {int(per(*name.split('/'))):,} | {kld:.5f} |")
    print()
    for b in (float(x) for x in args.budgets.split(",")):
        c = choose_auto(table, b, per)
        print(f"kv_max_kld {b:g}: K {c.type_k} / V {c.type_v} (KLD {c.kld:.5f}, "
              f"{c.bytes_per_token:,} B/token)")


if __name__ == "__main__":
    main()
