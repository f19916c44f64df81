"""The ``kvslim`` command: Ollama's verbs with llama.cpp's cache flags.

    kvslim run MODEL [PROMPT]     answer once, or chat interactively (kvslim.repl; /bye exits);
                                  the client of a running `kvslim serve` when there is one
    kvslim pull MODEL | list | show MODEL | rm MODEL | cp SRC DST | create NAME -f Modelfile
    kvslim ps | stop MODEL | warmup
    kvslim cache-prompt MODEL -f FILE -o FILE.kvc    save a prompt's K/V cache for `run --prompt-cache`

Other modules add verbs: a module named in ``PLUGINS`` that defines
``cli_register(subparsers)`` adds its parser there (``add_parser``, its arguments, and
``set_defaults(func=handler)``; ``handler(args) -> int``). It can reuse
``add_model_args`` / ``add_sampling_args`` and ``llm_kwargs`` / ``sampling_options``.
Keep such a module's top-level imports light: every ``kvslim`` call imports it.

Bad input (a missing or corrupt GGUF, an unknown model or cache type, a prompt longer
than the context, a failed pull) prints one ``Error: ...`` line to stderr and exits 1.
``KVSLIM_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time

__all__ = ["main", "build_parser", "add_model_args", "add_sampling_args", "llm_kwargs",
           "sampling_options", "PLUGINS"]

# Modules that may add verbs (serve, bench, plan ...); absent ones are skipped.
PLUGINS = ("kvslim.server", "kvslim.bench", "kvslim.planner")

EPILOG = ("environment: KVSLIM_KV_CACHE_TYPE (K and V type), KVSLIM_FLASH_ATTENTION (1/0/auto), "
          "KVSLIM_CONTEXT_LENGTH (default num_ctx), KVSLIM_KV_ROTATION / KVSLIM_KV_CENTERING "
          "(auto/on/off), KVSLIM_KV_ROUNDING (auto/lsq/ggml), KVSLIM_MODELS (model store), "
          "KVSLIM_HOST / OLLAMA_HOST (where `kvslim serve` listens: run, ps and stop use it)")


# ---------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Cache type, flash attention, device and context flags (as llama.cpp / Ollama name them)."""
    g = p.add_argument_group("model and K/V cache")
    g.add_argument("--kv-cache-type", metavar="T",
                   help="K and V cache type: f16, q8_0, q4_0, fp8_e4m3, ..., or auto: the smallest "
                        "within --kv-max-kld (env KVSLIM_KV_CACHE_TYPE; default f16)")
    g.add_argument("--kv-max-kld", metavar="X",
                   help="for --kv-cache-type auto: the largest KLD vs an f16 cache allowed, "
                        "measured once per model (env KVSLIM_KV_MAX_KLD; default 0.005)")
    g.add_argument("--cache-type-k", "-ctk", metavar="T", help="K cache type (overrides --kv-cache-type)")
    g.add_argument("--cache-type-v", "-ctv", metavar="T", help="V cache type (overrides --kv-cache-type)")
    g.add_argument("--flash-attn", "-fa", metavar="MODE",
                   help="auto|on|off (env KVSLIM_FLASH_ATTENTION; a quantized V needs it)")
    g.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: cuda > mps > cpu)")
    g.add_argument("--weights", metavar="MODE",
                   help="quantized|dequantize: keep the GGUF weight blocks as stored (default; "
                        "CPU) or expand them to float at load (env KVSLIM_WEIGHTS)")
    g.add_argument("--num-ctx", "-c", type=int, metavar="N",
                   help="context length (env KVSLIM_CONTEXT_LENGTH; default 4096, at most the model's)")
    g.add_argument("--kv-rotation", metavar="MODE",
                   help="auto|on|off: Hadamard rotation of K/V rows before quantizing (env "
                        "KVSLIM_KV_ROTATION; auto: on for block-quantized types when head_dim "
                        "is a multiple of 64)")
    g.add_argument("--kv-centering", metavar="MODE",
                   help="auto|on|off: store keys minus the model's mean key (exact; env "
                        "KVSLIM_KV_CENTERING; auto: keys of a block-quantized K; on: K and V)")
    g.add_argument("--kv-rounding", metavar="MODE",
                   help="auto|lsq|ggml: least-squares block scales or llama.cpp's (env "
                        "KVSLIM_KV_ROUNDING; auto: lsq)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (Ollama defaults when omitted)")
    g.add_argument("--temperature", "--temp", type=float, help="0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, help="default 40; 0 turns it off")
    g.add_argument("--top-p", type=float, help="default 0.9")
    g.add_argument("--min-p", type=float, help="default 0.0")
    g.add_argument("--repeat-penalty", type=float, help="default 1.1")
    g.add_argument("--repeat-last-n", type=int, help="default 64")
    g.add_argument("--seed", type=int, help="random seed (default random)")
    g.add_argument("--num-predict", "-n", type=int, dest="max_tokens", metavar="N",
                   help="maximum tokens to generate (default: until EOS or the context is full)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")


def llm_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of ``kvslim.LLM`` from ``add_model_args`` flags."""
    return dict(kv_cache_type=args.kv_cache_type, cache_type_k=args.cache_type_k,
                cache_type_v=args.cache_type_v, flash_attn=args.flash_attn, device=args.device,
                num_ctx=args.num_ctx, kv_rotation=args.kv_rotation,
                kv_centering=args.kv_centering, kv_rounding=args.kv_rounding,
                weights=args.weights, kv_max_kld=args.kv_max_kld)


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags that were given (omitted ones keep the defaults)."""
    names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed",
             "max_tokens", "stop")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---------------------------------------------------------------- verbs


