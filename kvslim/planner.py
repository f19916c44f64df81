"""`kvslim plan`: what fits in a memory budget, per K/V cache type, from GGUF metadata alone.

Nothing here dequantizes or even reads the weights: the weight bytes are the sum of
the tensors' stored sizes, and the K/V bytes are exact ggml block sizes (q8_0 is 34
bytes per 32 values, not Ollama's 1 byte per value). The cache allocates whole pages
of `page_size` tokens per sequence, so every figure is rounded to pages the way
`kvslim.cache.KVCache` allocates them; `kv_bytes` equals the `nbytes` of such a cache.

Layers on a sliding window (gemma) hold only their window (plus a prefill chunk of
`chunk` tokens) per sequence: a fixed cost per sequence (`window_bytes`), beside the
global layers' bytes per token of context (`kv_bytes_per_token`).
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Iterable, Sequence

import gguf

from kvslim.units import parse_memory

# formats, cache, attention and gguf_loader import torch: they are imported where used, so that
# registering `kvslim plan` (every `kvslim` call does, kvslim.cli.PLUGINS) stays light.
if TYPE_CHECKING:
    from kvslim.gguf_loader import ModelConfig

TypePair = tuple[str, str]

DEFAULT_TYPES: tuple[TypePair, ...] = (
    ("f16", "f16"), ("q8_0", "q8_0"), ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"),
    ("q8_0", "q4_0"), ("q5_0", "q5_0"), ("q4_0", "q4_0"), ("iq4_nl", "iq4_nl"),
)

# ---------------------------------------------------------------------------
# Cache types


def parse_type_pair(spec: str | Sequence[str]) -> TypePair:
    """ "q8_0" -> (q8_0, q8_0); "q8_0/q4_0" -> K q8_0, V q4_0; ValueError lists valid types."""
    from kvslim import formats
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("/")]
        if len(parts) == 1:
            parts *= 2
    else:
        parts = list(spec)
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"bad cache type {spec!r}: expected TYPE or K_TYPE/V_TYPE, like q8_0 or q8_0/q4_0")
    k, v = (formats.get_format(p).name for p in parts)  # get_format's error lists the valid types
    return k, v


def parse_types(spec: str | Iterable[str | Sequence[str]]) -> list[TypePair]:
    """ "f16,q8_0,q8_0/q4_0" (or a list of such items or pairs) -> [(k, v), ...], duplicates dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    pairs = [parse_type_pair(it) for it in items if not (isinstance(it, str) and not it.strip())]
    if not pairs:
        raise ValueError("no cache types given")
    return list(dict.fromkeys(pairs))


def pair_name(k: str, v: str) -> str:
    return f"{k}/{v}"


def effective_types(config: ModelConfig, type_k: str, type_v: str) -> tuple[str, str, str | None]:
    """(k, v, reason): block types become f16 when 32 does not divide the head dims
    (``kvslim.attention.head_dim_fallback``, the rule ``plan_attention`` applies). The
    rule that depends on the device (no fused kernel -> f16 V) is left out: a plan is
    made for any machine."""
    from kvslim.attention import head_dim_fallback

    return head_dim_fallback(config.head_dim, config.v_head_dim, type_k, type_v)


# ---------------------------------------------------------------------------
# Arithmetic


def _row_bytes(dim: int, type: str) -> int:
    """Bytes of one head's row of `dim` values."""
    from kvslim import formats
    n = dim * formats.block_bytes(type)
    if n % formats.QK:  # only float types can hold a dim that 32 does not divide
        raise ValueError(f"{type} cannot store rows of {dim} values: 32 does not divide {dim}")
    return n // formats.QK


def _layer_bytes_per_token(config: ModelConfig, type_k: str, type_v: str) -> int:
    return config.n_kv_heads * (_row_bytes(config.head_dim, type_k)
                                + _row_bytes(config.v_head_dim, type_v))


def kv_bytes_per_token(config: ModelConfig, type_k: str, type_v: str) -> int:
    """global layers x n_kv_heads x (head_dim x bpe(k) + v_head_dim x bpe(v)), exact: what
    one more token of context costs (every layer when none is on a sliding window)."""
    n_global = sum(1 for i in range(config.n_layers) if not config.layer_window(i))
    return n_global * _layer_bytes_per_token(config, type_k, type_v)


def default_chunk() -> int:
    """Prompt rows one sequence feeds per step (``kvslim.engine.DEFAULT_BATCH_TOKENS``)."""
    from kvslim.engine import DEFAULT_BATCH_TOKENS

    return DEFAULT_BATCH_TOKENS


