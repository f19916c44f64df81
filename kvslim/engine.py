"""Sequences, scheduling and stop rules: one batched forward per ``step()``.

The engine owns one model, one tokenizer and one paged K/V cache shared by up to
``num_parallel`` sequences. Every ``step()`` packs the pending rows of all running
sequences into one forward: running sequences decode one token each, new ones prefill
in chunks sharing what is left of the ``max_batch_tokens`` budget (shortest first, each
at most an equal share), so a long prompt never holds back a short one. So a server thread can
call ``step()`` in a loop while request threads ``add_request`` / ``cancel`` (both are
thread-safe) and new requests join between steps (continuous batching).

Admission reserves the pages a sequence may ever need (prompt + max_tokens, capped at
num_ctx), so a running sequence never meets a full cache; a request that does not fit
waits in ``waiting`` until pages are freed.

An optional ``prefix_cache`` (duck-typed: ``attach``, ``retain``, ``evict``;
``kvslim.prefix.PrefixCache``) starts a sequence as a fork of cached pages of an
identical prompt prefix, keeps finished sequences' full pages, and gives pages back when
admission needs them. Room is therefore counted from the pool itself: free pages minus
the pages running sequences may still take.

Text: each output carries the text its tokens complete, with incomplete UTF-8 and any
tail that may be the start of a stop string held back until it is decided.

A request may carry a grammar (``kvslim.grammar``): its sequence samples only tokens the
grammar allows, advances the grammar with each one, and stops when the grammar ends.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvslim import heap
from kvslim.attention import Attention, AttentionPlan, plan_attention
from kvslim.cache import DEFAULT_PAGE_SIZE, CacheFull, KVCache, window_pages
from kvslim.calibration import build_codec
from kvslim.chat import PromptTooLong, fit_prompt, max_length
from kvslim.codec import CodecSettings, decide
from kvslim.sampling import Sampler, SamplingParams, greedy_rows, token_logprobs
from kvslim.weights import step_rows

log = logging.getLogger("kvslim")

__all__ = ["Engine", "Sequence", "StepOutput", "PromptTooLong", "DEFAULT_NUM_CTX", "POOLINGS",
           "truncate_dimensions"]

# Ollama's default context on machines under 24 GiB of VRAM (and on CPU) is 4k;
# docs/context-length.mdx: 32k for 24-48 GiB, 256k above. Capped at the model's maximum.
DEFAULT_NUM_CTX = 4096
DEFAULT_BATCH_TOKENS = 512

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
POOLINGS = ("mean", "cls", "last")  # how embed() pools a sequence's hidden states


def run_step(model, attn: Attention, cache: KVCache, cache_ids: list[int], q_lens: list[int],
             tokens: list[int], logit_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One forward step: reserve its slots (all or nothing), run the model, and roll the
    cache back to the tokens it held before if anything fails.

    tokens packed like q_lens -> logits [R, V] float32 for logit_rows (None: every row).
    """
    step = attn.begin(cache, cache_ids, q_lens)
    try:
        return model.forward(torch.tensor(tokens), step, logit_rows)
    except BaseException:
        step.rollback()
        raise


class StepOutput(NamedTuple):
    seq: "Sequence"
    token_ids: list[int]  # tokens sampled this step (empty for a prefill chunk or a cancel)
    text: str  # text released this step
    finished: bool
    reason: str | None  # "stop" (EOS or stop string), "length", "cancel", "error" (seq.error)
    # per token of token_ids when params.logprobs is set: (logprob, [(id, logprob)] top-k)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass(eq=False)
class Stats:
    """Ollama's counters for one sequence (durations in seconds)."""

    prompt_eval_count: int = 0
    prompt_cache_count: int = 0  # prompt tokens reused from the prefix cache (not evaluated)
    prompt_eval_duration: float = 0.0
    eval_count: int = 0
    eval_duration: float = 0.0
    created: float = 0.0
    finished: float = 0.0

    @property
    def total_duration(self) -> float:
        return (self.finished or time.perf_counter()) - self.created


