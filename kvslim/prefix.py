"""Prefix cache: the full K/V pages of finished sequences, found again by page hashes.

An entry is a cache sequence (a fork of a finished one, trimmed to whole pages) that
keeps its pages alive through the pool's refcounts. A new prompt whose leading pages
hash the same, and whose token ids are equal (so a hash collision can never serve the
wrong K/V), starts as a fork of the entry and only evaluates the rest. Page ``i``'s key
chains the keys of the pages before it, as in nano-vllm's block manager, so a key names
a whole prefix. Entries are dropped least recently used first, when admission needs
pages (``evict``) or beyond ``max_entries``.

Layers on a sliding window hold only the tail of an entry (``KVCache``): a prefix of
an entry is reused only where those layers still hold the keys its next token sees
(``KVCache.can_trim``), which for a chat's next turn is the whole previous turn.

It sits beside the pool's allocator (above ``cache``, below ``engine``) and plugs into
``kvslim.engine.Engine(prefix_cache=...)``, which ``LLM`` and the server both build; the
engine calls every method under its step lock, so nothing here locks.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

from kvslim.cache import KVCache

__all__ = ["PrefixCache"]


@dataclass(eq=False)
class _Entry:
    cache_seq: int
    tokens: list[int]  # whole pages
    keys: list[int]  # chained key per page


class PrefixCache:
    """A small LRU index of cached prompt prefixes, in whole pages of ``page_size`` tokens."""

    def __init__(self, page_size: int, max_entries: int = 64):
        if page_size < 1 or max_entries < 1:
            raise ValueError("page_size and max_entries must be positive")
        self.page_size, self.max_entries = page_size, max_entries
        self._lru: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # oldest first
        self._by_key: dict[int, list[_Entry]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def page_keys(self, tokens: list[int]) -> list[int]:
        """Chained key of every whole page of ``tokens``."""
        keys, key, ps = [], 0, self.page_size
        for start in range(0, len(tokens) - ps + 1, ps):
            key = hash((key, tuple(tokens[start:start + ps])))
            keys.append(key)
        return keys

    def _find(self, tokens: list[int], keys: list[int],
              cache: KVCache | None = None) -> tuple[_Entry | None, int]:
        """The entry sharing the most leading pages with ``tokens``, and how many (with a
        ``cache``: only as many as the entry can be trimmed to)."""
        for n in range(len(keys), 0, -1):
            for e in self._by_key.get(keys[n - 1], ()):
                if e.tokens[:n * self.page_size] == tokens[:n * self.page_size] and (
                        cache is None or cache.can_trim(e.cache_seq, n * self.page_size)):
                    return e, n
        return None, 0

    # ---------------------------------------------------------------- engine hooks

    def attach(self, cache: KVCache, tokens: list[int]) -> tuple[int, int]:
        """(new cache sequence, tokens reused): a fork of the longest cached prefix of
        ``tokens`` in whole pages, or an empty sequence."""
        entry, n = self._find(tokens, self.page_keys(tokens), cache)
        if entry is None:
            return cache.new_sequence(), 0
        self._lru.move_to_end(entry.cache_seq)
        seq = cache.fork(entry.cache_seq)
        cache.trim(seq, n * self.page_size)  # whole pages: nothing is copied on write
        return seq, n * self.page_size

    def retain(self, cache: KVCache, cache_seq: int, tokens: list[int]) -> None:
        """Keep the whole pages of ``tokens`` (what ``cache_seq`` holds) before it is freed."""
        keys = self.page_keys(tokens)
        if not keys or not cache.can_trim(cache_seq, len(keys) * self.page_size):
            return  # nothing whole, or its window layers no longer hold what reuse needs
        tokens = tokens[:len(keys) * self.page_size]
        covering, n = self._find(tokens, keys, cache)
        if n == len(keys):  # an entry already serves all of it
            self._lru.move_to_end(covering.cache_seq)
            return
        entry = _Entry(cache.fork(cache_seq), tokens, keys)
        cache.trim(entry.cache_seq, len(tokens))
        for e in [e for e in self._lru.values() if self._is_prefix(e, tokens, keys)
                  and cache.can_trim(entry.cache_seq, len(e.tokens))]:
            self._drop(cache, e)  # the new entry answers every lookup it would
        self._lru[entry.cache_seq] = entry
        for key in keys:
            self._by_key.setdefault(key, []).append(entry)
        while len(self._lru) > self.max_entries:
            self._drop(cache, next(iter(self._lru.values())))
            self.evictions += 1

    def _is_prefix(self, e: _Entry, tokens: list[int], keys: list[int]) -> bool:
        n = len(e.keys)
        return n < len(keys) and keys[n - 1] == e.keys[-1] and e.tokens == tokens[:len(e.tokens)]

    def evict(self, cache: KVCache, pages: int | list[int]) -> int:
        """Drop least recently used entries until ``pages`` more pages are free (a list:
        per cache group, ``KVCache.groups``), or none is left; return the pages freed in
        the first group. Pages still shared by a running sequence stay."""
        want = [pages] if isinstance(pages, int) else list(pages)
        before = cache.free_per_group()

        def short() -> bool:
            return any(w > f - b for w, f, b in zip(want, cache.free_per_group(), before))
        while self._lru and short():
            self._drop(cache, next(iter(self._lru.values())))
            self.evictions += 1
        return cache.free_pages - before[0]

    def clear(self, cache: KVCache) -> None:
        while self._lru:
            self._drop(cache, next(iter(self._lru.values())))

    def _drop(self, cache: KVCache, e: _Entry) -> None:
        del self._lru[e.cache_seq]
        for key in e.keys:
            holders = self._by_key[key]
            holders.remove(e)
            if not holders:
                del self._by_key[key]
        cache.free(e.cache_seq)

    # ---------------------------------------------------------------- reporting

    def pages(self, cache: KVCache) -> set[int]:
        """Pool pages the entries hold (some may be shared with running sequences)."""
        return {p for e in self._lru.values() for p in cache.pages(e.cache_seq)}

    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self._lru.values())