def cmd_pull(args) -> int:
    from kvslim import store
    from kvslim.pull import pull

    if args.verify:
        print(f"verified: {store.verify(args.model)}")
        return 0
    with _PullProgress() as progress:
        path = pull(args.model, progress.line)
    print(f"success: {path}")
    return 0


class _PullProgress:
    """Ollama's pull output from its progress lines, on a terminal (stderr): each status
    once, and a byte bar per blob. Elsewhere only the result (or one error line)."""

    def __init__(self):
        self.bars, self.last, self.tty = {}, None, sys.stderr.isatty()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for bar in self.bars.values():
            bar.close()
        return False

    def line(self, line: dict) -> None:
        from tqdm import tqdm

        if not self.tty:
            return
        status, total = line.get("status", ""), line.get("total")
        if total is None or "completed" not in line:
            if status != self.last and status != "success":
                print(status, file=sys.stderr)
            self.last = status
            return
        key = line.get("digest") or status
        bar = self.bars.get(key)
        if bar is None:
            bar = self.bars[key] = tqdm(total=total, unit="B", unit_scale=True, desc=status,
                                        leave=True)
        bar.update(line["completed"] - bar.n)


def cmd_rm(args) -> int:
    from kvslim import store

    for name in args.model:
        store.remove(name)
        print(f"deleted '{name}'")
    return 0


