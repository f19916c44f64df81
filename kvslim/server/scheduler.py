"""The thread that owns a model's engine: continuous batching for the HTTP handlers.

Handlers ``submit`` tickets (thread-safe; ``QueueFull`` beyond the bound) and read their
outputs from an asyncio queue through a ``Job``. The thread moves tickets into the
engine between steps, runs ``engine.step()`` while there is work (one batched forward
over every running sequence) and hands each output to its ticket's event loop.

Tickets wait in one FIFO. A ticket joins the engine of the pool with the cache types it
needs (its num_ctx is its own sequence's limit, any value shares the pool). The first one
whose types have no pool yet gets one built beside the others when the memory allows
(idle pools may be dropped for it); while busy pools hold the memory, it and the tickets
behind it wait for them to finish: one client's cache never changes under another. Each
pass steps every engine with work once.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from kvslim.engine import Sequence, StepOutput
from kvslim.sampling import SamplingParams
from kvslim.server.types import CacheRequest, Pool, ServerBusy

log = logging.getLogger("kvslim.server")

__all__ = ["Ticket", "Scheduler", "Job", "QueueFull"]


class QueueFull(ServerBusy):
    """More requests are waiting than KVSLIM_MAX_QUEUE allows (HTTP 503)."""


@dataclass(eq=False)
class Ticket:
    """One request on its way through the scheduler."""

    prompt_ids: list[int]
    params: SamplingParams
    cache: CacheRequest
    truncate: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    n: int = 1  # answers to the same prompt (seq.group)
    seq: Sequence | None = None
    engine: object = None  # the engine (pool) it runs in
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    load_duration: float = 0.0  # a pool built for this request (seconds)
    constraint: object = None  # the sequence's grammar state (kvslim.grammar), if any

    def send(self, kind: str, value) -> None:
        """Deliver ("out", StepOutput) or ("error", exception) to the handler's loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Scheduler:
    """Steps one pool's engine in a background thread while there is work."""

    def __init__(self, pool: Pool, max_queue: int, num_parallel: int):
        self.pool, self.max_queue, self.num_parallel = pool, max_queue, num_parallel
        self._cond = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()  # not in the engine yet
        self._tickets: dict[Sequence, Ticket] = {}  # each sequence of a group -> its ticket
        self._stop = False
        self.counters = collections.Counter()
        self.snapshot = pool.status()
        self.last_active = time.time()  # when it last had work (keep_alive counts from here)
        self._thread = threading.Thread(target=self._run, name=f"kvslim-{pool.name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- handler side

    def waiting(self) -> int:
        """Requests not decoding yet: queued here or waiting in an engine for pages."""
        return len(self._queue) + sum(len(e.waiting) for e in self.pool.engines())

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket; QueueFull when KVSLIM_MAX_QUEUE requests already wait for a slot."""
        with self._cond:
            if self._stop:
                raise ServerBusy(f"model '{self.pool.name}' is being unloaded")
            free_slots = max(0, self.num_parallel - sum(len(e.running) for e in self.pool.engines()))
            if self.waiting() >= self.max_queue + free_slots:
                raise QueueFull("server busy, please try again. maximum pending requests "
                                f"exceeded (KVSLIM_MAX_QUEUE={self.max_queue})")
            self._queue.append(ticket)
            self.counters["requests"] += 1
            self._cond.notify()

    def cancel(self, ticket: Ticket) -> None:
        """Drop a ticket wherever it is; a running sequence returns its pages next step.
        A ticket still queued ends here, counted as cancelled like one that ran."""
        with self._cond:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            if ticket in self._queue:
                self._queue.remove(ticket)
                self.counters["finished_cancel"] += 1
            elif ticket.seq is not None:
                ticket.engine.cancel(ticket.seq)
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not (self._queue or self._tickets or self._has_work())

    def _has_work(self) -> bool:
        return any(e.has_work() for e in self.pool.engines())

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=60)
        for t in list(self._queue) + list(self._tickets.values()):
            t.send("error", ServerBusy(f"model '{self.pool.name}' was unloaded"))

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._queue or self._has_work()):
                    self._cond.wait()
                if self._stop:
                    return
                admit = self._take_fitting()
                blocked = self._queue[0] if self._queue else None
            for t, engine in admit:
                self._add(t, engine)
            if blocked is not None:
                self._add_pool(blocked)
            for engine in self.pool.engines():
                if engine.has_work():
                    self._step(engine)
            self.snapshot = self.pool.status()
            self.last_active = time.time()

    def _take_fitting(self) -> list[tuple[Ticket, object]]:
        """(ticket, engine) for the tickets at the head of the queue whose pools exist (FIFO)."""
        out = []
        while self._queue and (engine := self.pool.engine_for(self._queue[0].cache.pool)) is not None:
            out.append((self._queue.popleft(), engine))
        return out

    def _add(self, t: Ticket, engine) -> None:
        try:
            seq = engine.add_request(t.prompt_ids, t.params, truncate=t.truncate,
                                     num_ctx=t.cache.num_ctx, constraint=t.constraint, n=t.n)
        except ValueError as e:  # too long for the context or the pool
            t.send("error", e)
            return
        with self._cond:
            t.seq, t.engine, cancelled = seq, engine, t.cancelled
            for s in seq.group:
                self._tickets[s] = t
        if cancelled:  # cancelled while it moved from the queue to the engine
            engine.cancel(seq)

    def _add_pool(self, head: Ticket) -> None:
        """A pool for the head ticket's types, when the memory allows now; else it waits."""
        with self._cond:
            busy = {t.cache.pool for t in self._tickets.values()}
        try:
            seconds = self.pool.add_pool(head.cache.pool, busy)
        except Exception as e:  # noqa: BLE001 - every waiter of this config hears why
            log.warning("%s: cannot build the K/V pool: %s", self.pool.name, e)
            with self._cond:
                failed = [t for t in self._queue if t.cache.pool == head.cache.pool]
                for t in failed:
                    self._queue.remove(t)
            for t in failed:
                t.send("error", e)
            return
        if seconds is not None:
            head.load_duration = seconds
            self.counters["rebuilds"] += 1

    def _step(self, engine) -> None:
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
            log.exception("%s: engine step failed", self.pool.name)
            self._fail_all(engine, e)
            return
        for out in outputs:
            t = self._tickets.get(out.seq)
            if t is None:
                continue
            if out.reason == "error":  # this sequence alone failed (its pages are free)
                t.send("error", out.seq.error)
            else:
                t.send("out", out)
            if out.finished:
                with self._cond:
                    del self._tickets[out.seq]
                self._count(out.seq)

    def _count(self, seq: Sequence) -> None:
        c = self.counters
        c["finished_" + (seq.finish_reason or "unknown")] += 1
        c["prompt_tokens"] += seq.n_prompt
        c["prompt_tokens_cached"] += seq.stats.prompt_cache_count
        c["prompt_cache_hits"] += seq.stats.prompt_cache_count > 0
        c["generated_tokens"] += seq.n_generated

    def _fail_all(self, engine, error: Exception) -> None:
        with self._cond:
            tickets = list({t: None for t in self._tickets.values() if t.engine is engine})
            self._tickets = {s: t for s, t in self._tickets.items() if t.engine is not engine}
        for t in tickets:
            engine.cancel(t.seq)
        engine.reap()
        for t in tickets:
            t.send("error", error)


class Job:
    """The handler's side of a ticket: its outputs as an async iterator.

    Leaving the iteration early (client gone, task cancelled) cancels the request, so
    its sequence returns its pages at the next step.
    """

    def __init__(self, scheduler: Scheduler, ticket: Ticket):
        self.scheduler, self.ticket = scheduler, ticket

    @classmethod
    def start(cls, scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams,
              cache: CacheRequest, truncate: bool, constraint=None, n: int = 1) -> "Job":
        ticket = Ticket(prompt_ids, params, cache, truncate, asyncio.get_running_loop(),
                        constraint=constraint, n=n)
        scheduler.submit(ticket)
        return cls(scheduler, ticket)

    @property
    def seq(self) -> Sequence | None:
        return self.ticket.seq

    @property
    def seqs(self) -> list[Sequence]:
        """The n answers' sequences (the first evaluates the prompt, the others fork it)."""
        return self.ticket.seq.group if self.ticket.seq is not None else []

    async def outputs(self) -> AsyncIterator[StepOutput]:
        """Every output of the job's sequences (``out.seq`` tells which), until all end."""
        finished, left = False, self.ticket.n
        try:
            while True:
                kind, value = await self.ticket.events.get()
                if kind == "error":
                    raise value
                yield value
                left -= value.finished
                if not left:
                    finished = True
                    return
        finally:
            if not finished:
                self.scheduler.cancel(self.ticket)
