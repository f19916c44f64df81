"""`kvslim bench`: what each K/V cache type saves (bytes) and costs (quality, speed).

Quality is scored the way ``llama-perplexity --kl-divergence`` scores it: the text is
tokenized once (with BOS when the model adds one) and cut into consecutive chunks of
``ctx`` tokens, BOS replacing each chunk's first token; each chunk runs from an empty
cache and only its second half is scored (the logits at positions ctx/2 .. ctx-2, each
predicting the next token), so every scored token sees at least ctx/2 tokens of context.
Per token: the negative log-likelihood (perplexity), the KL divergence of the type's
distribution from the f16 cache's, and whether both put the same token on top. The KL
divergence is exact over the whole vocabulary in float32 (llama.cpp stores the base
log-probs as uint16 and skips those below -16; the difference is far below the spread
between types).

Order is chunk-major: per chunk, the f16-cache pass runs once and the log-probs of its
scored half stay in memory (float32 [ctx/2, vocab]: 200 MB at ctx 2048 with a 49k
vocabulary), then every other type runs on that chunk and is compared with it. So memory
stays at one chunk however long the run, nothing goes to disk at full precision, and an
interrupted run (Ctrl-C) has every type scored on the same completed chunks. Switching
types is ``LLM.reconfigure`` (a new cache pool; the weights stay), milliseconds beside a
forward pass over the chunk.

Speed comes after quality, per type: a greedy generation of ``decode_tokens`` tokens after
a prompt of ``ctx - decode_tokens`` text tokens, preceded by a tiny warm-up generation so
that kernel compilation is not timed. Prefill tok/s is prompt tokens over prompt time;
decode tok/s is one over the median single-token step. On a shared machine,
``speed_rounds`` > 1 repeats the runs (interleaving the types) and keeps each type's
fastest, since load from other processes only ever slows a round down.
"""
from __future__ import annotations

import contextlib
import gzip
import inspect
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvslim import planner

log = logging.getLogger("kvslim")

__all__ = ["DEFAULT_TEXT", "Scores", "TypeRun", "bench", "load_text", "chunk_tokens",
           "token_stats", "plot", "print_table", "cli_register"]

DEFAULT_TEXT = "/usr/share/doc/jargon-text/jargon.txt.gz"
DEFAULT_CTX = 2048
DEFAULT_CHUNKS = 4
DEFAULT_DECODE_TOKENS = 32
REFERENCE = ("f16", "f16")
CODEC_OPTIONS = ("kv_rotation", "kv_centering", "kv_rounding")  # LLM / reconfigure keywords
SCORING = ("second half of each chunk (positions ctx/2 .. ctx-1), "
           "as llama-perplexity --kl-divergence")
_ROWS = 256  # scored rows per block when comparing: bounds the [rows, vocab] temporaries


class TextNotFound(ValueError):
    """The text to score is missing (a ValueError so the CLI prints our one-line hint)."""


# ---------------------------------------------------------------- text and chunks


def load_text(path: str | Path | None = None) -> str:
    """The text to score: a UTF-8 file, gzip-compressed when it ends in .gz."""
    p = Path(path or DEFAULT_TEXT).expanduser()
    if not p.is_file():
        hint = ("install it with `apt-get install jargon-text`, or pass --text FILE"
                if path is None or str(p) == DEFAULT_TEXT else "pass an existing --text FILE")
        raise TextNotFound(f"text file {p} not found: {hint}")
    if p.suffix == ".gz":
        with gzip.open(p, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return p.read_text(encoding="utf-8", errors="replace")


def chunk_tokens(ids: list[int], ctx: int, n_chunks: int | None, bos_id: int | None,
                 skip: int = 0) -> list[list[int]]:
    """Consecutive chunks of ``ctx`` tokens (the remainder is dropped, as llama.cpp does).

    ``skip`` leaves out the first chunks (front matter) without moving the chunk
    boundaries, so chunk i is llama-perplexity's chunk i. ``bos_id`` (when the model
    adds BOS) replaces each chunk's first token.
    """
    available = len(ids) // ctx - skip
    if available <= 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {skip + 1} chunk(s) of --ctx {ctx}; "
                         "use a smaller --ctx or a longer --text")
    n = available if not n_chunks else min(n_chunks, available)
    chunks = [list(ids[i * ctx:(i + 1) * ctx]) for i in range(skip, skip + n)]
    if bos_id is not None:
        for c in chunks:
            c[0] = bos_id
    return chunks


