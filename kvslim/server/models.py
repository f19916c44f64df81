"""Loaded models: weights, tokenizer and the K/V pool each one serves from, by name.

A ``Runner`` is one loaded model with its current engine (paged pool) and the scheduler
thread that steps it. The pool is sized from ``KVSLIM_KV_MEMORY`` in exact page bytes,
or the server's num_ctx x num_parallel. A request's num_ctx limits its own sequence in
that pool (requests with different num_ctx run side by side). A request asking for other
cache types, or leaving them out while the pool holds another request's types, waits
for the running sequences to finish; the pool is then rebuilt (``CacheRequest``): the
weights stay, the old pool and its cached prefixes are dropped.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
import math
import time
from pathlib import Path

import torch

from kvslim import formats, store
from kvslim.attention import plan_attention
from kvslim.cache import DEFAULT_PAGE_SIZE, KVCache
from kvslim.chat import fit_chat, fit_prompt, max_length, prompt_limit, render_chat
from kvslim.engine import Engine
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.models import load_model
from kvslim.kvfile import model_identity
from kvslim.prefix import DiskPrefixCache, PrefixCache
from kvslim.server.scheduler import Scheduler
from kvslim.server.types import CacheConfig, CacheRequest, ModelNotFound, PoolTooLarge, ServerBusy
from kvslim.settings import (ServerSettings, compute_dtype, pick_device, resolve_codec,
                             resolve_num_ctx)
from kvslim.tokenizer import Tokenizer

log = logging.getLogger("kvslim.server")

__all__ = ["Runner", "Registry", "model_details"]

HANDOFF_S = 10.0  # a claim (get() to the job's submit) keeps an idle model loaded this long at most
FOREVER_S = 292 * 365.25 * 86400  # what Ollama's "forever" expiry (now + max int64 ns) shows
REAP_POLL_S = 0.25  # how often a busy model with a finite keep_alive is checked


def _available_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate, when that can be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def model_details(config: ModelConfig) -> dict:
    """Ollama's ``details`` object."""
    n = config.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
    return {"parent_model": "", "format": "gguf", "family": config.arch, "families": [config.arch],
            "parameter_size": size, "quantization_level": config.file_type_name or ""}