def cmd_cp(args) -> int:
    from kvslim import store

    store.copy_model(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_create(args) -> int:
    from pathlib import Path

    from kvslim import modelfile

    path = Path(args.file).expanduser()
    text = path.read_text()
    modelfile.create(args.model, modelfile.parse(text), base=path.parent)
    print("success")
    return 0


def _show_card(args) -> bool:
    """``show --modelfile|--parameters|--template|--license|--system``: print it; whether asked."""
    from kvslim import modelfile, store
    from kvslim.gguf_loader import open_gguf

    wanted = [k for k in ("modelfile", "parameters", "template", "license", "system")
              if getattr(args, k, False)]
    if not wanted:
        return False
    path = store.resolve(args.model)
    card = store.card(path)
    fields = open_gguf(path).fields

    def meta(key: str) -> str:
        field = fields.get(key)
        return str(field.contents()) if field is not None else ""

    for k in wanted:
        text = {
            "modelfile": lambda: modelfile.render(store.canonical(args.model), card),
            "parameters": lambda: modelfile.render_parameters(card),
            "template": lambda: card.template or meta("tokenizer.chat_template"),
            "license": lambda: card.license or meta("general.license"),
            "system": lambda: card.system or "",
        }[k]()
        print(text.rstrip("\n"))
    return True


def cmd_list(args) -> int:
    from kvslim import store

    rows = [(m.name, (m.sha256 or "")[:12], _size(m.size), _ago(m.modified.timestamp()))
            for m in store.list_models()]
    _table(["NAME", "ID", "SIZE", "MODIFIED"], rows)
    return 0


def _coding(info: dict) -> str:
    """One cell for ``kv_cache_info``'s coding keys: "hadamard-64 / K / lsq"."""
    return f"{info['kv_rotation']} / {info['kv_centering']} / {info['kv_rounding']}"


def cmd_show(args) -> int:
    from kvslim import formats, planner, store
    from kvslim.attention import plan_attention
    from kvslim.codec import decide
    from kvslim.gguf_loader import ModelConfig, open_gguf
    from kvslim.settings import (AUTO, pick_device, resolve_cache_types, resolve_codec,
                                 resolve_flash_attn, resolve_max_kld, resolve_num_ctx)

    if _show_card(args):
        return 0
    path = store.resolve(args.model)
    c = ModelConfig.from_gguf(open_gguf(path))
    device = pick_device(args.device)
    ctx = resolve_num_ctx(args.num_ctx, c.context_length, device)
    flash = resolve_flash_attn(args.flash_attn)
    coding = resolve_codec(args.kv_rotation, args.kv_centering, args.kv_rounding)
    facts = [
        ("architecture", c.arch), ("name", c.name), ("parameters", _count(c.n_params)),
        ("quantization", c.file_type_name or "?"), ("context length", c.context_length),
        ("embedding length", c.d_model), ("layers", c.n_layers),
        ("heads (q / kv)", f"{c.n_heads} / {c.n_kv_heads}"),
        ("head dim (k / v)", f"{c.head_dim} / {c.v_head_dim}"),
        ("rope", f"{c.rope_style}, base {c.rope_base:g}"),
        ("weights held", f"{_size(c.held_weight_bytes('quantized'))} quantized (as stored), "
                         f"{_size(c.held_weight_bytes('dequantize'))} dequantized (float32)"),
        ("file", path),
    ]
    print("  Model")
    for name, value in facts:
        print(f"    {name:<20}{value}")
    print()
    rows = []
    windowed = any(c.swa_layers)
    for t in formats.TYPES:
        k, v, _ = planner.effective_types(c, t, t)
        plan = plan_attention(device, c.head_dim, t, t, flash, v_head_dim=c.v_head_dim, warn=False)
        per_tok = planner.kv_bytes_per_token(c, k, v)
        path_note = plan.backend + ("" if not plan.fell_back else
                                    f", falls back to {plan.effective_k}/{plan.effective_v}")
        cd = decide(coding, plan.effective_k, plan.effective_v, c.cache_head_dim)
        at = [per_tok * n + planner.window_bytes(c, n, k, v) for n in (ctx, c.context_length)]
        fixed = [f"{planner.window_bytes(c, c.context_length, k, v):,}"] if windowed else []
        rows.append((t, f"{per_tok:,}", *fixed, _size(at[0]), _size(at[1]),
                     path_note, _coding(cd.describe())))
    if windowed:  # the windowed layers hold their window whatever the context
        print(f"  {sum(c.swa_layers)} of {c.n_layers} layers attend over a sliding window of "
              f"{c.sliding_window}: bytes/token counts the global layers, 'window bytes/seq' "
              f"what the windowed ones hold per sequence\n")
    _table(["KV cache type", "bytes/token", *(["window bytes/seq"] if windowed else []),
            f"at num_ctx {ctx}", f"at {c.context_length}",
            f"attention on {device.type} (flash {flash})", "rotation / centering / rounding"], rows)
    if resolve_cache_types(args.kv_cache_type, args.cache_type_k, args.cache_type_v)[0] == AUTO:
        _show_auto(path, c, device, flash, coding, resolve_max_kld(args.kv_max_kld))
    return 0


def _show_auto(path, c, device, flash, coding, max_kld: float) -> None:
    """The measured quality table (measured now on first use) and auto's choice."""
    from kvslim import calibration, models, planner
    from kvslim.autotype import choose_auto
    from kvslim.gguf_loader import open_gguf
    from kvslim.settings import compute_dtype
    from kvslim.tokenizer import Tokenizer

    reader = open_gguf(path)
    model = models.load_model(reader, c, device, compute_dtype(device), progress=False)
    table = calibration.quality_table(model, Tokenizer.from_gguf(reader), coding, flash)
    per_token = lambda k, v: planner.kv_bytes_per_token(c, k, v)  # noqa: E731
    pick = choose_auto(table, max_kld, per_token)
    rows = [(name, f"{per_token(*name.split('/')):,}", f"{kld:.5f}",
             "<- auto" if name == f"{pick.type_k}/{pick.type_v}" else "")
            for name, kld in sorted({"f16/f16": 0.0, **table}.items(),
                                    key=lambda kv: per_token(*kv[0].split("/")))]
    print()
    _table(["K/V", "bytes/token", "KLD vs f16 (calibration text)", f"auto, KLD <= {max_kld:g}"], rows)


def cmd_run(args) -> int:
    from kvslim import repl
    from kvslim.sampling import SamplingParams
    from kvslim.settings import (parse_keep_alive, pick_device, resolve_cache_types, resolve_codec,
                                 resolve_flash_attn, resolve_max_kld)

    # bad flags fail before a first-use pull downloads anything
    resolve_cache_types(args.kv_cache_type, args.cache_type_k, args.cache_type_v)
    resolve_max_kld(args.kv_max_kld)
    resolve_flash_attn(args.flash_attn)
    resolve_codec(args.kv_rotation, args.kv_centering, args.kv_rounding)
    pick_device(args.device)
    if args.keepalive is not None:
        parse_keep_alive(args.keepalive, "--keepalive")
    options = sampling_options(args)
    SamplingParams.from_options(**options)
    if args.format is not None:
        options["format"] = _answer_format(args.format)
    if "max_tokens" in options:  # the chat speaks Ollama's option names
        options["num_predict"] = options.pop("max_tokens")
    if args.think is not None and args.think.lower() not in THINK_VALUES:
        args.prompt.insert(0, args.think)  # `--think PROMPT`: the flag alone, then the prompt
        args.think = "true"
    prompt = " ".join(args.prompt) if args.prompt else None
    if prompt is None and sys.stdin is None:  # `kvslim run model <&-`
        raise ValueError("no prompt: give one as an argument (standard input is closed)")
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    # a prompt cache file is loaded into this process's pool: never a server's client then
    backend = (None if args.prompt_cache else _server_backend(args, interactive=prompt is None)) \
        or _local_backend(args)
    if getattr(backend, "continues", None) is not None and prompt is None:
        raise ValueError("the prompt cache holds a plain prompt (cache-prompt --raw): give "
                         "the text that continues it")
    wrap = not args.nowordwrap
    if prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
        repl.answer(backend, messages, options, verbose=args.verbose, wrap=wrap)
        return 0
    chat = repl.Repl(backend, options, args.system, verbose=args.verbose, wrap=wrap)
    return chat.run(repl.line_reader())


SERVER_FLAGS = ("device", "weights", "flash_attn")  # the server's own settings, not a request's


def _server_backend(args, interactive: bool):
    """A ``repl.Remote`` when a kvslim server runs at KVSLIM_HOST / OLLAMA_HOST and the
    model is a name (the server cannot load a path it does not serve); else None."""
    from pathlib import Path

    from kvslim import repl
    from kvslim.client import Client

    if args.model.endswith(".gguf") or Path(args.model).is_file():
        return None
    client = Client.find()
    if client is None:
        return None
    if args.verify:  # the server reads the same store
        from kvslim import store

        store.verify(args.model)
    for flag in SERVER_FLAGS:
        value = getattr(args, flag)
        if value is not None and (flag, value) != ("device", "auto"):
            print(f"warning: --{flag.replace('_', '-')} is a setting of the server at "
                  f"{client.address}, which runs the model: ignored", file=sys.stderr)
    names = ("kv_cache_type", "cache_type_k", "cache_type_v", "kv_rotation", "kv_centering",
             "kv_rounding", "num_ctx")
    request = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    backend = repl.Remote(client, args.model, request, keep_alive=args.keepalive,
                          think=_think(args), truncate=args.truncate or interactive)
    backend.ensure()
    if interactive:
        backend.preload()
    return backend


def _local_backend(args):
    """The model in this process, its CPU kernels compiled (and said so) before loading."""
    from kvslim import repl, store
    from kvslim.llm import LLM
    from kvslim.settings import pick_device, resolve_cache_types

    if _think(args):
        raise ValueError(f'"{args.model}" does not support thinking')
    if args.keepalive is not None:
        print("warning: --keepalive applies to a running server (kvslim serve); this model "
              "unloads when kvslim run exits", file=sys.stderr)
    from kvslim.pull import resolve_or_pull

    with _PullProgress() as progress:  # as Ollama's run: a model the store lacks is pulled
        resolve_or_pull(args.model, progress.line)
    if args.verify:
        store.verify(args.model)
    warm = (0.0, False)
    if pick_device(args.device).type == "cpu":
        types = resolve_cache_types(args.kv_cache_type, args.cache_type_k, args.cache_type_v)
        warm = repl.compile_kernels(sorted(set(types)))
    kwargs = llm_kwargs(args)
    llm = LLM(args.model, **kwargs)
    continues = None
    if args.prompt_cache and _use_prompt_cache(llm, args):
        continues = args.cached_tokens  # a plain prompt: the run's prompt continues its text
    return repl.Local(llm, lambda name: LLM(name, **kwargs), truncate=args.truncate, warmup=warm,
                      continues=continues)


def _use_prompt_cache(llm, args) -> bool:
    """Load ``--prompt-cache`` into the prefix cache; True when it holds a raw prompt (the
    run's prompt continues its text), False for a system message (it becomes the chat's)."""
    saved = llm.load_cache(args.prompt_cache)
    args.cached_tokens = saved.tokens
    system = saved.extra.get("system")
    if system is None:
        if args.system:
            raise ValueError("--system: the prompt cache holds a plain prompt, which a chat "
                             "with a system message would not start with")
        return True
    if args.system is not None and args.system != system:
        raise ValueError("--system differs from the system message the prompt cache holds")
    args.system = system
    chat = llm.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": "?"}])
    if chat[:len(saved.tokens)] != saved.tokens:
        log = logging.getLogger("kvslim")
        log.warning("this model's chat template does not start a chat with the cached system "
                    "message's tokens: the prompt cache will not be reused")
    return False


def cmd_cache_prompt(args) -> int:
    """Evaluate a prompt file and save its K/V cache (``LLM.save_cache``)."""
    from kvslim.llm import LLM
    from kvslim.settings import pick_device, resolve_cache_types, resolve_codec, resolve_flash_attn

    resolve_cache_types(args.kv_cache_type, args.cache_type_k, args.cache_type_v)
    resolve_flash_attn(args.flash_attn)
    resolve_codec(args.kv_rotation, args.kv_centering, args.kv_rounding)
    pick_device(args.device)
    with open(args.prompt_file, encoding="utf-8") as f:
        text = f.read()
    out = args.output or args.prompt_file + ".kvc"
    llm = LLM(args.model, **llm_kwargs(args))
    info = llm.save_cache(out, text) if args.raw else llm.save_cache(out, system=text)
    i = llm.kv_cache_info()
    print(f"saved {info['tokens']:,} tokens to {out}: {_size(info['bytes'])} "
          f"({info['cache_bytes']:,} bytes of K {i['type_k']} / V {i['type_v']} cache, num_ctx "
          f"{i['num_ctx']})", file=sys.stderr)
    return 0


def _answer_format(text: str):
    """--format: "json" (any JSON object) or a JSON schema written inline; checked here so
    that a bad one is an error before the model loads."""
    import json

    from kvslim.grammar import format_grammar

    fmt = text
    if text.lstrip().startswith("{"):
        try:
            fmt = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--format: not valid JSON: {e}") from None
    format_grammar(fmt)
    return fmt


THINK_VALUES = ("true", "false", "high", "medium", "low")


def _think(args) -> str | bool | None:
    """--think's request value: None (not given), False, True or a level."""
    if args.think is None:
        return None
    value = args.think.lower()
    return value == "true" if value in ("true", "false") else value


def cmd_ps(args) -> int:
    """Ollama's ps: the models a running server holds, with their K/V pools."""
    client = _require_server()
    rows = []
    for m in client.ps():
        kv = m["kv_cache"]
        processor = "100% CPU" if m["size_vram"] == 0 else "100% GPU"
        rows.append((m["name"], (m.get("digest") or "")[:12], _size(m["size"]), processor,
                     str(m["context_length"]), f"{kv['type_k']}/{kv['type_v']}",
                     f"{_size(kv['bytes'])} ({kv['pages_in_use']}/{kv['pages_total']} pages)",
                     _until(m["expires_at"])))
    _table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "K/V", "K/V POOL", "UNTIL"], rows)
    return 0