def scored_span(ctx: int) -> slice:
    """Logit rows that are scored: ctx/2 .. ctx-2 (each predicts the token after it)."""
    return slice(ctx // 2, ctx - 1)


# ---------------------------------------------------------------- scores


def token_stats(ref_logp, logp, targets):
    """Per scored token: (KL(ref || new), -log p_new(target), same top-1), CPU tensors.

    ref_logp, logp: [n, V] float32 log-probs of the reference and the type; targets: [n].
    """
    import torch

    klds, nlls, same = [], [], []
    for i in range(0, len(targets), _ROWS):
        ref, new = ref_logp[i:i + _ROWS], logp[i:i + _ROWS]
        klds.append((ref.exp() * (ref - new)).sum(-1))
        nlls.append(-new.gather(-1, targets[i:i + _ROWS, None]).squeeze(-1))
        same.append(ref.argmax(-1) == new.argmax(-1))
    return torch.cat(klds).double(), torch.cat(nlls).double(), torch.cat(same)


@dataclass
class Scores:
    """Running sums over scored tokens."""

    nll: float = 0.0
    same_top: int = 0
    klds: list[float] = field(default_factory=list)

    def add(self, kld, nll, same) -> None:
        self.klds.extend(kld.tolist())
        self.nll += float(nll.sum())
        self.same_top += int(same.sum())

    @property
    def n(self) -> int:
        return len(self.klds)

    def summary(self) -> dict:
        if not self.n:
            return {"ppl": None, "kld": None, "kld_p99": None, "top1": None}
        ordered = sorted(self.klds)
        return {"ppl": math.exp(self.nll / self.n), "kld": math.fsum(self.klds) / self.n,
                "kld_p99": ordered[min(self.n - 1, int(0.99 * self.n))],
                "top1": self.same_top / self.n}


# ---------------------------------------------------------------- one type


@dataclass
class TypeRun:
    """One K/V type pair: what the cache actually is, and its scores so far."""

    k: str
    v: str
    info: dict
    scores: Scores = field(default_factory=Scores)
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    speed_error: str | None = None

    @property
    def name(self) -> str:
        return planner.pair_name(self.k, self.v)

    def keep_fastest(self, prefill: float | None, decode: float | None) -> None:
        """Best of the rounds so far: load from other processes only ever slows a round."""
        self.prefill_tok_s = _faster(self.prefill_tok_s, prefill)
        self.decode_tok_s = _faster(self.decode_tok_s, decode)

    def same_cache_as(self, other: "TypeRun") -> bool:
        """True when both store the same effective types and codec: the same logits."""
        keys = ("type_k", "type_v", "backend", *codec_state(self.info), *codec_state(other.info))
        return all(self.info.get(k) == other.info.get(k) for k in keys)

    def report(self, elements_per_token: int) -> dict:
        i = self.info
        return {"k": self.k, "v": self.v, "effective_k": i["type_k"], "effective_v": i["type_v"],
                "fallback": i["reason"] if i["fallback"] else None, "rotation": rotation_state(i),
                "codec": codec_state(i) or None,
                "backend": i["backend"], "bytes_per_token": i["bytes_per_token"],
                "bytes_at_ctx": i["bytes"],
                "window_bytes_per_sequence": i.get("window_bytes_per_sequence", 0),
                "bits_per_element": 8 * i["bytes_per_token"] / elements_per_token,
                **self.scores.summary(), "n_scored": self.scores.n,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "speed_error": self.speed_error}


def _faster(old: float | None, new: float | None) -> float | None:
    return new if old is None else old if new is None else max(old, new)


def codec_state(info: dict) -> dict:
    """How the cache codes its rows beyond the block type (rotation, centering, rounding),
    as far as ``kv_cache_info`` reports it: its kv_* and *rotation* keys."""
    return {k: v for k, v in info.items() if k.startswith("kv_") or "rotation" in k}


def rotation_state(info: dict):
    """The cache's rotation setting if ``kv_cache_info`` reports one (None otherwise)."""
    found = {k: v for k, v in info.items() if "rotation" in k}
    if len(found) <= 1:
        return next(iter(found.values()), None)
    return found


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _supported(fn, options: dict | None) -> dict:
    """The given codec options (kv_rotation=..., ...); ValueError if ``fn`` lacks one."""
    for name in options or {}:
        if not _accepts(fn, name):
            raise ValueError(f"--{name.replace('_', '-')} is not supported by this kvslim "
                             f"({getattr(fn, '__qualname__', fn)} has no {name} option)")
    return dict(options or {})


def _plain(codec: dict | None) -> dict:
    """Codec options for the reference: "auto" leaves an f16 cache as plain f16 rows
    (rotation and the like apply to block-quantized types), whatever the others use."""
    return {name: "auto" for name in codec or {}}


def use_types(llm, k: str, v: str, codec: dict | None = None) -> dict:
    """Switch the LLM's cache to K ``k`` / V ``v`` (and ``codec`` options such as
    kv_rotation="off", passed to ``reconfigure``); return its ``kv_cache_info``."""
    llm.reconfigure(cache_type_k=k, cache_type_v=v, **_supported(llm.reconfigure, codec))
    return llm.kv_cache_info()


# ---------------------------------------------------------------- the run


def _score(llm, chunk: list[int]):
    """float32 log-probs [ctx - 1 - ctx/2, V] of the scored half of ``chunk``, on CPU."""
    import torch

    logits = llm.logits(chunk)[scored_span(len(chunk))]
    return torch.log_softmax(logits.float(), dim=-1)


def _targets(chunk: list[int]):
    import torch

    span = scored_span(len(chunk))
    return torch.tensor(chunk[span.start + 1:span.stop + 1])


def _score_chunk(llm, chunk: list[int], runs: list[TypeRun], ref: TypeRun, codec,
                 bar: "_Progress", where: str) -> None:
    """Score one chunk for every type; sums are committed only when all types are done."""
    targets = _targets(chunk)
    with bar.step(f"{where}: {ref.name} (reference)"):
        use_types(llm, ref.k, ref.v, _plain(codec))
        ref_logp = _score(llm, chunk)
    pending = []
    for run in runs:
        if run.same_cache_as(ref):  # the reference pass itself: KL 0, top-1 100%
            pending.append((run, token_stats(ref_logp, ref_logp, targets)))
            continue
        with bar.step(f"{where}: {run.name}"):
            use_types(llm, run.k, run.v, codec)
            pending.append((run, token_stats(ref_logp, _score(llm, chunk), targets)))
    for run, stats in pending:
        run.scores.add(*stats)


def _measure_speed(llm, run: TypeRun, prompt: list[int], n_decode: int, codec) -> None:
    """Prefill tok/s over the whole prompt; decode tok/s from the median single-token step,
    which a burst of load from other processes does not move (a mean would)."""
    from kvslim.sampling import SamplingParams

    use_types(llm, run.k, run.v, codec)
    greedy = dict(temperature=0, repeat_penalty=1.0, ignore_eos=True)
    _timed_request(llm.engine, prompt[:8], SamplingParams(max_tokens=2, **greedy))  # compile kernels
    prefill_s, steps = _timed_request(llm.engine, prompt, SamplingParams(max_tokens=n_decode, **greedy))
    run.keep_fastest(len(prompt) / prefill_s, 1 / statistics.median(steps) if steps else None)


def _timed_request(engine, ids: list[int], params) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step) of one request run alone."""
    seq = engine.add_request(ids, params)
    prefill_s, steps = 0.0, []
    while not seq.finished:
        decoding = seq.n_cached >= seq.n_prompt  # the prompt is in the cache: one token per step
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if decoding:
            steps.append(dt)
        else:
            prefill_s += dt
    return prefill_s, steps


def _speed_or_error(llm, run: TypeRun, prompt: list[int], n_decode: int, codec) -> None:
    """Speed is measured after quality: a failure here is reported, not allowed to discard
    the quality figures of a long run."""
    try:
        _measure_speed(llm, run, prompt, n_decode, codec)
    except Exception as e:
        run.speed_error = f"{type(e).__name__}: {e}"
        log.warning("bench: speed of %s not measured: %s", run.name, run.speed_error)


def bench(llm, text: str, types, *, ctx: int = DEFAULT_CTX, chunks: int | None = DEFAULT_CHUNKS,
          skip_chunks: int = 0, max_tokens: int | None = None,
          decode_tokens: int = DEFAULT_DECODE_TOKENS, speed_rounds: int = 1,
          codec: dict | None = None, progress: bool = True, model: str | None = None) -> dict:
    """Run the benchmark on a loaded ``LLM`` (its num_ctx must be >= ctx); JSON-ready dict.

    ``codec``: options for every cache, e.g. {"kv_rotation": "off"}, where the LLM has them.

    Ctrl-C stops cleanly: the dict then holds the completed chunks with ``partial`` True.
    """
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4 (half of each chunk is scored), got {ctx}")
    pairs = planner.parse_types(types)
    ids = llm.tokenize(text)
    if max_tokens:
        ids = ids[:max_tokens]
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    chunk_list = chunk_tokens(ids, ctx, chunks, bos, skip_chunks)
    ref = TypeRun(*REFERENCE, use_types(llm, *REFERENCE, _plain(codec)))
    runs = [TypeRun(k, v, use_types(llm, k, v, codec)) for k, v in pairs]
    n_decode = min(decode_tokens, ctx // 2)
    done, partial = 0, False
    with _Progress(progress, len(chunk_list) * (1 + sum(not r.same_cache_as(ref) for r in runs))
                   + (len(runs) * speed_rounds if n_decode > 0 else 0)) as bar:
        try:
            for i, chunk in enumerate(chunk_list):
                _score_chunk(llm, chunk, runs, ref, codec, bar, f"chunk {i + 1}/{len(chunk_list)}")
                done += 1
            for r in range(speed_rounds if n_decode > 0 else 0):  # rounds interleave the types
                for run in runs:
                    with bar.step(f"speed {r + 1}/{speed_rounds}: {run.name}"):
                        _speed_or_error(llm, run, chunk_list[0][:ctx - n_decode], n_decode, codec)
        except KeyboardInterrupt:
            partial = True
    facts = {"ctx": ctx, "skip_chunks": skip_chunks, "chunks": done, "chunks_planned": len(chunk_list),
             "partial": partial, "decode_tokens": n_decode, "speed_rounds": speed_rounds}
    return _report(llm, model, runs, facts)


def _report(llm, model, runs: list[TypeRun], facts: dict) -> dict:
    """The JSON-ready result: the issue's shape, then how it was measured (``facts``)."""
    c = llm.config
    # bytes_per_token counts the global layers (a window layer's cost is per sequence)
    n_global = sum(1 for i in range(c.n_layers) if not c.layer_window(i))
    elements = n_global * c.n_kv_heads * (c.head_dim + c.v_head_dim)
    info = llm.kv_cache_info()
    types = {r.name: r.report(elements) for r in runs}
    return {
        "model": model if model is not None else llm.name,
        "n_tokens": runs[0].scores.n if runs else 0,  # scored tokens, the same for every type
        "types": types,
        **facts,
        "scoring": SCORING, "reference": planner.pair_name(*REFERENCE),
        "device": info["device"], "flash_attn": info["flash_attn"], "threads": _threads(),
        "page_size": info["page_size"], "context_length": c.context_length,
    }


