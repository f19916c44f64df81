"""Python API: ``LLM("smollm2", cache_type_k="q8_0", cache_type_v="q8_0")``.

``generate`` continues text as is; ``chat`` renders messages with the model's chat
template. Both return a ``Completion`` (``str()`` gives the text), or with
``stream=True`` a ``Stream`` that yields text pieces and holds the ``Completion`` once
it ends. Calls from several threads batch together in the engine's steps.

Settings resolve as: explicit argument > environment (``KVSLIM_KV_CACHE_TYPE``,
``KVSLIM_FLASH_ATTENTION``, ``KVSLIM_CONTEXT_LENGTH``, meaning what
``OLLAMA_KV_CACHE_TYPE``, ``OLLAMA_FLASH_ATTENTION`` and ``OLLAMA_CONTEXT_LENGTH``
mean to Ollama; ``KVSLIM_KV_ROTATION``, ``KVSLIM_KV_CENTERING``, ``KVSLIM_KV_ROUNDING``)
> defaults (f16, auto, 4096, auto), all in ``kvslim.settings``.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence as Seq

import torch

from kvslim import calibration, kvfile, models, store
from kvslim.cache import DEFAULT_PAGE_SIZE
from kvslim.chat import render_chat
from kvslim.engine import Engine, Sequence, StepOutput, truncate_dimensions
from kvslim.gguf_loader import ModelConfig, open_gguf, pooling_type
from kvslim.grammar import format_grammar
from kvslim.prefix import PrefixCache
from kvslim.sampling import SamplingParams
from kvslim.settings import (AUTO, compute_dtype, pick_device, resolve_cache_types, resolve_codec,
                             resolve_flash_attn, resolve_max_kld, resolve_num_ctx,
                             resolve_prefix_cache, resolve_weights)
from kvslim.tokenizer import Tokenizer
from kvslim.weights import resolve_mode

__all__ = ["LLM", "Completion", "Stream"]


# ---------------------------------------------------------------- results


@dataclass
class Completion:
    """A finished generation; ``str(completion)`` is its text. Durations in seconds."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "cancel"
    prompt_eval_count: int
    prompt_eval_duration: float
    eval_count: int
    eval_duration: float
    total_duration: float
    prompt_cache_count: int = 0  # prompt tokens reused from the prefix cache (not evaluated)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_sequence(cls, seq: Sequence) -> "Completion":
        s = seq.stats
        return cls(seq.text, seq.output_ids, seq.finish_reason, s.prompt_eval_count,
                   s.prompt_eval_duration, s.eval_count, s.eval_duration, s.total_duration,
                   s.prompt_cache_count)


class Stream:
    """Iterate for text pieces; ``completion`` is set when the stream ends.

    Closing it early (``close()``, ``break`` then garbage collection) cancels the request.
    """

    def __init__(self, llm: "LLM", seq: Sequence):
        self.seq, self.completion = seq, None
        self._llm = llm

    def __iter__(self) -> Iterator[str]:
        for out in self._llm._events(self.seq):
            if out.reason == "error":
                raise self.seq.error
            if out.text:
                yield out.text
        self.completion = Completion.from_sequence(self.seq)

    def close(self) -> None:
        """Cancel the request if it has not finished; safe to call more than once."""
        self._llm._release(self.seq)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- the API