def cmd_stop(args) -> int:
    """Ollama's stop: unload a model from the running server (keep_alive 0)."""
    _require_server().stop(args.model)
    return 0


def cmd_warmup(args) -> int:
    """Compile the CPU kernels now, so no first run waits for them."""
    from kvslim import repl, warmup

    types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else \
        list(warmup.DEFAULT_TYPES)
    seconds, _ = repl.compile_kernels(types, always_say=True)
    print(f"CPU kernels ready ({', '.join(types)}; {seconds:.1f} s)")
    return 0


def _require_server():
    from kvslim.client import Client

    client = Client.from_env()
    if not client.is_kvslim():
        raise ConnectionError(f"could not connect to a kvslim server at {client.address}: is "
                              f"`kvslim serve` running? (KVSLIM_HOST / OLLAMA_HOST set where it listens)")
    return client


def _until(expires_at: str) -> str:
    """Ollama's UNTIL column: "4 minutes from now", "Forever"."""
    from datetime import datetime

    left = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp() - time.time()
    if left > 100 * 365 * 86400:
        return "Forever"
    if left <= 0:
        return "Stopping..."
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= length:
            n = int(left // length)
            return f"{n} {unit}{'s' if n > 1 else ''} from now"
    return "now"


# ---------------------------------------------------------------- output


def _table(header: list[str], rows: list[tuple]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(t)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _ago(ts: float) -> str:
    s = max(0, time.time() - ts)
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= length:
            n = int(s // length)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvslim", epilog=EPILOG,
                                     description="LLMs on a quantized (ggml block) K/V cache")
    from kvslim import __version__

    parser.add_argument("--version", action="version", version=f"kvslim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a model: answer PROMPT, or chat interactively",
                       epilog=EPILOG)
    p.add_argument("model", help="built-in name (smollm2) or path to a .gguf")
    p.add_argument("prompt", nargs="*", help="prompt (omit for an interactive chat; stdin works)")
    p.add_argument("--system", help="system message")
    p.add_argument("--verbose", action="store_true", help="print timings and K/V cache details")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the context instead of failing")
    p.add_argument("--verify", action="store_true",
                   help="check the stored model's sha256 before loading it")
    p.add_argument("--format", metavar="json|SCHEMA",
                   help='answer in JSON: "json" for any object, or a JSON schema ({...}) to follow')
    p.add_argument("--keepalive", metavar="DURATION",
                   help="how long a running server keeps the model loaded after this run "
                        "(5m, 1h, 0 unloads, -1 forever)")
    p.add_argument("--nowordwrap", action="store_true",
                   help="do not wrap words to the next line on a terminal")
    p.add_argument("--think", nargs="?", const="true", metavar="LEVEL",
                   help="thinking (true|false|high|medium|low), for models that think")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="start from a K/V cache saved by `kvslim cache-prompt` (same model, "
                        "cache types, coding and num_ctx)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="list the models a running server has loaded (K/V pools, expiry)")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("stop", help="unload a model from a running server")
    p.add_argument("model")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("warmup", help="compile the CPU kernels now (once per machine), "
                                      "so no first run waits for them")
    p.add_argument("--types", metavar="T,T",
                   help="K/V cache types to exercise, comma-separated (default f16,q8_0,q4_0; "
                        "one compiled kernel serves every type)")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("cache-prompt", help="evaluate a prompt file once and save its K/V cache",
                       epilog=EPILOG)
    p.add_argument("model", help="built-in name (smollm2) or path to a .gguf")
    p.add_argument("--prompt-file", "-f", required=True, metavar="FILE",
                   help="the text: by default the system message of later chats "
                        "(`kvslim run MODEL --prompt-cache OUT ...`)")
    p.add_argument("--output", "-o", metavar="OUT", help="cache file (default FILE.kvc)")
    p.add_argument("--raw", action="store_true",
                   help="cache the text as a plain prompt that later runs continue")
    add_model_args(p)
    p.set_defaults(func=cmd_cache_prompt)

    p = sub.add_parser("pull", help="download a model into the store: NAME[:TAG] from the Ollama "
                                    "registry (KVSLIM_REGISTRY), hf.co/USER/REPO[:QUANT], smollm2")
    p.add_argument("model")
    p.add_argument("--verify", action="store_true",
                   help="only check the stored file's sha256 (no download): an error if it differs")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", aliases=["ls"], help="list pulled models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="model facts and K/V bytes per token for every cache type")
    p.add_argument("model")
    for k in ("modelfile", "parameters", "template", "license", "system"):
        p.add_argument(f"--{k}", action="store_true", help=f"print the model's {k} only")
    add_model_args(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove models from the store")
    p.add_argument("model", nargs="+")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("cp", help="copy a model under another name (a hard link: no new bytes)")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("create", help="create a model from a Modelfile (FROM, PARAMETER, "
                                      "SYSTEM, TEMPLATE, LICENSE)")
    p.add_argument("model")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    p.set_defaults(func=cmd_create)

    _register_plugins(sub)
    return parser


def _register_plugins(sub) -> None:
    for name in PLUGINS:
        try:
            if importlib.util.find_spec(name) is None:
                continue
            register = getattr(importlib.import_module(name), "cli_register", None)
        except Exception as e:  # a broken plugin must not take `kvslim run` down with it
            print(f"warning: {name} is unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if register is not None:
            register(sub)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: one line, no traceback."""
    from kvslim.cache import CacheFull
    from kvslim.client import ServerError
    from kvslim.store import PullError

    # GGUFError, UnknownModelError, PromptTooLong and bad types/values are ValueErrors;
    # ModelNotPulledError is a FileNotFoundError (an OSError).
    return ValueError, OSError, PullError, CacheFull, ServerError


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (main() may run many times in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    log = logging.getLogger("kvslim")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        # Still propagates: the root logger has no handler in the CLI, and log capture
        # (pytest's caplog, an embedding app's config) keeps working after main() ran.
        log.addHandler(handler)
    log.setLevel(logging.INFO if os.environ.get("KVSLIM_DEBUG") else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _setup_logging()
    if sys.stdout is None:  # `>&-`: what would be printed goes nowhere, as it would for a shell
        sys.stdout = open(os.devnull, "w")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head -c1`: the reader left; stop quietly, as `cat` does
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it
    except _user_errors() as e:
        if os.environ.get("KVSLIM_DEBUG"):
            raise
        print(f"Error: {_one_line(e)}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return text


if __name__ == "__main__":
    sys.exit(main())