def _threads() -> dict:
    """CPU threads in use: speed on a shared machine depends on them (torch's OpenMP
    threads stall at barriers when other processes take the cores)."""
    import torch

    out = {"torch": torch.get_num_threads()}
    if "numba" in sys.modules:  # the fused CPU kernels' threads
        out["numba"] = sys.modules["numba"].config.NUMBA_NUM_THREADS
    return out


class _Progress:
    """A rich progress bar on stderr (or nothing); ``with bar.step(label):`` around each pass."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self._p = enabled, total, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._p.start()
            self._task = self._p.add_task("bench", total=self.total)
        return self

    @contextlib.contextmanager
    def step(self, label: str):
        if self._p is not None:
            self._p.update(self._task, description=label)
        yield
        if self._p is not None:
            self._p.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


# ---------------------------------------------------------------- output


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_table(result: dict, file=None) -> None:
    """The result as a rich table (one row per K/V type)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    show_codec = any(t["codec"] for t in result["types"].values())
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, title=_title(result), caption=_caption(result))
    header = ["K/V", "stored as", "bytes/token", f"KV at {result['ctx']}", "bits/elem", "PPL",
              "KLD", "KLD p99", "top-1", "prefill tok/s", "decode tok/s"]
    codec_header = _codec_header(result) if show_codec else None
    header += [codec_header] if show_codec else []
    for h in header:
        t.add_column(h, justify="left" if h in ("K/V", "stored as", codec_header) else "right")
    for name, r in result["types"].items():
        stored = f"{r['effective_k']}/{r['effective_v']}"
        row = [name, stored if r["fallback"] is None else f"{stored} (fallback)",
               f"{r['bytes_per_token']:,}", _mib(r["bytes_at_ctx"]), f"{r['bits_per_element']:.2f}",
               _fmt(r["ppl"], ".4f"), _fmt(r["kld"], ".5f"), _fmt(r["kld_p99"], ".4f"),
               _pct(r["top1"]), _fmt(r["prefill_tok_s"], ".1f"), _fmt(r["decode_tok_s"], ".1f")]
        t.add_row(*row, *([_codec_text(r["codec"])] if show_codec else []))
    console = Console(file=file, highlight=False, width=None if file.isatty() else 160)
    console.print(t)
    for name, r in result["types"].items():
        if r["fallback"]:
            console.print(f"{name}: stored as {r['effective_k']}/{r['effective_v']}: {r['fallback']}")
        if r["speed_error"]:
            console.print(f"{name}: speed not measured: {r['speed_error']}")