def window_bytes(config: ModelConfig, ctx: int, type_k: str, type_v: str,
                 page_size: int | None = None, chunk: int | None = None) -> int:
    """Bytes the layers on a sliding window hold for one sequence of up to ``ctx`` tokens,
    whole pages (``kvslim.cache.window_pages``): at most window + chunk tokens each,
    whatever ``ctx``; 0 for a model without windows."""
    from kvslim.cache import window_pages

    page_size, chunk = page_size or default_page_size(), chunk or default_chunk()
    per = _layer_bytes_per_token(config, type_k, type_v) * page_size
    return sum(per * window_pages(w, page_size, ctx, chunk)
               for w in (config.layer_window(i) for i in range(config.n_layers)) if w)


def pages_for(ctx: int, page_size: int) -> int:
    return -(-ctx // page_size)


def default_page_size() -> int:
    """The cache's page (``kvslim.cache.DEFAULT_PAGE_SIZE``), read when a plan needs it."""
    from kvslim.cache import DEFAULT_PAGE_SIZE

    return DEFAULT_PAGE_SIZE


def kv_bytes(config: ModelConfig, ctx: int, parallel: int = 1, type_k: str = "f16", type_v: str = "f16",
             page_size: int | None = None) -> int:
    """Bytes of a cache for `parallel` sequences of `ctx` tokens, whole pages each.

    Equals the `nbytes` of the pool an engine builds for them (`parallel` x
    ceil(ctx / page_size) pages of the global layers, `parallel` x `window_bytes` for the
    windowed ones). Types are taken as given: apply `effective_types` first to account
    for the f16 fallback.
    """
    page_size = page_size or default_page_size()
    if ctx < 0 or parallel <= 0 or page_size <= 0:
        raise ValueError(f"need ctx >= 0, parallel > 0, page_size > 0; got {ctx}, {parallel}, {page_size}")
    tokens = parallel * pages_for(ctx, page_size) * page_size
    return (tokens * kv_bytes_per_token(config, type_k, type_v)
            + parallel * window_bytes(config, ctx, type_k, type_v, page_size))


def max_ctx(config: ModelConfig, budget: int, parallel: int, type_k: str, type_v: str,
            page_size: int | None = None) -> tuple[int, bool]:
    """(largest whole-page context per sequence whose cache fits in `budget` bytes, capped?).

    Capped at the model's context_length; the bool says the cap, not memory, decided.
    Windowed layers cost their pages up to the window's, then nothing more per token.
    """
    page_size = page_size or default_page_size()
    page_bytes = page_size * kv_bytes_per_token(config, type_k, type_v)
    top = config.context_length
    fits = lambda n: kv_bytes(config, n * page_size, parallel, type_k, type_v, page_size) <= budget  # noqa: E731
    # the windowed layers' pages stop growing at the window's: past it, each page of
    # context costs page_bytes per sequence
    full = window_full_pages(config, page_size)
    if fits(full) and page_bytes:
        n = full + (max(budget, 0) - kv_bytes(config, full * page_size, parallel, type_k, type_v,
                                               page_size)) // (parallel * page_bytes)
    elif fits(full):
        n = pages_for(top, page_size)  # every layer on a window: memory never decides
    else:
        n = _largest(fits, full)
    ctx = n * page_size
    if ctx > top:
        return top, True
    return ctx, False


def window_full_pages(config: ModelConfig, page_size: int) -> int:
    """Pages of context past which a sequence's windowed layers hold no more (0 without)."""
    from kvslim.cache import window_pages as pages

    chunk = default_chunk()
    return max([pages(config.layer_window(i), page_size, 1 << 40, chunk)
                for i in range(config.n_layers) if config.layer_window(i)] + [0])


def _largest(fits, hi: int) -> int:
    """The largest n in [0, hi) with fits(n) (fits is monotone, fits(0) assumed)."""
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------
# The plan


def load_plan_config(model: str | os.PathLike | ModelConfig | gguf.GGUFReader) -> tuple[ModelConfig, str]:
    """(config, model label) from a path, an open reader or a config."""
    from kvslim.gguf_loader import ModelConfig, open_gguf

    if isinstance(model, ModelConfig):
        return model, model.name or model.path or model.arch
    if isinstance(model, gguf.GGUFReader):
        config = ModelConfig.from_gguf(model)
        return config, config.path or config.name
    return ModelConfig.from_gguf(open_gguf(model)), str(model)


def plan(
    model: str | os.PathLike | ModelConfig | gguf.GGUFReader,
    memory: str | int,
    parallel: int = 1,
    ctx: int | None = None,
    types: str | Iterable = DEFAULT_TYPES,
    page_size: int | None = None,
    weights: str = "quantized",
    replicas: int = 1,
    quality: dict[str, float] | None = None,
    max_kld: float | None = None,
) -> dict:
    """Memory plan as a JSON-ready dict (the shape of issue 5; extra keys are additive).

    `replicas` (``kvslim serve --ray``): the budget is divided between that many replicas,
    each holding its own weights and pool; `parallel` and the figures are per replica.

    `ctx` (tokens per sequence, default the model's context length) sets bytes_at_ctx;
    `memory` covers the weights plus the cache (activations are not counted). `weights`:
    the weight mode of a CPU model ("quantized": the GGUF blocks as stored;
    "dequantize": float32), whose bytes as held count. With ``max_kld`` and a measured
    ``quality`` table ({"k/v": KLD vs f16}, ``calibration.quality_table``), "auto" says
    which pair ``--kv-cache-type auto`` takes: the best quality within max_kld whose
    cache at ``ctx`` x ``parallel`` fits, or that none does.
    """
    config, label = load_plan_config(model)
    memory = parse_memory(memory)
    page_size = page_size or default_page_size()
    if parallel <= 0:
        raise ValueError(f"parallel must be positive, got {parallel}")
    if replicas <= 0:
        raise ValueError(f"replicas must be positive, got {replicas}")
    total, memory = memory, memory // replicas
    ctx = config.context_length if ctx is None else ctx
    if not 0 < ctx <= config.context_length:
        raise ValueError(f"ctx must be between 1 and the model's context length {config.context_length}, got {ctx}")
    if weights not in ("quantized", "dequantize"):
        raise ValueError(f"unknown weights mode '{weights}' (choose from quantized, dequantize)")
    held = config.held_weight_bytes(weights)
    budget = memory - held
    out = {
        "model": label,
        "weights": weights,
        "weights_bytes": held,
        "memory": memory,
        "parallel": parallel,
        "ctx": ctx,
        "context_length": config.context_length,
        "page_size": page_size,
        "weights_fit": budget > 0,
        "types": {},
    }
    if replicas > 1:  # memory above is each replica's share of memory_total
        out |= {"replicas": replicas, "memory_total": total}
    for k, v in parse_types(types):
        out["types"][pair_name(k, v)] = _plan_type(config, held, k, v, budget, parallel, ctx,
                                                   page_size)
    if max_kld is not None:
        out["auto"] = _plan_auto(config, quality or {}, max_kld, held, budget, parallel, ctx,
                                 page_size)
    return out


def _plan_auto(config: ModelConfig, quality: dict[str, float], max_kld: float, held: int,
               budget: int, parallel: int, ctx: int, page_size: int) -> dict:
    from kvslim.autotype import NothingFits, choose_auto

    tokens = parallel * pages_for(ctx, page_size) * page_size
    out = {"max_kld": max_kld, "measured": quality}
    try:
        c = choose_auto(quality, max_kld, lambda k, v: kv_bytes_per_token(config, k, v),
                        max(budget, 0) // tokens)
    except NothingFits as e:
        return {**out, "fits": False, "answer": str(e)}
    at_ctx = kv_bytes(config, ctx, parallel, c.type_k, c.type_v, page_size)
    return {**out, "fits": True, "k": c.type_k, "v": c.type_v, "kld": c.kld,
            "kv_bytes_per_token": c.bytes_per_token, "bytes_at_ctx": at_ctx,
            "total_bytes_at_ctx": held + at_ctx}


def _plan_type(config: ModelConfig, held: int, k: str, v: str, budget: int, parallel: int, ctx: int,
               page_size: int) -> dict:
    ek, ev, reason = effective_types(config, k, v)
    fit_ctx, capped = max_ctx(config, budget, parallel, ek, ev, page_size)
    at_ctx = kv_bytes(config, ctx, parallel, ek, ev, page_size)
    return {
        "k": k,
        "v": v,
        "effective_k": ek,
        "effective_v": ev,
        "fallback": reason,
        "kv_bytes_per_token": kv_bytes_per_token(config, ek, ev),
        "window_bytes_per_sequence": window_bytes(config, ctx, ek, ev, page_size),
        "max_ctx": fit_ctx,
        "max_ctx_capped": capped,  # True: the model's context length, not memory, is the limit
        "bytes_at_ctx": at_ctx,  # K/V cache only
        "total_bytes_at_ctx": held + at_ctx,
        "fits_at_ctx": at_ctx <= budget,
    }


# ---------------------------------------------------------------------------
# `kvslim plan`


def cli_register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="what fits in a memory budget, per K/V cache type (metadata only)")
    p.add_argument("model", help="built-in name (smollm2, if pulled) or path to a .gguf; weights are not read")
    p.add_argument("--memory", required=True, metavar="SIZE",
                   help="budget for weights + K/V cache: 8GiB, 8GB, 8192MiB, 512M, ...")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="sequences at once; each gets the context (default 1)")
    p.add_argument("--ctx", type=int, metavar="N", help="context per sequence for the 'at --ctx' figures "
                                                       "(default: the model's context length)")
    p.add_argument("--types", default=",".join(pair_name(*t) for t in DEFAULT_TYPES),
                   help="comma-separated TYPE or K/V pairs (default: %(default)s)")
    p.add_argument("--weights", choices=("quantized", "dequantize"), default="quantized",
                   help="count the weights as a CPU model holds them: GGUF blocks as stored "
                        "(default) or dequantized to float32")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="divide --memory between N replicas (kvslim serve --ray), each with its "
                        "own weights and K/V pool; the figures are per replica (default 1)")
    p.add_argument("--kv-max-kld", metavar="X",
                   help="also say which pair --kv-cache-type auto takes within this KLD vs f16 "
                        "and the budget (loads the model to measure it once, then reads it back)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def _measured_quality(path) -> dict[str, float]:
    """The model's quality table (calibration.quality_table): measured on first use with
    the default coding and flash attention, then read back from beside the store."""
    from kvslim import calibration, models
    from kvslim.gguf_loader import ModelConfig, open_gguf
    from kvslim.settings import (compute_dtype, pick_device, resolve_codec,
                                 resolve_flash_attn)
    from kvslim.tokenizer import Tokenizer

    reader = open_gguf(path)
    device = pick_device("auto")
    model = models.load_model(reader, ModelConfig.from_gguf(reader), device,
                              compute_dtype(device), progress=False)
    return calibration.quality_table(model, Tokenizer.from_gguf(reader), resolve_codec(),
                                     resolve_flash_attn())


def cmd_plan(args) -> int:
    import json

    from kvslim import store

    from kvslim.autotype import parse_max_kld

    path = store.resolve(args.model)  # never pulls: a plan comes before any download
    max_kld = parse_max_kld(args.kv_max_kld) if args.kv_max_kld is not None else None
    plan(path, args.memory, parallel=args.parallel, ctx=args.ctx, types=args.types,
         weights=args.weights)  # bad arguments fail before the model is loaded
    quality = _measured_quality(path) if max_kld is not None else None
    result = plan(path, args.memory, parallel=args.parallel, ctx=args.ctx, types=args.types,
                  weights=args.weights, replicas=args.replicas, quality=quality, max_kld=max_kld)
    result["model"] = str(args.model)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_plan(result)
    return 0


def _print_plan(p: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    n, ctx = p["parallel"], p["ctx"]
    seqs = f" x {n} sequences" if n > 1 else ""
    share = f" (each of {p['replicas']} replicas of {_gib(p['memory_total'])})" if "replicas" in p else ""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False,
              title=f"{p['model']}: {_gib(p['memory'])}{share} for weights ({_gib(p['weights_bytes'])}, "
                    f"{p['weights']}) and K/V cache{seqs}",
              caption=f"exact block sizes, whole pages of {p['page_size']} tokens; "
                      f"model context length {p['context_length']:,}")
    for h in ("K/V", "stored as", "weights", "KV bytes/token", f"max context{seqs}",
              f"KV at {ctx:,}{seqs}", f"total at {ctx:,}"):
        t.add_column(h, justify="left" if h in ("K/V", "stored as") else "right")
    for name, r in p["types"].items():
        fit = "does not fit" if not p["weights_fit"] or r["max_ctx"] == 0 else \
            f"{r['max_ctx']:,}" + (" (model max)" if r["max_ctx_capped"] else "")
        total = _gib(r["total_bytes_at_ctx"]) + ("" if r["fits_at_ctx"] else " (over)")
        t.add_row(name, f"{r['effective_k']}/{r['effective_v']}", _gib(p["weights_bytes"]),
                  f"{r['kv_bytes_per_token']:,}", fit, _gib(r["bytes_at_ctx"]), total)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(t)
    fixed = [f"{name} {_gib(r['window_bytes_per_sequence'])}" for name, r in p["types"].items()
             if r["window_bytes_per_sequence"]]
    if fixed:
        console.print("KV bytes/token counts the global layers; the layers on a sliding window "
                      "hold a fixed amount per sequence, whatever its length: " + ", ".join(fixed))
    for name, r in p["types"].items():
        if r["fallback"]:
            console.print(f"{name}: stored as {r['effective_k']}/{r['effective_v']}: {r['fallback']}")
    if not p["weights_fit"]:
        console.print(f"the weights alone ({_gib(p['weights_bytes'])}) exceed {_gib(p['memory'])}")
    a = p.get("auto")
    if a is not None:
        head = f"auto (KLD vs f16 at most {a['max_kld']:g}, {ctx:,}{seqs}): "
        if a["fits"]:
            console.print(head + f"K {a['k']} / V {a['v']}, measured KLD {a['kld']:.5f}, "
                                 f"{a['kv_bytes_per_token']:,} B/token, KV {_gib(a['bytes_at_ctx'])}, "
                                 f"total {_gib(a['total_bytes_at_ctx'])}")
        else:
            console.print(head + a["answer"])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
