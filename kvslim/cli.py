"""The ``kvslim`` command: Ollama's verbs with llama.cpp's cache flags.

    kvslim run MODEL [PROMPT]     answer once, or chat interactively (/bye exits)
    kvslim cache-prompt MODEL -f FILE -o FILE.kvc    save a prompt's K/V cache for `run --prompt-cache`
    kvslim pull MODEL | list | show MODEL

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
          "(auto/on/off), KVSLIM_KV_ROUNDING (auto/lsq/ggml), KVSLIM_MODELS (model store)")


# ---------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Cache type, flash attention, device and context flags (as llama.cpp / Ollama name them)."""
    g = p.add_argument_group("model and K/V cache")
    g.add_argument("--kv-cache-type", metavar="T",
                   help="K and V cache type: f16, q8_0, q4_0, ... (env KVSLIM_KV_CACHE_TYPE; default f16)")
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
                weights=args.weights)


def sampling_options(args: argparse.Namespace) -> dict:
    """The sampling flags that were given (omitted ones keep the defaults)."""
    names = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed",
             "max_tokens", "stop")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---------------------------------------------------------------- verbs


def cmd_pull(args) -> int:
    from kvslim import store

    if args.verify:
        print(f"verified: {store.verify(args.model)}")
        return 0
    path = store.pull(args.model)
    print(f"success: {path}")
    return 0


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
    from kvslim.settings import pick_device, resolve_codec, resolve_flash_attn, resolve_num_ctx

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
    for t in formats.TYPES:
        k, v, _ = planner.effective_types(c, t, t)
        plan = plan_attention(device, c.head_dim, t, t, flash, v_head_dim=c.v_head_dim, warn=False)
        per_tok = planner.kv_bytes_per_token(c, k, v)
        path_note = plan.backend + ("" if not plan.fell_back else
                                    f", falls back to {plan.effective_k}/{plan.effective_v}")
        cd = decide(coding, plan.effective_k, plan.effective_v, c.cache_head_dim)
        rows.append((t, f"{per_tok:,}", _size(per_tok * ctx), _size(per_tok * c.context_length),
                     path_note, _coding(cd.describe())))
    _table(["KV cache type", "bytes/token", f"at num_ctx {ctx}", f"at {c.context_length}",
            f"attention on {device.type} (flash {flash})", "rotation / centering / rounding"], rows)
    return 0


def cmd_run(args) -> int:
    from kvslim import store
    from kvslim.llm import LLM
    from kvslim.sampling import SamplingParams
    from kvslim.settings import pick_device, resolve_cache_types, resolve_codec, resolve_flash_attn

    # bad flags fail before a first-use pull downloads anything
    resolve_cache_types(args.kv_cache_type, args.cache_type_k, args.cache_type_v)
    resolve_flash_attn(args.flash_attn)
    resolve_codec(args.kv_rotation, args.kv_centering, args.kv_rounding)
    pick_device(args.device)
    options = sampling_options(args)
    SamplingParams.from_options(**options)
    prompt = " ".join(args.prompt) if args.prompt else None
    if prompt is None and sys.stdin is None:  # `kvslim run model <&-`
        raise ValueError("no prompt: give one as an argument (standard input is closed)")
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    store.resolve(args.model, pull_missing=True)  # first use of a built-in model pulls it
    if args.verify:
        store.verify(args.model)
    llm = LLM(args.model, **llm_kwargs(args))
    if args.prompt_cache and _use_prompt_cache(llm, args):
        if prompt is None:
            raise ValueError("the prompt cache holds a plain prompt (cache-prompt --raw): give "
                             "the text that continues it")
        _continue_raw(llm, prompt, options, args)
        return 0
    if prompt is not None:
        _answer(llm, [{"role": "user", "content": prompt}], options, args, llm.load_duration)
        return 0
    return _interactive(llm, options, args)


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


def _continue_raw(llm, prompt: str, options, args) -> None:
    """Stream the continuation of the cached prompt's tokens followed by ``prompt``."""
    ids = args.cached_tokens + llm.tokenize(prompt, add_special=False)
    t0 = time.perf_counter()
    stream = llm.generate(ids, stream=True, truncate=args.truncate, **options)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        _print_stats(stream.completion, llm.load_duration, time.perf_counter() - t0)
        _print_cache_info(llm)


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


def _answer(llm, messages, options, args, load_duration: float = 0.0) -> str:
    """Stream the answer to ``messages``; a chat too long for the context loses its oldest
    messages first (``kvslim.chat``, as the server's)."""
    from kvslim.chat import fit_chat, prompt_limit

    if args.system:
        messages = [{"role": "system", "content": args.system}] + messages
    limit = prompt_limit(llm.kv_cache_info()["num_ctx"], options.get("max_tokens"))
    messages = fit_chat(llm.chat_prompt, messages, limit)[0]
    t0 = time.perf_counter()
    stream = llm.chat(messages, stream=True, truncate=args.truncate, **options)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n\n" if sys.stdout.isatty() else "\n")
    if args.verbose:
        _print_stats(stream.completion, load_duration, time.perf_counter() - t0)
        _print_cache_info(llm)
    return stream.completion.text