def _codec_items(codec: dict | None) -> list[tuple[str, str]]:
    return [(k.removeprefix("kv_"), v) for k, v in (codec or {}).items() if not k.endswith("note")]


def _codec_header(result: dict) -> str:
    """The codec column's title from the first reported codec: "rotation / centering / rounding"."""
    codec = next(t["codec"] for t in result["types"].values() if t["codec"])
    return " / ".join(k for k, _ in _codec_items(codec)) or "codec"


def _codec_text(codec: dict | None) -> str:
    """kv_rotation "hadamard-64", kv_rounding "lsq" -> "hadamard-64 / lsq" (the column title names them)."""
    return " / ".join(str(v) for _, v in _codec_items(codec)) or "-"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _title(result: dict) -> str:
    head = f"{result['model']}: K/V cache types on {result['device']}"
    if result["partial"]:
        head += f" (PARTIAL: interrupted after {result['chunks']} of {result['chunks_planned']} chunks)"
    return head


def _caption(result: dict) -> str:
    skip = result.get("skip_chunks", 0)
    first = f", from chunk {skip + 1}" if skip else ""
    return (f"{result['n_tokens']:,} tokens scored: the second half of {result['chunks']} chunk(s) of "
            f"{result['ctx']} tokens{first} (as llama-perplexity). KLD and top-1 against the "
            f"{result['reference']} cache; decode after a {result['ctx'] - result['decode_tokens']}-token "
            "prompt.")