class Runner:
    """One loaded model: weights, tokenizer, the engine over its pool, and its scheduler
    (which steps it as a ``kvslim.server.types.Pool``)."""

    def __init__(self, name: str, path: Path, settings: ServerSettings):
        t0 = time.perf_counter()
        self.name, self.path, self.settings = name, Path(path), settings
        self.device = pick_device(settings.device)
        reader = open_gguf(self.path)
        self.config = ModelConfig.from_gguf(reader)
        self.model_id = model_identity(self.path, reader.data_offset)  # for prefix cache files
        self.tokenizer = Tokenizer.from_gguf(reader)
        self.model = load_model(reader, self.config, self.device, compute_dtype(self.device),
                                progress=False, weights=settings.weights)
        self.weight_bytes = self.model.weight_bytes  # as held in memory (blocks, or dequantized)
        self.page_size = DEFAULT_PAGE_SIZE
        self.engine: Engine | None = None
        # the server's defaults: what a request that sets nothing gets
        self.num_ctx = resolve_num_ctx(settings.num_ctx, self.config.context_length, self.device,
                                       settings.env)
        self.defaults = CacheConfig(settings.cache_type_k, settings.cache_type_v, settings.codec)
        self.cache_config = self.defaults  # what the pool is built with now
        self.engine = self.build(self.cache_config)
        self.load_duration = time.perf_counter() - t0
        self.loaded_at = time.time()
        self.keep_alive = settings.keep_alive  # seconds it stays loaded once idle (inf: forever)
        self._claims: list[float] = []  # monotonic times of get()s whose job is not queued yet
        self.scheduler = Scheduler(self, settings.max_queue, settings.num_parallel)

    # ---------------------------------------------------------------- the pool

    def cache_request(self, kv_cache_type: str | None = None, cache_type_k: str | None = None,
                      cache_type_v: str | None = None, num_ctx: int | None = None, *,
                      kv_rotation: str | None = None, kv_centering: str | None = None,
                      kv_rounding: str | None = None) -> CacheRequest:
        """A request's pool and context: what it gives, the server's defaults for what it
        leaves out (never what an earlier request set). ValueError says what is wrong;
        a num_ctx above the model's maximum is clamped to it, with a warning, as Ollama does."""
        d = self.defaults
        shared = formats.get_format(kv_cache_type).name if kv_cache_type else None
        k = formats.get_format(cache_type_k).name if cache_type_k else shared or d.type_k
        v = formats.get_format(cache_type_v).name if cache_type_v else shared or d.type_v
        top = self.config.context_length
        if num_ctx is not None and num_ctx < 1:
            raise ValueError(f"num_ctx must be at least 1, got {num_ctx}")
        if num_ctx is not None and num_ctx > top:
            log.warning("%s: requested context size too large for model: num_ctx %d, "
                        "using the model's maximum %d", self.name, num_ctx, top)
            num_ctx = top
        codec = resolve_codec(kv_rotation, kv_centering, kv_rounding, base=d.codec)
        return CacheRequest(CacheConfig(k, v, codec), num_ctx or self.num_ctx)

    def page_bytes(self, cfg: CacheConfig) -> int:
        """Exact bytes of one page (all layers, K and V) with the types the plan stores."""
        c = self.config  # the same plan the engine makes, so the same fallback
        plan = plan_attention(self.device, c.head_dim, cfg.type_k, cfg.type_v,
                              self.settings.flash_attn, v_head_dim=c.v_head_dim, warn=False)
        per_token = KVCache.bytes_per_token(self.model.n_layers, self.model.n_kv_heads,
                                            self.model.cache_head_dim, plan.effective_k,
                                            plan.effective_v)
        return round(per_token * self.page_size)

    def n_pages(self, cfg: CacheConfig) -> int:
        """Pages of the pool for ``cfg``: the memory budget in whole pages, or the server's
        num_ctx x num_parallel."""
        context = -(-self.num_ctx // self.page_size)
        if self.settings.kv_memory is None:
            return self.settings.num_parallel * context
        pages = self.settings.kv_memory // self.page_bytes(cfg)
        if pages < context:  # it could never serve one full-context request: say what would
            raise ValueError(f"KVSLIM_KV_MEMORY of {self.settings.kv_memory:,} bytes holds "
                             f"{pages * self.page_size:,} tokens of K {cfg.type_k} / V {cfg.type_v}, "
                             f"less than one context of num_ctx {self.num_ctx}: set it to at least "
                             f"{context * self.page_bytes(cfg):,} bytes, or lower num_ctx "
                             f"(KVSLIM_CONTEXT_LENGTH)")
        return pages

    def check_memory(self, cfg: CacheConfig) -> int:
        """Pages of a pool for ``cfg``; PoolTooLarge when it cannot fit in free memory
        (the current pool counts as free: it is dropped first)."""
        n_pages = self.n_pages(cfg)
        need = n_pages * self.page_bytes(cfg)
        old = self.engine.cache.nbytes if self.engine is not None and self.engine.cache else 0
        free = _available_memory(self.device)
        if free is not None and need > free + old:
            raise PoolTooLarge(f"a K/V pool of {need:,} bytes ({n_pages} pages, num_ctx "
                               f"{self.num_ctx}, K {cfg.type_k} / V {cfg.type_v}) does not fit in "
                               f"the {free + old:,} bytes free on {self.device}; lower num_ctx, "
                               f"KVSLIM_NUM_PARALLEL or KVSLIM_KV_MEMORY, or use a smaller type")
        return n_pages

    def check_request(self, ids: list[int], params, cache: CacheRequest, truncate: bool) -> None:
        """ValueError when a request can never run in the pool it needs: a prompt longer
        than its num_ctx (without truncation) or more tokens than the whole pool holds
        (one that fits waits for its pages)."""
        num_ctx, cfg = cache.num_ctx, cache.pool
        n_prompt = len(fit_prompt(ids, num_ctx=num_ctx, vocab_size=self.config.vocab_size,
                                  model_max=self.config.context_length, truncate=truncate,
                                  max_tokens=params.max_tokens, bos_id=self.tokenizer.bos_id))
        max_len = max_length(n_prompt, num_ctx, params.max_tokens)
        n_pages = self.n_pages(cfg)
        if -(-max_len // self.page_size) > n_pages:
            raise ValueError(f"a request of up to {max_len} tokens (num_ctx {num_ctx}) can never "
                             f"fit in the K/V pool ({n_pages * self.page_size} tokens: the server's "
                             f"num_ctx x KVSLIM_NUM_PARALLEL, or KVSLIM_KV_MEMORY); lower "
                             f"num_predict or num_ctx")
        if cfg != self.cache_config:
            self.check_memory(cfg)

    def build(self, cfg: CacheConfig) -> Engine:
        """A new engine (and pool) for ``cfg``; the current one is dropped first.

        PoolTooLarge, before anything is freed, when the pool cannot fit in free memory.
        """
        n_pages = self.check_memory(cfg)
        if self.engine is not None:
            self.engine.cache = None  # the old pool goes before the new one is allocated
        prefix = PrefixCache(self.page_size) if self.settings.prefix_cache else None
        engine = Engine(self.model, self.tokenizer, cache_type_k=cfg.type_k, cache_type_v=cfg.type_v,
                        flash_attn=self.settings.flash_attn, num_ctx=self.num_ctx,
                        num_parallel=self.settings.num_parallel, page_size=self.page_size,
                        n_pages=n_pages, prefix_cache=prefix, codec=cfg.codec)
        if prefix is not None and self.settings.prefix_cache_dir:  # kept across restarts
            engine.prefix_cache = DiskPrefixCache(
                self.page_size, self.settings.prefix_cache_dir, self.settings.prefix_cache_disk,
                self.model_id, engine.cache, extra={"num_ctx": self.num_ctx, "model_name": self.name})
        self.cache_config = cfg
        return engine

    def switch(self, cfg: CacheConfig) -> float:
        """Rebuild the pool for ``cfg`` (the engine must be idle); seconds it took.

        On failure the previous configuration is rebuilt and the error raised.
        """
        t0, previous = time.perf_counter(), self.cache_config
        try:
            self.engine = self.build(cfg)
        except PoolTooLarge:
            raise  # nothing was freed
        except Exception:
            self.engine = self.build(previous)
            raise
        log.info("%s: K/V pool rebuilt: K %s / V %s, %s", self.name, cfg.type_k, cfg.type_v,
                 cfg.codec)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- keep_alive

    def claim(self, keep_alive: float | None) -> None:
        """A request is about to use this model; ``keep_alive`` (None: the server's) is how
        long it stays loaded once idle afterwards, as Ollama sets it per request."""
        self.keep_alive = self.settings.keep_alive if keep_alive is None else keep_alive
        self._claims.append(time.monotonic())

    def release(self) -> None:
        """The claiming request has queued its job (or needs none)."""
        if self._claims:
            self._claims.pop(0)

    def in_use(self) -> bool:
        """A request runs, waits or is on its way (a claim younger than HANDOFF_S)."""
        fresh = time.monotonic() - HANDOFF_S
        return any(t > fresh for t in self._claims) or not self.scheduler.idle()

    def expires_at(self) -> float:
        """Unix time at which it unloads if nothing uses it meanwhile."""
        now = time.time()
        start = now if self.in_use() else self.scheduler.last_active
        return start + (FOREVER_S if math.isinf(self.keep_alive) else self.keep_alive)

    # ---------------------------------------------------------------- prompts

    def chat_ids(self, messages: list[dict], cache: "CacheRequest | None" = None,
                 max_tokens: int | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready to answer.

        With ``cache`` (the request's pool settings), a conversation longer than its
        num_ctx loses its oldest messages first, as Ollama's chat does: the system
        messages and the latest message always stay, and room is left to answer
        (``kvslim.chat``). Only a last message too long on its own is then cut by tokens.
        """
        render = functools.partial(render_chat, self.tokenizer)
        if cache is None:
            return render(messages)
        limit = prompt_limit(cache.num_ctx, max_tokens)
        return fit_chat(render, messages, limit)[1]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    # ---------------------------------------------------------------- reporting

    def status(self) -> dict:
        """The pool's state: bytes, types, backend and which pages are held by what.

        Called by the scheduler thread between steps (nothing moves meanwhile).
        """
        e = self.engine
        info = e.cache_info()
        seq_pages = {p for s in e.running for p in e.cache.pages(s.cache_id)}
        prefix = e.prefix_cache
        info.update(
            pages_sequences=len(seq_pages),
            pages_prefix_cache=len(prefix.pages(e.cache)) if prefix else 0,
            prefix_cache_entries=len(prefix) if prefix else 0,
            prefix_cache_tokens=prefix.tokens() if prefix else 0,
            prefix_cache_evictions=prefix.evictions if prefix else 0,
            prefix_cache_files_written=getattr(prefix, "written", 0),
            prefix_cache_files_restored=getattr(prefix, "restored", 0),
            running=len(e.running), waiting=len(e.waiting),
        )
        return info

    def close(self) -> None:
        self.scheduler.stop()
        self.engine = None


class Registry:
    """Model names to files, and the models loaded now (at most ``max_loaded_models``)."""

    def __init__(self, settings: ServerSettings, aliases: dict[str, Path] | None = None):
        self.settings = settings
        self.aliases = {k: Path(v) for k, v in (aliases or {}).items()}
        self._runners: dict[str, Runner] = {}
        self._lock = threading.Lock()  # one load at a time; guards _runners
        self._digests: dict[Path, str] = {}
        self._wake, self._closed = threading.Event(), False
        self._reaper = threading.Thread(target=self._reap, name="kvslim-keep-alive", daemon=True)
        self._reaper.start()

    @staticmethod
    def canonical(name: str) -> str:
        return name[:-len(":latest")] if name.endswith(":latest") else name

    def resolve(self, name: str) -> tuple[str, Path]:
        """(canonical name, .gguf path) of a servable model; ModelNotFound otherwise.

        Served: names given to ``kvslim serve``, built-in models that are pulled, and
        models in the store. Arbitrary file paths are not: clients cannot open files.
        """
        name = self.canonical(name)
        if name in self.aliases:
            return name, self.aliases[name]
        builtin = store.lookup(name)
        if builtin is not None:
            path = store.model_path(builtin)
            if not path.is_file():
                raise ModelNotFound(f"model '{name}' not found, try pulling it first")
            return builtin.name, path
        for entry in store.list_models():
            if entry.name == name:
                return name, entry.path
        raise ModelNotFound(f"model '{name}' not found")

    def available(self) -> list[tuple[str, Path]]:
        """Every servable (name, path): serve's names, then the store's."""
        out = dict(self.aliases)
        for entry in store.list_models():
            out.setdefault(entry.name, entry.path)
        return list(out.items())

    def digest(self, path: Path) -> str:
        """sha256 of a model file (from the store's manifest when there is one)."""
        if path not in self._digests:
            known = {e.path: e.sha256 for e in store.list_models() if e.sha256}
            if path in known:
                self._digests[path] = known[path]
            else:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                self._digests[path] = h.hexdigest()
        return self._digests[path]

    def get(self, name: str, keep_alive: float | None = None) -> tuple[Runner, float]:
        """(runner, seconds spent loading it now): loads on first use; blocking. The runner
        is claimed (``Runner.claim``): release it once the request's job is queued."""
        name, path = self.resolve(name)
        with self._lock:
            runner, load = self._runners.get(name), 0.0
            if runner is None:
                self._make_room()
                runner = Runner(name, path, self.settings)
                self._runners[name] = runner
                log.info("%s: loaded in %.1fs", name, runner.load_duration)
                load = runner.load_duration
            runner.claim(keep_alive)
        self._wake.set()
        return runner, load

    def _reap(self) -> None:
        """Unload models idle for longer than their keep_alive (a thread of its own)."""
        while not self._closed:
            now, timeout = time.time(), None
            for runner in self.loaded():
                if runner.in_use():
                    timeout = REAP_POLL_S if math.isfinite(runner.keep_alive) else timeout
                elif runner.expires_at() <= now:
                    if self.unload(runner.name):
                        log.info("%s: unloaded after %gs idle (keep_alive)", runner.name,
                                 runner.keep_alive)
                else:
                    wait = runner.expires_at() - now
                    timeout = wait if timeout is None else min(timeout, wait)
            self._wake.wait(timeout)
            self._wake.clear()

    def _make_room(self) -> None:
        while len(self._runners) >= self.settings.max_loaded_models:
            idle = [n for n, r in self._runners.items() if not r.in_use()]
            if not idle:
                raise ServerBusy(f"{len(self._runners)} model(s) loaded and busy "
                                 f"(KVSLIM_MAX_LOADED_MODELS={self.settings.max_loaded_models})")
            self._runners.pop(idle[0]).close()

    def unload(self, name: str) -> bool:
        """Unload a model if it is loaded and idle; whether it was unloaded."""
        name = self.canonical(name)
        with self._lock:
            runner = self._runners.get(name)
            if runner is None or runner.in_use():
                return False
            self._runners.pop(name).close()
            return True

    def loaded(self) -> list[Runner]:
        return list(self._runners.values())  # one C-level copy: no lock, so no wait on a load

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        with self._lock:
            for runner in self._runners.values():
                runner.close()
            self._runners.clear()