class Sequence:
    """One request: its tokens, how many are in the cache, its sampler and text state."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                 num_ctx: int, decoder, eog_ids: set[int], constraint=None):
        self.id = seq_id
        self.params = params
        self.token_ids = list(prompt_ids)  # prompt then generated
        self.n_prompt = len(prompt_ids)
        self.n_cached = 0  # tokens of token_ids already in the cache
        self.cache_id: int | None = None
        self.status = WAITING
        self.finish_reason: str | None = None
        self.text = ""  # all text released so far
        self.stats = Stats(created=time.perf_counter())
        self.sampler = Sampler(params, constraint)
        self.max_len = max_length(self.n_prompt, num_ctx, params.max_tokens)
        self._decoder = decoder
        self._eog = set() if params.ignore_eos else eog_ids
        self._held = ""  # decoded text not released yet (may start a stop string)
        self.cancelled = False
        self.error: Exception | None = None  # why it finished with reason "error"
        self.logprobs: list = []  # per generated token, when params.logprobs is set
        # n > 1: the group's sequences; a sibling waits (fork_parent set) until the
        # parent's prompt is in the cache, then starts as a copy-on-write fork of it
        self.group: list[Sequence] = [self]
        self.fork_parent: Sequence | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.n_prompt:]

    @property
    def n_generated(self) -> int:
        return len(self.token_ids) - self.n_prompt

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def pending(self) -> int:
        """Tokens to feed before the next sample."""
        return len(self.token_ids) - self.n_cached

    def accept(self, token: int) -> tuple[str, str | None]:
        """Record a sampled token; return (text released, finish reason or None)."""
        self.token_ids.append(token)
        if token in self._eog:
            return self._release_all(), "stop"
        grammar_ended = self.sampler.accept(token)
        self._held += self._decoder.push(token)
        text, stopped = self._check_stop()
        if stopped:
            return text, "stop"
        if grammar_ended:
            return text + self._release_all(), "stop"
        if self.n_generated >= (self.params.max_tokens or float("inf")):
            return text + self._release_all(), "length"
        return text, None

    def _check_stop(self) -> tuple[str, bool]:
        stops, held = self.params.stop, self._held
        if not stops:
            self._held = ""
            return held, False
        hits = [i for i in (held.find(s) for s in stops) if i >= 0]
        if hits:
            self._held = ""
            return held[:min(hits)], True
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:n])), default=0)  # a tail that may start a stop
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def _release_all(self) -> str:
        text, self._held = self._held + self._decoder.flush(), ""
        return text


class Engine:
    """Batched generation over one paged cache."""

    def __init__(self, model, tokenizer, *, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 flash_attn: str = "auto", num_ctx: int = DEFAULT_NUM_CTX, num_parallel: int = 1,
                 max_batch_tokens: int = DEFAULT_BATCH_TOKENS, page_size: int = DEFAULT_PAGE_SIZE,
                 n_pages: int | None = None, prefix_cache=None, codec: CodecSettings | None = None,
                 auto=None):
        """``n_pages`` sizes the pool directly (a memory budget); default num_ctx x num_parallel.
        Layers on a sliding window get their own pages: num_parallel x what one sequence
        of num_ctx holds at once (``kvslim.cache.window_pages``).

        ``codec``: rotation / centering / rounding of the K/V rows (``kvslim.codec``;
        default all auto), fixed for this engine's pool. ``auto``: the autotype.AutoChoice
        the types came from (``--kv-cache-type auto``), reported by ``cache_info``.
        """
        self.auto = auto
        if num_ctx > model.config.context_length:
            raise ValueError(f"num_ctx {num_ctx} is above the model's maximum context "
                             f"{model.config.context_length}")
        if min(num_ctx, num_parallel, max_batch_tokens) < 1:
            raise ValueError("num_ctx, num_parallel and max_batch_tokens must be positive")
        self.model, self.tokenizer = model, tokenizer
        heap.tune(model.device)  # a prompt's activations mapped, not kept (kvslim.heap)
        self.num_ctx, self.num_parallel, self.max_batch_tokens = num_ctx, num_parallel, max_batch_tokens
        self.plan: AttentionPlan = plan_attention(
            model.device, model.config.head_dim, cache_type_k, cache_type_v, flash_attn,
            v_head_dim=model.config.v_head_dim)
        self.attn = Attention(self.plan)
        n_pages = n_pages or num_parallel * -(-num_ctx // page_size)
        self.codec_settings = codec or CodecSettings()
        self.codec = decide(self.codec_settings, self.plan.effective_k, self.plan.effective_v,
                            model.cache_head_dim)
        if self.codec.note:
            log.warning("%s", self.codec.note)
        self.cache: KVCache = model.new_cache(
            n_pages, page_size, self.plan.effective_k, self.plan.effective_v,
            codec=build_codec(model, tokenizer, self.codec, num_ctx),
            window_pages=num_parallel * max(
                [window_pages(w, page_size, num_ctx, max_batch_tokens)
                 for w in model.layer_windows() if w] + [1]))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards waiting / cancels across threads
        self._step_lock = threading.Lock()  # one forward at a time
        self._cancels: list[Sequence] = []
        self.prefix_cache = prefix_cache

    # ---------------------------------------------------------------- requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    truncate: bool = False, num_ctx: int | None = None,
                    constraint=None, n: int = 1) -> Sequence:
        """Queue a prompt; thread-safe. PromptTooLong if it exceeds num_ctx (unless truncate).

        ``num_ctx``: this sequence's context limit (default the engine's, at most the
        model's); sequences with different limits share the pool. ``constraint``: this
        sequence's grammar state (``Grammar.constraint()``, built by the caller so that a
        first use's tokenizer table is not built in a step), None for free text. ``n`` > 1:
        ``seq.group`` holds n sequences answering the same prompt, admitted together; the
        prompt is evaluated once and the others fork its pages (a seed, if given, is seed + i).
        """
        params = params or SamplingParams()
        num_ctx = num_ctx or self.num_ctx
        if num_ctx > self.model.config.context_length:
            raise ValueError(f"num_ctx {num_ctx} is above the model's maximum context "
                             f"{self.model.config.context_length}")
        prompt_ids = self._fit_prompt(list(prompt_ids), truncate, params.max_tokens, num_ctx)
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else _NoText()
        eog = self.tokenizer.eog_ids if self.tokenizer is not None else set()
        seq = Sequence(next(self._ids), prompt_ids, params, num_ctx, decoder, eog, constraint)
        if not 1 <= n <= self.num_parallel:
            raise ValueError(f"n must be between 1 and the sequences that run at once "
                             f"({self.num_parallel}), got {n}")
        if n > 1 and constraint is not None:  # one grammar state cannot follow n answers
            raise ValueError("n > 1 cannot be combined with format, response_format or tools")
        for i in range(1, n):
            seed = params.seed + i if params.seed is not None and params.seed >= 0 else None
            sib = Sequence(next(self._ids), prompt_ids, dataclasses.replace(params, seed=seed),
                           num_ctx, self.tokenizer.stream_decoder() if self.tokenizer else _NoText(), eog)
            sib.fork_parent = seq
            seq.group.append(sib)
        for s in seq.group[1:]:
            s.group = seq.group
        need = self._group_pages(seq)
        if any(k > total for k, total in zip(need, self.cache.pages_per_group())):
            raise ValueError(f"a request of {n} x {seq.max_len} tokens cannot fit in the K/V pool "
                             f"({self.cache.capacity} tokens)")
        with self._lock:
            self.waiting.append(seq)
        return seq

    def _fit_prompt(self, ids: list[int], truncate: bool, max_tokens: int | None = None,
                    num_ctx: int | None = None) -> list[int]:
        return fit_prompt(ids, num_ctx=num_ctx or self.num_ctx, vocab_size=self.model.config.vocab_size,
                          model_max=self.model.config.context_length, truncate=truncate,
                          max_tokens=max_tokens,
                          bos_id=self.tokenizer.bos_id if self.tokenizer is not None else None)

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence and free its pages at the next step; thread-safe."""
        with self._lock:
            for s in seq.group if seq.fork_parent is None else [seq]:  # a parent takes its group
                if not s.cancelled and not s.finished:
                    s.cancelled = True
                    self._cancels.append(s)

    def reap(self) -> list[StepOutput]:
        """Apply pending cancellations now (free their pages) without running a forward."""
        with self._step_lock:
            return self._process_cancels()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._cancels)

    # ---------------------------------------------------------------- stepping

    def step(self) -> list[StepOutput]:
        """One batched forward over the running sequences; what each one produced."""
        with self._step_lock:
            outputs = self._process_cancels()
            self._admit()
            if not self.running:
                return outputs
            return outputs + self._run(self._schedule())

    def _process_cancels(self) -> list[StepOutput]:
        with self._lock:
            cancels, self._cancels = self._cancels, []
            for seq in cancels:
                if seq in self.waiting:
                    self.waiting.remove(seq)
        outputs = []
        for seq in cancels:
            if not seq.finished:
                self._finish(seq, "cancel")
                outputs.append(StepOutput(seq, [], "", True, "cancel"))
        return outputs

    def _pages_for(self, seq: Sequence, cache_id: int | None = None) -> list[int]:
        """Pages per cache group that ``seq`` may still take (``KVCache.claim``); a fork's
        shared last page is copied before it is written: one page more per group."""
        need = self.cache.claim(cache_id, seq.max_len, self.max_batch_tokens)
        if len(seq.group) > 1 and seq is not seq.group[0]:
            need = [k + 1 for k in need]
        return need

    def _group_pages(self, seq: Sequence, cache_id: int | None = None) -> list[int]:
        """Pages per cache group that ``seq`` and the other answers of its group (n > 1)
        may take, ``seq`` holding ``cache_id``."""
        return _per_group(self._pages_for(s, cache_id if s is seq else None) for s in seq.group)

    def _room(self) -> list[int]:
        """Free pages per cache group not promised to running sequences."""
        room = self.cache.free_per_group()
        for s in self.running:
            room = [r - c for r, c in zip(room, self._pages_for(s, s.cache_id))]
        return room

    def _make_room(self, need: list[int] | Callable[[], list[int]]) -> bool:
        """Whether ``need`` pages per group (a list, or a function giving it) can be
        promised, evicting cached prefixes if that helps. A function's need is asked again
        after the eviction: a fork of an entry that was dropped holds its window pages
        alone then, so it claims fewer (``KVCache.claim``)."""
        need_now = need if callable(need) else lambda: need
        short = [n - r for n, r in zip(need_now(), self._room())]
        if max(short) > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(self.cache, short)
        return all(n <= r for n, r in zip(need_now(), self._room()))

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) + len(self.waiting[0].group) <= self.num_parallel:
                seq = self.waiting[0]
                cache_id, reused = self._attach(seq)
                if not self._make_room(lambda: self._group_pages(seq, cache_id)):
                    self.cache.free(cache_id)
                    break  # FIFO: later requests wait behind it
                self.waiting.popleft()
                seq.cache_id, seq.n_cached, seq.stats.prompt_cache_count = cache_id, reused, reused
                for s in seq.group:
                    if s is not seq:  # an empty sequence until it forks the parent's prompt
                        s.cache_id = self.cache.new_sequence()
                    s.status = RUNNING
                    self.running.append(s)

    def _attach(self, seq: Sequence) -> tuple[int, int]:
        """(cache sequence, tokens reused): a fork of a cached prefix (whole pages, at least
        one prompt token left to evaluate) or a new empty sequence."""
        if self.prefix_cache is None:
            return self.cache.new_sequence(), 0
        return self.prefix_cache.attach(self.cache, seq.token_ids[:seq.n_prompt - 1])

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, rows to feed) for this step: every decode gets its row, then what is
        left of ``max_batch_tokens`` is shared max-min fairly among the prefills.

        Prefills go shortest-remaining first and each takes at most an equal share of
        what is still left, so a short prompt finishes in the step after it arrives
        while a long one is chunked, and the long one still gets at least
        budget / prefills rows a step (no starvation); alone it gets the whole budget.
        """
        ready = [s for s in self.running if s.fork_parent is None]  # siblings wait for the fork
        batch = [(s, 1) for s in ready if s.pending() == 1]
        budget = self.max_batch_tokens - len(batch)
        prefills = sorted((s for s in ready if s.pending() > 1), key=Sequence.pending)
        for i, s in enumerate(prefills):
            if budget < 1:
                break
            share = -(-budget // (len(prefills) - i))  # ceil: a budget < prefills goes 1 each
            batch.append((s, min(s.pending(), share)))
            budget -= batch[-1][1]
        return batch

    def _run(self, batch: list[tuple[Sequence, int]]) -> list[StepOutput]:
        tokens, rows, row = [], [], 0
        for s, n in batch:
            tokens.extend(s.token_ids[s.n_cached:s.n_cached + n])
            row += n
            if n == s.pending():
                rows.append(row - 1)  # the last row of a sequence that is caught up
        t0 = time.perf_counter()
        decode = sum(1 for s, n in batch if n == 1 == s.pending())  # _schedule puts them first
        logits = self._forward([s.cache_id for s, _ in batch], [n for _, n in batch], tokens,
                               rows, decode)
        outputs = []
        sampled = [s for s, n in batch if n == s.pending()]
        for s, n in batch:
            s.n_cached += n
        ids = self._sample(sampled, logits)
        if len(tokens) - decode >= heap.TRIM_MIN_ROWS:  # a prompt's freed activations back
            heap.trim(self.model.device)
        elapsed = time.perf_counter() - t0
        for s, n in batch:
            if s.n_cached <= s.n_prompt:  # this step evaluated prompt tokens
                s.stats.prompt_eval_count += n
                s.stats.prompt_eval_duration += elapsed
            else:
                s.stats.eval_duration += elapsed
        for i, (s, tok) in enumerate(zip(sampled, ids)):
            outputs += self._fork_group(s, logits[i])
            outputs.append(self._after_sample(s, tok, logits[i]) if isinstance(tok, int)
                           else self._fail(s, tok))
        return outputs

    def _forward(self, cache_ids: list[int], q_lens: list[int], tokens: list[int],
                 rows: list[int], decode: int) -> torch.Tensor:
        """The step's logits [len(rows), V]; its first ``decode`` rows are decode rows (each
        sampled: rows starts 0..decode-1), each row's weights path fixed whatever shares
        the step (``step_rows``).

        A model that runs decode steps its own way (``fused``: the step as one CPU job,
        whose results need not equal the separate calls' bit for bit) gets a step of
        decode and prompt rows as two forwards, the decode rows first: a decode row's
        logits are then the same whether prompt rows share its step or not (batch
        invariance); the weights are read twice either way (the decode rows' GEMV, the
        prompt rows' tiles)."""
        if not 0 < decode < len(q_lens) or getattr(self.model, "fused", None) is None:
            with step_rows(decode):
                return run_step(self.model, self.attn, self.cache, cache_ids, q_lens, tokens,
                                torch.tensor(rows, dtype=torch.long))
        first = self.attn.begin(self.cache, cache_ids[:decode], q_lens[:decode])
        try:
            with step_rows(decode):
                a = self.model.forward(torch.tensor(tokens[:decode]), first,
                                       torch.arange(decode))
            with step_rows(0):
                b = run_step(self.model, self.attn, self.cache, cache_ids[decode:],
                             q_lens[decode:], tokens[decode:],
                             torch.tensor(rows[decode:], dtype=torch.long) - decode)
        except BaseException:
            first.rollback()
            raise
        return torch.cat([a, b])

    def _fork_group(self, parent: Sequence, logits: torch.Tensor) -> list[StepOutput]:
        """The parent's prompt is in the cache (its first token sampled from ``logits`` [V]):
        each waiting sibling becomes a copy-on-write fork of it and samples its own first
        token from the same logits."""
        outputs = []
        for s in parent.group:
            if s.fork_parent is not parent or s.finished:
                continue
            self.cache.free(s.cache_id)
            s.cache_id, s.n_cached, s.fork_parent = self.cache.fork(parent.cache_id), parent.n_cached, None
            s.stats.prompt_cache_count = parent.stats.prompt_cache_count
            tok = self._sample_one(s, logits)
            outputs.append(self._after_sample(s, tok, logits) if isinstance(tok, int) else self._fail(s, tok))
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """Next token per sequence, or the error that sampling it raised. logits [len(seqs), V]."""
        plain = [s.params.greedy and not s.params.penalized and s.sampler.constraint is None
                 for s in seqs]
        best = greedy_rows(logits) if any(plain) else []  # one op for those rows
        return [best[i] if p else self._sample_one(s, logits[i])
                for i, (s, p) in enumerate(zip(seqs, plain))]

    @staticmethod
    def _sample_one(s: Sequence, logits: torch.Tensor) -> int | Exception:
        try:
            return s.sampler(logits, s.token_ids)
        except Exception as e:  # noqa: BLE001 - one sequence's failure must not end the batch
            return e

    def _fail(self, s: Sequence, error: Exception) -> StepOutput:
        """End one sequence with ``error`` (its pages freed); the others go on."""
        log.warning("sequence %d failed while sampling: %s", s.id, error)
        s.error = error
        self._finish(s, "error")
        return StepOutput(s, [], "", True, "error")

    def _after_sample(self, s: Sequence, tok: int, logits: torch.Tensor | None = None) -> StepOutput:
        lp = None
        if s.params.logprobs is not None and logits is not None:
            lp = [token_logprobs(logits, tok, s.params.logprobs)]
            s.logprobs += lp
        text, reason = s.accept(tok)
        s.stats.eval_count += 1
        if reason is None and len(s.token_ids) > s.max_len:
            # the next step would feed a token past num_ctx (or the reservation)
            text, reason = text + s._release_all(), "length"
        s.text += text
        if reason is not None:
            self._finish(s, reason)
        return StepOutput(s, [tok], text, reason is not None, reason, lp)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == RUNNING:
            if self.prefix_cache is not None:  # keep its full pages for a later identical prefix
                self.prefix_cache.retain(self.cache, seq.cache_id, seq.token_ids[:seq.n_cached])
            self.cache.free(seq.cache_id)
            self.running.remove(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        seq.stats.finished = time.perf_counter()

    # ---------------------------------------------------------------- scoring

    def score(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """float32 logits [T, V] for every position of ``token_ids``, through the cache.

        Runs as its own sequence between steps (the cache must have room for T tokens).
        """
        ids = self._fit_prompt(list(token_ids), truncate=False)
        chunk = chunk or self.max_batch_tokens
        with self._step_lock:
            need = self.cache.claim(None, len(ids), chunk)
            if not self._make_room(need):
                raise ValueError(f"no room in the K/V pool for {len(ids)} tokens while "
                                 f"{len(self.running)} sequences run")
            cid = self.cache.new_sequence()
            try:
                out = [run_step(self.model, self.attn, self.cache, [cid], [len(ids[i:i + chunk])],
                                ids[i:i + chunk]).cpu()
                       for i in range(0, len(ids), chunk)]
            finally:
                self.cache.free(cid)
        return torch.cat(out)

    # ---------------------------------------------------------------- embeddings

    def embed(self, inputs: list[list[int]], pooling: str = "mean", truncate: bool = True,
              num_ctx: int | None = None, normalize: bool = True) -> tuple[torch.Tensor, int]:
        """(vectors [B, d] float32, tokens evaluated): each input's final normed hidden
        states pooled (``POOLINGS``: mean, cls = first token, last) and L2-normalised
        (unless ``normalize`` is false: Ollama's legacy /api/embeddings).

        Inputs longer than ``num_ctx`` (default the engine's) keep their first num_ctx
        tokens, or raise PromptTooLong without ``truncate``. They run between steps as
        sequences of their own, packed into shared forwards of up to max_batch_tokens
        rows (a longer input alone, in chunks), and their pages are freed afterwards;
        CacheFull when the pool has no room for them now.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        limit = min(num_ctx or self.num_ctx, self.model.config.context_length)
        ids = [self._embed_ids(list(x), truncate, limit) for x in inputs]
        pooled = []
        with self._step_lock:
            for group in _pack(ids, self.max_batch_tokens):
                hidden = self._hidden(group)  # [sum of lengths, d]
                for h in hidden.split([len(x) for x in group]):
                    pooled.append(h.mean(0) if pooling == "mean" else h[0] if pooling == "cls" else h[-1])
        vectors = torch.stack(pooled) if pooled else torch.empty(0, self.model.config.d_model)
        vectors = torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors
        return vectors, sum(map(len, ids))

    def _embed_ids(self, ids: list[int], truncate: bool, limit: int) -> list[int]:
        if not ids:
            raise ValueError("an input to embed has no tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if len(ids) > limit and not truncate:
            raise PromptTooLong(f"the input has {len(ids)} tokens, more than the context "
                                f"length of {limit} (truncate is false)")
        return ids[:limit]  # Ollama's truncate keeps the beginning

    def _hidden(self, group: list[list[int]]) -> torch.Tensor:
        """Final hidden states [T, d] float32 of the group's inputs, each as a fresh
        sequence (the group halved while the pool has no room for it); the pages are
        freed whatever happens."""
        need = _per_group(self.cache.claim(None, len(x), self.max_batch_tokens) for x in group)
        if not self._make_room(need):
            if len(group) > 1:  # smaller forwards fit where the whole group does not
                half = len(group) // 2
                return torch.cat([self._hidden(group[:half]), self._hidden(group[half:])])
            raise CacheFull(f"no room in the K/V pool for {sum(map(len, group))} tokens to embed "
                            f"while {len(self.running)} sequences run")
        cids = [self.cache.new_sequence() for _ in group]
        try:
            if len(group) == 1:  # one input, possibly longer than a step: in chunks
                x, c = group[0], self.max_batch_tokens
                return torch.cat([self._forward_hidden(cids, [x[i:i + c]]) for i in range(0, len(x), c)])
            return self._forward_hidden(cids, group)
        finally:
            for cid in cids:
                self.cache.free(cid)

    def _forward_hidden(self, cids: list[int], parts: list[list[int]]) -> torch.Tensor:
        step = self.attn.begin(self.cache, cids, [len(p) for p in parts])
        with step_rows(0):  # every row a prompt row: a text's vector is the same in any batch
            return self.model.forward(torch.tensor([t for p in parts for t in p]), step, None,
                                      hidden=True).cpu()

    # ---------------------------------------------------------------- kept prefixes

    def keep_prefix(self, token_ids: list[int], save=None) -> int:
        """Evaluate ``token_ids`` into a cache sequence (reusing cached prefixes), show it to
        ``save(cache, cid)`` (a cache file's writer), then keep it in the prefix cache (all
        of it, partial last page included) or free it. Returns the tokens evaluated."""
        ids = self._fit_prompt(list(token_ids), truncate=False)
        with self._step_lock:
            cid, reused = (self.prefix_cache.attach(self.cache, ids) if self.prefix_cache
                           else (self.cache.new_sequence(), 0))
            try:  # claim counts the pages cid already holds (a reused partial page is its own)
                if not self._make_room(lambda: self.cache.claim(cid, len(ids), self.max_batch_tokens)):
                    raise ValueError(f"no room in the K/V pool for {len(ids)} tokens while "
                                     f"{len(self.running)} sequences run")
                for i in range(reused, len(ids), self.max_batch_tokens):
                    chunk = ids[i:i + self.max_batch_tokens]
                    run_step(self.model, self.attn, self.cache, [cid], [len(chunk)], chunk,
                             torch.tensor([len(chunk) - 1]))
                if save is not None:
                    save(self.cache, cid)
                if self.prefix_cache is not None:
                    owned, cid = cid, None
                    self.prefix_cache.insert(self.cache, owned, ids)
            finally:
                if cid is not None:
                    self.cache.free(cid)
        return len(ids) - reused

    def add_prefix(self, tokens: list[int], restore, pages: list[int] | None = None) -> None:
        """Keep restored K/V in the prefix cache: ``restore(cache) -> cid`` writes the blocks
        of ``tokens`` into a new sequence of ``pages`` per cache group (default: what a
        sequence of them may hold; room is made for them first)."""
        if self.prefix_cache is None:
            raise ValueError("a restored K/V cache is kept in the prefix cache, which is off "
                             "(prefix_cache=False or KVSLIM_PREFIX_CACHE=0)")
        if len(tokens) >= self.num_ctx:
            raise ValueError(f"the saved cache holds {len(tokens)} tokens, no fewer than "
                             f"num_ctx={self.num_ctx}: no room would be left to continue it")
        with self._step_lock:
            need = pages or self.cache.claim(None, len(tokens), self.max_batch_tokens)
            if not self._make_room(need):
                raise ValueError(f"no room in the K/V pool for {len(tokens)} restored tokens "
                                 f"while {len(self.running)} sequences run")
            self.prefix_cache.insert(self.cache, restore(self.cache), list(tokens))

    # ---------------------------------------------------------------- reporting

    def cache_info(self) -> dict:
        """Effective types, fallback, backend and exact bytes of the K/V cache."""
        c, p = self.cache, self.plan
        return {
            "type_k": p.effective_k, "type_v": p.effective_v,
            "requested_k": p.requested_k, "requested_v": p.requested_v,
            "fallback": p.fell_back, "reason": p.reason,
            "backend": p.backend, "fused": p.fused, "flash_attn": p.flash_attn,
            "device": str(c.device), "bytes": c.nbytes,
            **self._window_info(),
            "capacity_tokens": c.capacity, "num_ctx": self.num_ctx,
            "num_parallel": self.num_parallel, "page_size": c.page_size,
            "pages_total": c.n_pages, "pages_in_use": c.pages_in_use,
            **self.codec.describe(),
            **(self.auto.describe() if self.auto is not None else {}),
        }


    def _window_info(self) -> dict:
        """Bytes per token of context (the global layers) and what the layers on a
        sliding window hold per sequence whatever its length (0 without them)."""
        c = self.cache
        windows = c.window_groups()
        per_token = c.groups[0].nbytes // c.capacity if len(windows) < len(c.groups) else 0
        fixed = sum(g.nbytes // g.n_pages * c.claim(None, self.num_ctx, self.max_batch_tokens)[i]
                    for i, g in enumerate(c.groups) if g.window)
        out = {"bytes_per_token": per_token}
        if windows:
            out |= {"window": max(g.window for g in windows),
                    "window_bytes_per_sequence": fixed,
                    "window_pages_total": sum(g.n_pages for g in windows),
                    "window_pages_in_use": sum(g.n_pages - len(g.free) for g in windows)}
        return out


def truncate_dimensions(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """vectors [B, d] -> their first ``dimensions`` values [B, dimensions], renormalised
    (Ollama's ``dimensions``; meaningful for Matryoshka-trained models)."""
    if dimensions is None:
        return vectors
    if not 1 <= dimensions <= vectors.shape[-1]:
        raise ValueError(f"dimensions must be between 1 and {vectors.shape[-1]}, got {dimensions}")
    return torch.nn.functional.normalize(vectors[:, :dimensions], dim=-1)


def _per_group(needs) -> list[int]:
    """The sum, group by group, of per-group page counts."""
    return [sum(k) for k in zip(*needs)]


def _pack(inputs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Consecutive inputs grouped so that each group holds at most ``budget`` tokens (an
    input longer than that is a group of its own)."""
    groups, size = [], budget
    for x in inputs:
        if size + len(x) > budget:
            groups.append([])
            size = 0
        groups[-1].append(x)
        size += len(x)
    return groups


class _NoText:
    """Stream decoder stand-in when the engine runs without a tokenizer (tests, scoring)."""

    def push(self, tid: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
