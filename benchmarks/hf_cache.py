"""kvslim's cache inside transformers beside transformers' own caches, in one run.

SmolLM2-135M as transformers loads it from the GGUF (float32), a prefill of --prefill
tokens of English prose (the Jargon File) then --decode steps one token at a time. Each
cache's next-token distributions are compared with DynamicCache's (KL divergence, top-1
agreement); the cache's bytes at the end and the decode rate are printed beside them.

    python benchmarks/hf_cache.py                       # SmolLM2, 512 + 256 tokens
    python benchmarks/hf_cache.py --prefill 128 --decode 32 --caches dynamic,kvslim:q8_0/q4_0

Caches: dynamic (transformers, float32), kvslim:K/V (``kvslim.hf.QuantizedKVCache``,
attention through kvslim's kernels; ``kvslim-deq:K/V`` dequantizes per layer for torch's
SDPA instead), quanto:N and hqq:N (transformers' ``QuantizedCache``, N bits; need
optimum-quanto / hqq), fp8 (transformers' fp8 ``QuantizedCache``). Bytes of
transformers' quantized caches count every tensor they hold (quantized data, scales,
zero points and the float residual of the last tokens).
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import torch

DEFAULT = "dynamic,kvslim:q8_0/q8_0,kvslim:q8_0/q4_0,kvslim:q4_0/q4_0,kvslim-deq:q8_0/q4_0," \
          "quanto:4,quanto:2,hqq:4,fp8"


def tensors_in(obj, seen: set[int], depth: int = 0) -> int:
    """Bytes of every distinct tensor reachable from ``obj`` (attributes, lists, dicts)."""
    if depth > 6 or obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        inner = [getattr(obj, n) for n in ("_data", "_scale", "_shift") if hasattr(obj, n)]
        if inner:  # a quanto tensor subclass (no storage of its own): its parts hold the bytes
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return sum(tensors_in(t, seen, depth + 1) for t in inner)
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensors_in(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(tensors_in(x, seen, depth + 1) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return sum(tensors_in(x, seen, depth + 1) for x in vars(obj).values())
    return 0


def cache_bytes(cache) -> int:
    if hasattr(cache, "bytes_used"):
        return cache.bytes_used  # kvslim: the pages holding tokens
    seen: set[int] = set()
    return sum(tensors_in(layer, seen) for layer in cache.layers)


def make_cache(spec: str, model):
    from transformers import DynamicCache, QuantizedCache

    kind, _, arg = spec.partition(":")
    if kind == "dynamic":
        return DynamicCache(config=model.config), "sdpa"
    if kind in ("kvslim", "kvslim-deq"):
        from kvslim.hf import QuantizedKVCache

        k, _, v = arg.partition("/")
        return QuantizedKVCache(model.config, k, v or k), "kvslim" if kind == "kvslim" else "sdpa"
    if kind in ("quanto", "hqq"):
        return QuantizedCache(kind, model.config, nbits=int(arg or 4)), "sdpa"
    if kind == "fp8":
        return QuantizedCache("fp8", model.config), "sdpa"
    raise SystemExit(f"unknown cache {spec!r}")


@torch.no_grad()
def run(model, cache, impl: str, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, float]:
    model.set_attn_implementation(impl)
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits[0, -1:]]
    t0 = time.perf_counter()
    for i in range(prefill, ids.shape[1] - 1):
        out.append(model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits[0])
    return torch.cat(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a .gguf transformers can load (default: the store's SmolLM2)")
    ap.add_argument("--text", default="/usr/share/doc/jargon-text/jargon.txt.gz")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--caches", default=DEFAULT)
    args = ap.parse_args()

    import transformers

    from kvslim import store
    from kvslim.gguf_loader import open_gguf
    from kvslim.tokenizer import Tokenizer

    path = Path(args.model) if args.model else store.resolve("smollm2", pull_missing=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    opener = gzip.open if args.text.endswith(".gz") else open
    with opener(args.text, "rt", encoding="utf-8") as f:
        text = f.read()[20000:20000 + 8 * (args.prefill + args.decode + 1)]
    ids = Tokenizer.from_gguf(open_gguf(path)).encode(text)[:args.prefill + args.decode + 1]
    ids = torch.tensor([ids])
    ref = None
    print(f"{path.name}, {ids.shape[1]} tokens: prefill {args.prefill}, decode {args.decode}")
    print(f"{'cache':<22}{'KLD vs dynamic':>15}{'top-1':>8}{'bytes':>14}{'vs dynamic':>11}{'decode tok/s':>14}")
    base = None
    for spec in args.caches.split(","):
        try:
            cache, impl = make_cache(spec, model)
            logits, secs = run(model, cache, impl, ids, args.prefill)
        except Exception as e:  # a backend that is not installed: say so, go on
            print(f"{spec:<22}unavailable: {type(e).__name__}: {str(e)[:80]}")
            continue
        if ref is None:
            ref = logits
        lp, lq = ref.log_softmax(-1), logits.log_softmax(-1)
        kld = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == logits.argmax(-1)).float().mean().item()
        nbytes = cache_bytes(cache)
        base = base or nbytes
        print(f"{spec:<22}{kld:>15.5f}{top1:>8.2%}{nbytes:>14,}{nbytes / base:>11.3f}"
              f"{args.decode / secs:>14.1f}")


if __name__ == "__main__":
    main()