class LLM:
    """A loaded model with its tokenizer and a quantized paged K/V cache.

    model: a built-in name (``smollm2``; pulled on first use when ``pull``) or a .gguf path.
    kv_cache_type / cache_type_k / cache_type_v: f16, q8_0, q4_0, ... (see ``formats.TYPES``),
    or kv_cache_type="auto": the pair of fewest bytes whose measured KLD vs f16 is at most
    kv_max_kld (default autotype.DEFAULT_MAX_KLD, env KVSLIM_KV_MAX_KLD), measured once per
    model and machine (``calibration.quality_table``).
    flash_attn: auto | on | off. num_parallel: sequences that can run at once.
    kv_rotation / kv_centering: auto | on | off; kv_rounding: auto | lsq | ggml (how a
    block-quantized cache codes its rows, ``kvslim.codec``; auto: all on for quantized
    types, off for f16/f32/bf16; env KVSLIM_KV_ROTATION / _CENTERING / _ROUNDING).
    prefix_cache: a prompt that starts with the whole pages of an earlier one (a chat's
    next turn) reuses their K/V instead of evaluating them again (``kvslim.prefix``;
    default on, env KVSLIM_PREFIX_CACHE); ``Completion.prompt_cache_count`` counts them.
    weights: quantized (default: the GGUF blocks stay as stored, read by fused CPU kernels)
    | dequantize (expanded to float at load; always so on GPU/MPS for now), ``kvslim.weights``;
    env KVSLIM_WEIGHTS.
    prompt_cache: a cache file written by ``save_cache`` (or ``kvslim cache-prompt``), loaded
    into the prefix cache (``load_cache``).
    """

    def __init__(self, model: str | os.PathLike = "smollm2", *, kv_cache_type: str | None = None,
                 cache_type_k: str | None = None, cache_type_v: str | None = None,
                 flash_attn: str | bool | None = None, num_ctx: int | None = None,
                 num_parallel: int = 1, device: str | None = "auto", pull: bool = True,
                 progress: bool = True, max_batch_tokens: int | None = None,
                 kv_rotation: str | bool | None = None, kv_centering: str | bool | None = None,
                 kv_rounding: str | None = None, prefix_cache: bool | None = None,
                 weights: str | None = None, kv_max_kld: float | None = None,
                 prompt_cache: str | os.PathLike | None = None):
        t0 = time.perf_counter()
        weights = resolve_weights(weights)
        self._progress = progress
        max_kld = resolve_max_kld(kv_max_kld)
        types = resolve_cache_types(kv_cache_type, cache_type_k, cache_type_v)
        flash = resolve_flash_attn(flash_attn)
        codec = resolve_codec(kv_rotation, kv_centering, kv_rounding)
        self.prefix_cache = resolve_prefix_cache(prefix_cache)
        self.device = pick_device(device)
        self.path = store.resolve(model, pull_missing=pull)
        reader = open_gguf(self.path)
        self.config: ModelConfig = ModelConfig.from_gguf(reader)
        self._data_offset, self._model_id = reader.data_offset, None
        self.tokenizer = Tokenizer.from_gguf(reader)
        card = store.card(self.path)  # a Modelfile's or the registry's TEMPLATE, SYSTEM, PARAMETERs
        self.tokenizer.set_chat_defaults(card.chat_template, card.system)
        self.default_options = {("max_tokens" if k == "num_predict" else k): v
                                for k, v in card.parameters.items() if k != "num_ctx"}
        num_ctx = num_ctx or card.parameters.get("num_ctx")
        self.pooling = pooling_type(reader)  # how embed() pools (the GGUF's, else mean)
        self.weights_mode = resolve_mode(weights, self.device, compute_dtype(self.device))
        self.model = models.load_model(reader, self.config, self.device,
                                       compute_dtype(self.device), progress=progress,
                                       weights=weights)
        self.name = str(model)
        self._lock = threading.Lock()  # one engine step (and its dispatch) at a time
        self._inbox: dict[int, collections.deque] = {}
        self.engine = self._new_engine(types, flash, num_ctx, num_parallel, max_batch_tokens, codec,
                                       max_kld)
        if prompt_cache is not None:
            self.load_cache(prompt_cache)
        self.load_duration = time.perf_counter() - t0

    def _new_engine(self, types, flash, num_ctx, num_parallel, max_batch_tokens, codec,
                    max_kld) -> Engine:
        ctx = resolve_num_ctx(num_ctx, self.config.context_length, self.device)
        extra = {"max_batch_tokens": max_batch_tokens} if max_batch_tokens else {}
        prefix = PrefixCache(DEFAULT_PAGE_SIZE) if self.prefix_cache else None
        auto = None
        if types == (AUTO, AUTO):
            auto = calibration.auto_cache_types(self.model, self.tokenizer, codec, max_kld, flash,
                                                progress=self._progress)
            types = (auto.type_k, auto.type_v)
        return Engine(self.model, self.tokenizer, cache_type_k=types[0], cache_type_v=types[1],
                      flash_attn=flash, num_ctx=ctx, num_parallel=num_parallel, codec=codec,
                      page_size=DEFAULT_PAGE_SIZE, prefix_cache=prefix, auto=auto, **extra)

    def reconfigure(self, *, kv_cache_type: str | None = None, cache_type_k: str | None = None,
                    cache_type_v: str | None = None, flash_attn: str | bool | None = None,
                    num_ctx: int | None = None, num_parallel: int | None = None,
                    kv_rotation: str | bool | None = None, kv_centering: str | bool | None = None,
                    kv_rounding: str | None = None, kv_max_kld: float | None = None) -> None:
        """Rebuild the K/V cache with new settings (weights stay); only while idle.

        Unspecified settings keep their current values. The old pool is freed first, so
        peak memory is one pool; on failure the old settings are rebuilt.
        """
        with self._lock:
            old = self.engine
            if old.has_work():
                raise RuntimeError("cannot change the K/V cache while requests are running")
            was = (AUTO, AUTO) if old.auto is not None else (old.plan.requested_k,
                                                             old.plan.requested_v)
            types = resolve_cache_types(None, cache_type_k or kv_cache_type or was[0],
                                        cache_type_v or kv_cache_type or was[1])
            max_kld = resolve_max_kld(kv_max_kld if kv_max_kld is not None else
                                      old.auto.max_kld if old.auto is not None else None)
            flash = resolve_flash_attn(flash_attn if flash_attn is not None else old.plan.flash_attn)
            ctx = resolve_num_ctx(num_ctx or old.num_ctx, self.config.context_length, self.device)
            codec = resolve_codec(kv_rotation, kv_centering, kv_rounding, base=old.codec_settings)
            previous = (was, old.plan.flash_attn, old.num_ctx, old.num_parallel,
                        old.max_batch_tokens, old.codec_settings,
                        old.auto.max_kld if old.auto is not None else max_kld)
            old.cache = self.engine = None  # drop the old pool before allocating the new one
            try:
                self.engine = self._new_engine(types, flash, ctx, num_parallel or previous[3],
                                               previous[4], codec, max_kld)
            except BaseException:
                self.engine = self._new_engine(*previous)
                raise

    # ---------------------------------------------------------------- text

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS added when the model wants it; special-token text parsed)."""
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, token_ids: Seq[int], *, skip_special: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special=skip_special)

    def chat_prompt(self, messages: Seq[Mapping]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready to generate."""
        return render_chat(self.tokenizer, messages)

    # ---------------------------------------------------------------- generation

    def generate(self, prompt: str | Seq[int], *, stream: bool = False, raw: bool = True,
                 system: str | None = None, truncate: bool = False, format=None, **options):
        """Continue ``prompt`` (text or token ids).

        raw=False wraps a text prompt in the chat template as a user turn (with
        ``system``), as Ollama's /api/generate does. Options (``SamplingParams``):
        max_tokens (or num_predict), temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, presence_penalty, frequency_penalty, seed, stop, ignore_eos.
        truncate: keep the start token and the latest tokens of a prompt longer than
        num_ctx instead of raising PromptTooLong. format: "json" (any JSON object) or a
        JSON schema (a dict) the answer must follow, as Ollama's ``format``
        (``kvslim.grammar``; ValueError for a schema it cannot compile).
        """
        if isinstance(prompt, str):
            if raw:
                ids = self.tokenize(prompt)
            else:
                turns = ([{"role": "system", "content": system}] if system else []) + \
                    [{"role": "user", "content": prompt}]
                ids = self.chat_prompt(turns)
        else:
            ids = list(prompt)
        return self._start(ids, options, stream, truncate, format)

    def chat(self, messages: Seq[Mapping], *, stream: bool = False, truncate: bool = False,
             format=None, **options):
        """Answer the last message of ``messages`` ([{"role": ..., "content": ...}, ...]);
        ``format`` as in ``generate``."""
        return self._start(self.chat_prompt(messages), options, stream, truncate, format)

    def generate_stream(self, prompt: str | Seq[int], **kw) -> Stream:
        return self.generate(prompt, stream=True, **kw)

    def chat_stream(self, messages: Seq[Mapping], **kw) -> Stream:
        return self.chat(messages, stream=True, **kw)

    def _start(self, ids: list[int], options: dict, stream: bool, truncate: bool, fmt=None):
        params = SamplingParams.from_options(**{**self.default_options, **options})
        grammar = format_grammar(fmt)
        constraint = grammar.constraint(self.tokenizer) if grammar is not None else None
        with self._lock:  # the inbox exists before any step can produce for the sequence
            seq = self.engine.add_request(ids, params, truncate=truncate, constraint=constraint)
            self._inbox[seq.id] = collections.deque()
        s = Stream(self, seq)
        if stream:
            return s
        for _ in s:
            pass
        return s.completion

    def _events(self, seq: Sequence) -> Iterator[StepOutput]:
        """This sequence's outputs, stepping the engine (for everyone) when it has none."""
        box = self._inbox.get(seq.id)
        try:
            while box is not None:
                with self._lock:
                    if not box:
                        self._dispatch(self.engine.step())
                    items = list(box)
                    box.clear()
                for out in items:
                    yield out
                    if out.finished:
                        return
        finally:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Cancel ``seq`` if it is unfinished (freeing its pages now) and drop its inbox."""
        if not seq.finished:
            self.engine.cancel(seq)
            with self._lock:
                self._dispatch(self.engine.reap())
        self._inbox.pop(seq.id, None)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            box = self._inbox.get(out.seq.id)
            if box is not None:
                box.append(out)

    # ---------------------------------------------------------------- cache files

    @property
    def model_id(self) -> str:
        """The model file's identity, as cache files record it (``kvfile.model_identity``)."""
        if self._model_id is None:
            self._model_id = kvfile.model_identity(self.path, self._data_offset)
        return self._model_id

    def save_cache(self, path: str | os.PathLike, prompt: str | Seq[int] | None = None, *,
                   system: str | None = None) -> dict:
        """Evaluate a prompt and save its K/V blocks, as stored, to ``path`` (``kvslim.kvfile``).

        prompt: text (tokenized with the start token, as ``generate``'s) or token ids; or
        ``system``: a system message, rendered with the chat template as the start of a
        chat (what ``chat`` and ``kvslim run --system`` begin with). The prompt also stays
        in this LLM's prefix cache. Returns {"path", "tokens", "evaluated", "bytes",
        "cache_bytes"}: file bytes and the cache bytes among them.
        """
        ids = self._cache_prompt_ids(prompt, system)
        extra = {"num_ctx": self.engine.num_ctx, "system": system, "model_name": self.name,
                 "device": self.device.type, "weights": self.weights_mode}
        out = {}

        def write(cache, cid):
            out["bytes"] = kvfile.save(path, cache, cid, ids, self.model_id, extra)
            out["cache_bytes"] = kvfile.held_bytes(cache, cid)

        with self._lock:
            evaluated = self.engine.keep_prefix(ids, write)
        return {"path": str(path), "tokens": len(ids), "evaluated": evaluated, **out}

    def _cache_prompt_ids(self, prompt, system) -> list[int]:
        if (prompt is None) == (system is None):
            raise ValueError("give a prompt or a system message to cache (one of them)")
        if system is not None:
            return self.system_prompt(system)
        return self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)

    def system_prompt(self, system: str) -> list[int]:
        """Token ids that start every chat whose first message is ``system`` (rendered alone,
        with no turn to answer yet)."""
        text = self.tokenizer.apply_chat_template([{"role": "system", "content": system}],
                                                  add_generation_prompt=False)
        ids = self.tokenize(text)
        if len(ids) > 1 and ids[0] == ids[1] == self.tokenizer.bos_id:
            ids = ids[1:]  # the template wrote BOS itself (as chat.render_chat)
        return ids

    def load_cache(self, path: str | os.PathLike) -> kvfile.SavedCache:
        """Restore a cache file into the prefix cache: a later prompt starting with its
        tokens reuses their K/V. ``kvfile.KVFileError`` (nothing restored) for a file that
        is damaged or written for another model, other cache types or another coding."""
        saved = kvfile.read(path)
        num_ctx = saved.extra.get("num_ctx")
        hint = (f"; the file was saved with num_ctx {num_ctx}, this model runs num_ctx "
                f"{self.engine.num_ctx}" if num_ctx != self.engine.num_ctx else "")
        kvfile.check(saved, self.engine.cache, self.model_id, self.config.vocab_size, hint)
        with self._lock:
            self.engine.add_prefix(saved.tokens, lambda cache: kvfile.restore(cache, saved),
                                   saved.pages(self.engine.cache.page_size))
        return saved

    # ---------------------------------------------------------------- scores and info

    def logits(self, token_ids: Seq[int]) -> torch.Tensor:
        """float32 logits [T, vocab] for every position, computed in chunks through the cache."""
        with self._lock:
            return self.engine.score(list(token_ids))

    def embed(self, texts: str | Seq[str], *, truncate: bool = True,
              dimensions: int | None = None) -> torch.Tensor:
        """Embeddings [B, d'] float32 of a text or a list of texts, as Ollama's /api/embed:
        the final hidden states pooled (``self.pooling``) and L2-normalised; with
        ``dimensions``, the first d' values renormalised. Inputs share forwards; no
        K/V pages are kept afterwards."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenize(t) for t in batch]
        with self._lock:
            vectors, _ = self.engine.embed(ids, self.pooling, truncate)
        return truncate_dimensions(vectors, dimensions)

    def kv_cache_info(self) -> dict:
        """Effective K/V types, any fallback and its reason, backend, bytes and capacity."""
        return self.engine.cache_info()

    def memory_info(self) -> dict:
        """Bytes held: weights as held (GGUF blocks, or dequantized), the K/V pool, total."""
        w, kv = self.model.weight_bytes, self.kv_cache_info()["bytes"]
        return {"weights": self.weights_mode, "weights_bytes": w, "kv_bytes": kv,
                "total_bytes": w + kv}

    def __repr__(self) -> str:
        i = self.kv_cache_info()
        return (f"LLM({self.name!r}, {self.config.arch}, device {self.device}, "
                f"K {i['type_k']} / V {i['type_v']}, num_ctx {i['num_ctx']})")