def _interactive(llm, options, args) -> int:
    history: list[dict] = []
    print("kvslim chat: /bye exits, /clear forgets the conversation, /? helps", file=sys.stderr)
    while True:
        try:
            line = _read_prompt()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line is None:
            continue
        if line.strip() in ("/bye", "/exit"):
            return 0
        if line.strip() == "/clear":
            history.clear()
            print("Cleared session context", file=sys.stderr)
            continue
        if line.strip() in ("/?", "/help"):
            print('/bye  exit\n/clear  forget the conversation\n"""  start or end a multi-line message',
                  file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            answer = _answer(llm, history, options, args)
        except KeyboardInterrupt:  # stop this answer, keep the session
            history.pop()
            print("\n^C", file=sys.stderr)
            continue
        except ValueError as e:  # e.g. one message longer than the context
            history.pop()
            print(f"Error: {_one_line(e)}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})


def _read_prompt() -> str | None:
    line = input(">>> ")
    if not line.strip():
        return None
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]  # multi-line until a closing """
    while not lines[-1].rstrip().endswith('"""') or len(lines) == 1 and lines[0].strip() == "":
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n") or None


# ---------------------------------------------------------------- output


def _print_stats(c, load: float, wall: float) -> None:
    rows = [
        ("total duration", _dur(load + wall)),
        ("load duration", _dur(load)),
        ("prompt eval count", f"{c.prompt_eval_count} token(s)"),
        ("prompt eval duration", _dur(c.prompt_eval_duration)),
        ("prompt eval rate", _rate(c.prompt_eval_count, c.prompt_eval_duration)),
        ("eval count", f"{c.eval_count} token(s)"),
        ("eval duration", _dur(c.eval_duration)),
        ("eval rate", _rate(c.eval_count, c.eval_duration)),
    ]
    if c.prompt_cache_count:  # prompt tokens reused from the prefix cache or a prompt cache
        rows.insert(3, ("prompt cache count", f"{c.prompt_cache_count} token(s)"))
    for name, value in rows:
        print(f"{name + ':':<22}{value}", file=sys.stderr)


def _print_cache_info(llm) -> None:
    i = llm.kv_cache_info()
    fused = "fused" if i["fused"] else "dequantize + SDPA"
    lines = [
        ("kv cache types", f"K {i['type_k']} / V {i['type_v']} "
                           f"(asked for {i['requested_k']} / {i['requested_v']})"),
        ("kv cache fallback", f"yes: {i['reason']}" if i["fallback"] else "none"),
        ("kv cache bytes", f"{i['bytes']:,} ({_size(i['bytes'])}; {i['bytes_per_token']:,} B/token "
                           f"x {i['capacity_tokens']:,} tokens)"),
        ("attention", f"{i['backend']} ({fused}) on {i['device']}, flash {i['flash_attn']}"),
        ("kv coding", f"rotation {i['kv_rotation']}, centering {i['kv_centering']}, "
                      f"rounding {i['kv_rounding']}"
                      + (f" ({i['kv_codec_note']})" if i.get("kv_codec_note") else "")),
    ]
    for name, value in lines:
        print(f"{name + ':':<22}{value}", file=sys.stderr)


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


def _dur(s: float) -> str:
    """Durations the way Go prints them (ollama --verbose): 1.234s, 12.3ms, 45µs."""
    if s >= 1:
        return f"{s:.6f}".rstrip("0").rstrip(".") + "s"
    if s >= 1e-3:
        return f"{s * 1e3:.4f}".rstrip("0").rstrip(".") + "ms"
    return f"{s * 1e6:.1f}µs"


def _rate(n: int, s: float) -> str:
    return f"{n / s:.2f} tokens/s" if s > 0 else "n/a"


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
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="start from a K/V cache saved by `kvslim cache-prompt` (same model, "
                        "cache types, coding and num_ctx)")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_run)

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

    p = sub.add_parser("pull", help="download a built-in model into the store")
    p.add_argument("model")
    p.add_argument("--verify", action="store_true",
                   help="only check the stored file's sha256 (no download): an error if it differs")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", aliases=["ls"], help="list pulled models")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="model facts and K/V bytes per token for every cache type")
    p.add_argument("model")
    add_model_args(p)
    p.set_defaults(func=cmd_show)

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
    from kvslim.store import PullError

    # GGUFError, UnknownModelError, PromptTooLong and bad types/values are ValueErrors;
    # ModelNotPulledError is a FileNotFoundError (an OSError).
    return ValueError, OSError, PullError, CacheFull


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