def _require_matplotlib() -> None:
    """matplotlib is an optional extra (`kvslim[plot]`): a clear error where it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: "
                         "pip install 'kvslim[plot]' (or pip install matplotlib)") from None


def plot(result: dict, path: str | Path) -> None:
    """PNG with two panels: KLD against bits per element; KV memory against context length."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: f"C{i % 10}" for i, name in enumerate(result["types"])}  # same in both panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    _plot_kld(left, result, colors)
    _plot_memory(right, result, colors)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_kld(ax, result: dict, colors: dict) -> None:
    # a zero KLD (the reference itself) has no place on a log axis: it is named in the title
    points = [(n, r["bits_per_element"], r["kld"]) for n, r in result["types"].items()
              if r["kld"] is not None and r["kld"] > 0]
    for i, (name, bits, kld) in enumerate(points):
        ax.scatter(bits, kld, color=colors[name])
        # labels of near-equal points (same bits, KLD within 40%) stack instead of overprinting
        below = sum(b == bits and abs(math.log(k / kld)) < 0.35 for _, b, k in points[:i])
        ax.annotate(name, (bits, kld), textcoords="offset points", xytext=(5, 4 - 11 * below), fontsize=8)
    if points:
        ax.set_yscale("log")
    ax.set_xlabel("bits per element (K and V together)")
    ax.set_ylabel(f"mean KL divergence vs the {result['reference']} cache")
    ax.set_title(f"quality: {result['n_tokens']:,} tokens scored at ctx {result['ctx']} "
                 f"({result['reference']}: 0)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def _plot_memory(ax, result: dict, colors: dict) -> None:
    page, top = result["page_size"], result["context_length"]
    ctxs = sorted({max(1, top * i // 256) for i in range(257)})
    biggest = max(r["bytes_per_token"] for r in result["types"].values()) * top
    unit, scale = ("GiB", 2**30) if biggest >= 2**31 else ("MiB", 2**20)
    seen: list[int] = []
    for name, r in result["types"].items():
        # whole pages per sequence, as the cache allocates them (planner.kv_bytes)
        ys = [(r["bytes_per_token"] * page * -(-c // page) + r.get("window_bytes_per_sequence", 0))
              / scale for c in ctxs]  # windowed layers: their window's pages at any context
        style = ("-", "--", ":", "-.")[seen.count(r["bytes_per_token"]) % 4]  # equal sizes stay visible
        seen.append(r["bytes_per_token"])
        ax.plot(ctxs, ys, label=name, color=colors[name], linestyle=style)
    ax.axvline(result["ctx"], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("context length (tokens, one sequence)")
    ax.set_ylabel(f"K/V cache ({unit})")
    ax.set_title(f"memory (dotted: the bench's ctx {result['ctx']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------- CLI


def cli_register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="memory, quality (KLD vs f16) and speed per K/V cache type")
    p.add_argument("model", help="built-in name (smollm2) or path to a .gguf")
    p.add_argument("--text", metavar="FILE", help=f"text to score, .gz allowed (default {DEFAULT_TEXT}, "
                                                  "Debian package jargon-text)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per chunk; the second half of each is scored (default {DEFAULT_CTX})")
    p.add_argument("--types", default=",".join(planner.pair_name(*t) for t in planner.DEFAULT_TYPES),
                   help="comma-separated TYPE or K/V pairs (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, metavar="N",
                   help=f"chunks to score (default {DEFAULT_CHUNKS}; 0: the whole text)")
    p.add_argument("--skip-chunks", type=int, default=0, metavar="N",
                   help="leave out the first N chunks, e.g. front matter (default 0)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="use at most the first N tokens of the text")
    p.add_argument("--decode-tokens", type=int, default=DEFAULT_DECODE_TOKENS, metavar="N",
                   help=f"tokens to decode per type for the speed figures (default "
                        f"{DEFAULT_DECODE_TOKENS}; 0 skips speed)")
    p.add_argument("--speed-rounds", type=int, default=1, metavar="N",
                   help="repeat the speed runs N times, interleaved, and keep the fastest (default 1)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--flash-attn", "-fa", metavar="MODE", help="auto|on|off (a quantized V needs it)")
    p.add_argument("--kv-rotation", choices=("auto", "on", "off"),
                   help="Hadamard rotation of the K/V rows, where this kvslim has it")
    p.add_argument("--kv-centering", choices=("auto", "on", "off"),
                   help="centering of the K/V rows, where this kvslim has it")
    p.add_argument("--kv-rounding", metavar="MODE", help="block rounding (e.g. auto, lsq, ggml), "
                                                         "where this kvslim has it")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG: KLD vs bits/element, memory vs context")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def codec_options(args) -> dict:
    """The --kv-rotation / --kv-centering / --kv-rounding values that were given."""
    return {name: getattr(args, name) for name in CODEC_OPTIONS if getattr(args, name, None) is not None}


def cmd_bench(args) -> int:
    import json

    from kvslim.llm import LLM

    if args.ctx < 4:
        raise ValueError(f"--ctx must be at least 4 (half of each chunk is scored), got {args.ctx}")
    for name in ("chunks", "skip_chunks", "decode_tokens", "max_tokens"):
        if (getattr(args, name) or 0) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative")
    if args.speed_rounds < 1:
        raise ValueError(f"--speed-rounds must be at least 1, got {args.speed_rounds}")
    text = load_text(args.text)  # fail before the model loads
    planner.parse_types(args.types)
    if args.plot:
        _require_matplotlib()
    llm = LLM(args.model, cache_type_k="f16", cache_type_v="f16", flash_attn=args.flash_attn,
              num_ctx=args.ctx, device=args.device, progress=not args.no_progress,
              **_supported(LLM, codec_options(args)))
    result = bench(llm, text, args.types, ctx=args.ctx, chunks=args.chunks or None,
                   skip_chunks=args.skip_chunks, max_tokens=args.max_tokens, decode_tokens=args.decode_tokens,
                   speed_rounds=args.speed_rounds, codec=codec_options(args),
                   progress=not args.no_progress, model=args.model)
    result["text"] = str(Path(args.text or DEFAULT_TEXT).expanduser())
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 130 if result["partial"] else 0
