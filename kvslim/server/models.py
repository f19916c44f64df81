"""Loaded models: weights, tokenizer and the K/V pool each one serves from, by name.

A ``Runner`` is one loaded model with its engines (one paged pool per cache type pair and
coding, ``CacheConfig``) and the scheduler thread that steps them. A pool is sized from
``KVSLIM_KV_MEMORY`` in exact page bytes, or the server's num_ctx x num_parallel. A
request's num_ctx limits its own sequence in its pool (requests with different num_ctx
run side by side). A request asking for other cache types gets a pool of its own beside
the others when the memory allows (``KVSLIM_KV_MEMORY``, one budget for all the model's
pools, and the device's free memory; at most ``MAX_POOLS``), idle pools being dropped
(least recently used first) to make room; otherwise it waits for the busy pools to
finish. The weights stay; a dropped pool takes its cached prefixes with it.
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

from kvslim import calibration, store
from kvslim.autotype import parse_max_kld
from kvslim.attention import plan_attention
from kvslim.cache import DEFAULT_PAGE_SIZE, CacheFull, KVCache, window_pages
from kvslim.chat import fit_chat, fit_prompt, max_length, prompt_limit, render_chat
from kvslim.engine import DEFAULT_BATCH_TOKENS, Engine
from kvslim.gguf_loader import ModelConfig, open_gguf, pooling_type
from kvslim.models import load_model
from kvslim.kvfile import model_identity
from kvslim.prefix import DiskPrefixCache, PrefixCache
from kvslim.server.scheduler import Scheduler
from kvslim.server.types import CacheConfig, CacheRequest, ModelNotFound, PoolTooLarge, ServerBusy
from kvslim.settings import (AUTO, ServerSettings, compute_dtype, pick_device, resolve_cache_types,
                             resolve_codec, resolve_num_ctx)
from kvslim.tokenizer import Tokenizer

log = logging.getLogger("kvslim.server")

__all__ = ["Runner", "Registry", "model_details"]

HANDOFF_S = 10.0  # a claim (get() to the job's submit) keeps an idle model loaded this long at most
FOREVER_S = 292 * 365.25 * 86400  # what Ollama's "forever" expiry (now + max int64 ns) shows
REAP_POLL_S = 0.25  # how often a busy model with a finite keep_alive is checked
MAX_POOLS = 4  # K/V pools (type pairs) of one model side by side, within the memory budget


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


def _warm_kernels(name: str, types: tuple[str, str]) -> None:
    from kvslim import warmup

    if warmup.needs_compile():
        log.warning("%s: %s", name, warmup.MESSAGE)
    warmup.warmup(sorted(set(types)))


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
        card = store.card(self.path)  # a Modelfile's or the registry's TEMPLATE, SYSTEM, PARAMETERs
        self.tokenizer.set_chat_defaults(card.chat_template, card.system)
        self.options = {k: v for k, v in card.parameters.items() if k != "num_ctx"}
        self.model = load_model(reader, self.config, self.device, compute_dtype(self.device),
                                progress=False, weights=settings.weights)
        self.weight_bytes = self.model.weight_bytes  # as held in memory (blocks, or dequantized)
        if self.device.type == "cpu":  # compile now, not in the middle of a first answer
            _warm_kernels(name, (settings.cache_type_k, settings.cache_type_v))
        self.page_size = DEFAULT_PAGE_SIZE
        self.pooling = pooling_type(reader)  # how embeddings are pooled
        self.lock = threading.RLock()  # guards pools: built, dropped, used for embeddings
        self.pools: dict[CacheConfig, Engine] = {}  # one per type pair and coding
        self._used: dict[CacheConfig, float] = {}  # when each pool last took a request
        # the server's defaults: what a request that sets nothing gets
        self.num_ctx = resolve_num_ctx(card.parameters.get("num_ctx") or settings.num_ctx,
                                       self.config.context_length, self.device, settings.env)
        self.defaults = self._pool_config(settings.cache_type_k, settings.cache_type_v,
                                          settings.codec, settings.kv_max_kld)
        self.cache_config = self.defaults  # the pool that took the latest request
        self.add_pool(self.defaults)
        self.load_duration = time.perf_counter() - t0
        self.loaded_at = time.time()
        self.keep_alive = settings.keep_alive  # seconds it stays loaded once idle (inf: forever)
        self._claims: list[float] = []  # monotonic times of get()s whose job is not queued yet
        self.scheduler = Scheduler(self, settings.max_queue, settings.num_parallel)

    # ---------------------------------------------------------------- the pool

    def cache_request(self, kv_cache_type: str | None = None, cache_type_k: str | None = None,
                      cache_type_v: str | None = None, num_ctx: int | None = None, *,
                      kv_rotation: str | None = None, kv_centering: str | None = None,
                      kv_rounding: str | None = None,
                      kv_max_kld: float | None = None) -> CacheRequest:
        """A request's pool and context: what it gives, the server's defaults for what it
        leaves out (never what an earlier request set). ValueError says what is wrong;
        a num_ctx above the model's maximum is clamped to it, with a warning, as Ollama does."""
        d = self.defaults
        if kv_cache_type or cache_type_k or cache_type_v:
            k, v = resolve_cache_types(kv_cache_type, cache_type_k or (None if kv_cache_type else d.type_k),
                                       cache_type_v or (None if kv_cache_type else d.type_v), env={})
        else:  # the server's, auto included (a kv_max_kld of its own re-chooses)
            k, v = (AUTO, AUTO) if d.auto is not None else (d.type_k, d.type_v)
        top = self.config.context_length
        if num_ctx is not None and num_ctx < 1:
            raise ValueError(f"num_ctx must be at least 1, got {num_ctx}")
        if num_ctx is not None and num_ctx > top:
            log.warning("%s: requested context size too large for model: num_ctx %d, "
                        "using the model's maximum %d", self.name, num_ctx, top)
            num_ctx = top
        codec = resolve_codec(kv_rotation, kv_centering, kv_rounding, base=d.codec)
        if (k, v) == (AUTO, AUTO) and kv_max_kld is None and codec == d.codec and d.auto is not None:
            return CacheRequest(d, num_ctx or self.num_ctx)
        max_kld = self.settings.kv_max_kld if kv_max_kld is None else parse_max_kld(kv_max_kld)
        return CacheRequest(self._pool_config(k, v, codec, max_kld), num_ctx or self.num_ctx)

    def _pool_config(self, k: str, v: str, codec, max_kld: float) -> CacheConfig:
        """The pool for types k/v; for auto the pair chosen from the model's quality table
        (measured on first use): with KVSLIM_KV_MEMORY the best quality whose
        num_parallel x num_ctx pool fits it (NothingFits, a ValueError, when none does)."""
        if (k, v) != (AUTO, AUTO):
            return CacheConfig(k, v, codec)
        limit = None
        if self.settings.kv_memory is not None:
            tokens = self.settings.num_parallel * -(-self.num_ctx // self.page_size) * self.page_size
            limit = self.settings.kv_memory // tokens
        choice = calibration.auto_cache_types(self.model, self.tokenizer, codec, max_kld,
                                              self.settings.flash_attn, limit, progress=False)
        return CacheConfig(choice.type_k, choice.type_v, codec, choice)

    def page_bytes(self, cfg: CacheConfig) -> int:
        """Exact bytes of one page (every global layer, K and V) with the types the plan
        stores."""
        k, v = self._stored_types(cfg)
        n_global = self.model.layer_windows().count(0)
        per_token = KVCache.bytes_per_token(n_global, self.model.n_kv_heads,
                                            self.model.cache_head_dim, k, v)
        return round(per_token * self.page_size)

    def window_bytes(self, cfg: CacheConfig) -> int:
        """Exact bytes of the pages the layers on a sliding window get: num_parallel
        sequences of num_ctx, each holding at most its window (the engine's sizing)."""
        k, v = self._stored_types(cfg)
        per_page = KVCache.bytes_per_token(1, self.model.n_kv_heads, self.model.cache_head_dim,
                                           k, v) * self.page_size
        pages = [window_pages(w, self.page_size, self.num_ctx, DEFAULT_BATCH_TOKENS)
                 for w in self.model.layer_windows() if w]
        return round(per_page * len(pages) * self.settings.num_parallel * max(pages + [0]))

    def _stored_types(self, cfg: CacheConfig) -> tuple[str, str]:
        c = self.config  # the same plan the engine makes, so the same fallback
        plan = plan_attention(self.device, c.head_dim, cfg.type_k, cfg.type_v,
                              self.settings.flash_attn, v_head_dim=c.v_head_dim, warn=False)
        return plan.effective_k, plan.effective_v

    def n_pages(self, cfg: CacheConfig) -> int:
        """Pages of the pool for ``cfg``: the memory budget in whole pages, or the server's
        num_ctx x num_parallel."""
        context = -(-self.num_ctx // self.page_size)
        if self.settings.kv_memory is None:
            return self.settings.num_parallel * context
        pages = max(0, self.settings.kv_memory - self.window_bytes(cfg)) // self.page_bytes(cfg)
        if pages < context:  # it could never serve one full-context request: say what would
            raise ValueError(f"KVSLIM_KV_MEMORY of {self.settings.kv_memory:,} bytes holds "
                             f"{pages * self.page_size:,} tokens of K {cfg.type_k} / V {cfg.type_v}, "
                             f"less than one context of num_ctx {self.num_ctx}: set it to at least "
                             f"{context * self.page_bytes(cfg) + self.window_bytes(cfg):,} bytes, or lower num_ctx "
                             f"(KVSLIM_CONTEXT_LENGTH)")
        return pages

    def check_memory(self, cfg: CacheConfig) -> int:
        """Pages of a pool for ``cfg``; PoolTooLarge when it cannot fit even with every
        other pool of this model dropped."""
        n_pages = self.n_pages(cfg)
        need = n_pages * self.page_bytes(cfg) + self.window_bytes(cfg)
        room = self._room(list(self.pools))
        if room is not None and need > room:
            raise PoolTooLarge(f"a K/V pool of {need:,} bytes ({n_pages} pages, num_ctx "
                               f"{self.num_ctx}, K {cfg.type_k} / V {cfg.type_v}) does not fit in "
                               f"the {room:,} bytes free on {self.device}; lower num_ctx, "
                               f"KVSLIM_NUM_PARALLEL or KVSLIM_KV_MEMORY, or use a smaller type")
        return n_pages

    def _room(self, dropped: list[CacheConfig]) -> int | None:
        """Bytes a new pool may take once the pools ``dropped`` are freed: what is left of
        KVSLIM_KV_MEMORY (one budget for all of the model's pools) and of the device's free
        memory; None when neither is known."""
        held = sum(e.cache.nbytes for e in self.pools.values())
        freed = sum(self.pools[c].cache.nbytes for c in dropped)
        limits = [] if (free := _available_memory(self.device)) is None else [free + freed]
        if self.settings.kv_memory is not None:
            limits.append(self.settings.kv_memory - held + freed)
        return min(limits) if limits else None

    def check_request(self, ids: list[int], params, cache: CacheRequest, truncate: bool,
                      n: int = 1) -> None:
        """ValueError when a request can never run in the pool it needs: a prompt longer
        than its num_ctx (without truncation) or more tokens than the whole pool holds
        (one that fits waits for its pages); ``n`` answers need n times the pages."""
        num_ctx, cfg = cache.num_ctx, cache.pool
        n_prompt = len(fit_prompt(ids, num_ctx=num_ctx, vocab_size=self.config.vocab_size,
                                  model_max=self.config.context_length, truncate=truncate,
                                  max_tokens=params.max_tokens, bos_id=self.tokenizer.bos_id))
        max_len = max_length(n_prompt, num_ctx, params.max_tokens)
        n_pages = self.n_pages(cfg)
        if n > self.settings.num_parallel:
            raise ValueError(f"n must be at most KVSLIM_NUM_PARALLEL ({self.settings.num_parallel}), "
                             f"got {n}")
        if n * -(-max_len // self.page_size) > n_pages:
            raise ValueError(f"a request of {n} x up to {max_len} tokens (num_ctx {num_ctx}) can never "
                             f"fit in the K/V pool ({n_pages * self.page_size} tokens: the server's "
                             f"num_ctx x KVSLIM_NUM_PARALLEL, or KVSLIM_KV_MEMORY); lower "
                             f"num_predict or num_ctx")
        if cfg not in self.pools:
            self.check_memory(cfg)

    # ---------------------------------------------------------------- the pools

    @property
    def engine(self) -> Engine | None:
        """The pool that took the latest request (the server's types until one asks for others)."""
        return self.pools.get(self.cache_config)

    def engines(self) -> list[Engine]:
        return list(self.pools.values())  # one C-level copy: no lock, never waits on an embed

    def engine_for(self, cfg: CacheConfig) -> Engine | None:
        """The pool for ``cfg`` if there is one, marked as used now."""
        engine = self.pools.get(cfg)
        if engine is not None:
            self.cache_config, self._used[cfg] = cfg, time.monotonic()
        return engine

    def add_pool(self, cfg: CacheConfig, busy: set[CacheConfig] = frozenset()) -> float | None:
        """Build a pool for ``cfg`` beside the others when the budget has room, dropping
        idle pools (least recently used first, never one in ``busy`` or with work) when
        that makes room; seconds it took, or None when busy pools hold the room (wait for
        them). PoolTooLarge when it could never fit; nothing is dropped then."""
        t0 = time.perf_counter()
        with self.lock:
            n_pages = self.check_memory(cfg)
            need = n_pages * self.page_bytes(cfg)
            idle = sorted((c for c, e in list(self.pools.items()) if c not in busy and not e.has_work()),
                          key=lambda c: self._used.get(c, 0.0))  # least recently used first
            dropped: list[CacheConfig] = []
            while len(self.pools) - len(dropped) >= MAX_POOLS or \
                    (room := self._room(dropped)) is not None and need > room:
                if len(dropped) == len(idle):
                    return None
                dropped.append(idle[len(dropped)])
            for c in dropped:
                self.pools.pop(c).cache = None
                log.info("%s: idle K/V pool K %s / V %s dropped for K %s / V %s", self.name,
                         c.type_k, c.type_v, cfg.type_k, cfg.type_v)
            try:
                self.pools[cfg] = self._new_engine(cfg, n_pages)
            except BaseException:
                if not self.pools:  # never leave the model without a pool
                    self.pools[self.defaults] = self._new_engine(self.defaults, self.n_pages(self.defaults))
                    self.cache_config = self.defaults
                raise
            self.cache_config, self._used[cfg] = cfg, time.monotonic()
        log.info("%s: K/V pool built: K %s / V %s, %s (%d pools)", self.name, cfg.type_k,
                 cfg.type_v, cfg.codec, len(self.pools))
        return time.perf_counter() - t0

    def _new_engine(self, cfg: CacheConfig, n_pages: int) -> Engine:
        prefix = PrefixCache(self.page_size) if self.settings.prefix_cache else None
        engine = Engine(self.model, self.tokenizer, cache_type_k=cfg.type_k, cache_type_v=cfg.type_v,
                        flash_attn=self.settings.flash_attn, num_ctx=self.num_ctx,
                        num_parallel=self.settings.num_parallel, page_size=self.page_size,
                        n_pages=n_pages, prefix_cache=prefix, codec=cfg.codec, auto=cfg.auto)
        if prefix is not None and self.settings.prefix_cache_dir:  # kept across restarts
            engine.prefix_cache = DiskPrefixCache(
                self.page_size, self.settings.prefix_cache_dir, self.settings.prefix_cache_disk,
                self.model_id, engine.cache,
                extra={"num_ctx": self.num_ctx, "model_name": self.name})
        return engine

    def embed(self, inputs: list[list[int]], truncate: bool, num_ctx: int,
              normalize: bool = True) -> tuple[torch.Tensor, int]:
        """``Engine.embed`` in the server's default pool (else the latest), between its
        steps; ServerBusy when that pool has no room for the inputs now."""
        with self.lock:  # no pool is dropped meanwhile
            engine = self.pools.get(self.defaults) or self.engine
            if engine is None:
                raise ServerBusy(f"model '{self.name}' has no K/V pool right now; try again")
            try:
                return engine.embed(inputs, self.pooling, truncate, num_ctx, normalize)
            except CacheFull as e:
                raise ServerBusy(str(e)) from None


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
                 max_tokens: int | None = None, tools: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready to answer.

        With ``cache`` (the request's pool settings), a conversation longer than its
        num_ctx loses its oldest messages first, as Ollama's chat does: the system
        messages and the latest message always stay, and room is left to answer
        (``kvslim.chat``). Only a last message too long on its own is then cut by tokens.
        """
        render = functools.partial(render_chat, self.tokenizer, tools=tools)
        if cache is None:
            return render(messages)
        limit = prompt_limit(cache.num_ctx, max_tokens)
        return fit_chat(render, messages, limit)[1]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    # ---------------------------------------------------------------- reporting

    def status(self) -> dict:
        """The latest used pool's state (bytes, types, backend, which pages are held by what),
        with ``pools``: the same for every pool of the model.

        Called by the scheduler thread between steps (nothing moves meanwhile).
        """
        pools = [self._pool_status(e) for e in self.engines()]
        engine = self.engine
        latest = self._pool_status(engine) if engine is not None else pools[-1]
        return latest | {"pools": pools}

    @staticmethod
    def _pool_status(e: Engine) -> dict:
        info = e.cache_info()
        seq_pages = {p for s in e.running for p in e.cache.pages(s.cache_id)}
        prefix = e.prefix_cache
        prefix_pages = prefix.pages(e.cache) if prefix else set()
        ps = e.cache.page_size  # pages running sequences may still grow into are promised
        promised = sum(-(-s.max_len // ps) - -(-e.cache.length(s.cache_id) // ps) for s in e.running)
        info.update(
            pages_sequences=len(seq_pages),
            pages_prefix_cache=len(prefix_pages),
            # what a new request can be given now: free pages not promised to running
            # sequences, plus pages only the prefix cache holds (evicted on admission)
            pages_available=e.cache.free_pages - promised + len(prefix_pages - seq_pages),
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
        with self.lock:
            self.pools.clear()


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
        return store.canonical(name)

    def resolve(self, name: str) -> tuple[str, Path]:
        """(canonical name, .gguf path) of a servable model; ModelNotFound otherwise.

        Served: names given to ``kvslim serve``, then the store's models by the store's one
        resolution (``store.find``: the names `kvslim list` shows). Arbitrary file paths are
        not: clients cannot open files.
        """
        name = self.canonical(name)
        if name in self.aliases:
            return name, self.aliases[name]
        entry = store.find(name)
        if entry is not None:
            return store.canonical(entry.name), entry.path
        if store.lookup(name) is not None:
            raise ModelNotFound(f"model '{name}' not found, try pulling it first")
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
