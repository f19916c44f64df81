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

An entry may also be inserted whole (``insert``: a cache file restored by
``LLM.load_cache``), partial last page included; a prompt reusing part of that page gets
the page copied into one of its own. ``DiskPrefixCache`` also keeps the entries as
cache files (``kvslim.kvfile``) in a folder, so a restarted server finds them again.
With sliding-window layers the same rule holds for inserted entries and files: a file
of N tokens holds its window layers' last pages only, so a prompt sharing only its
first M < N tokens reuses it only where those layers still hold what position M sees
(``kvfile.can_serve``); otherwise the prompt is evaluated.

It sits beside the pool's allocator (above ``cache``, below ``engine``) and plugs into
``kvslim.engine.Engine(prefix_cache=...)``, which ``LLM`` and the server both build; the
engine calls every method under its step lock, so nothing here locks.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kvslim import kvfile
from kvslim.cache import CacheFull, KVCache

__all__ = ["PrefixCache", "DiskPrefixCache"]

log = logging.getLogger("kvslim")


@dataclass(eq=False)
class _Entry:
    cache_seq: int
    tokens: list[int]  # whole pages (retained) or any length (inserted)
    keys: list[int]  # chained key per page


class PrefixCache:
    """A small LRU index of cached prompt prefixes, in whole pages of ``page_size`` tokens."""

    def __init__(self, page_size: int, max_entries: int = 64):
        if page_size < 1 or max_entries < 1:
            raise ValueError("page_size and max_entries must be positive")
        self.page_size, self.max_entries = page_size, max_entries
        self._lru: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # oldest first
        self._by_key: dict[int, list[_Entry]] = {}
        self._tails: list[_Entry] = []  # entries ending inside a page (inserted ones)
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
        ``tokens`` in whole pages (or into an inserted entry's last, partial page), or an
        empty sequence."""
        entry, n = self._find(tokens, self.page_keys(tokens), cache)
        tail, m = self._find_tail(tokens, n * self.page_size, cache)
        if tail is not None:
            self._lru.move_to_end(tail.cache_seq)
            return self._fork_tail(cache, tail, m)
        if entry is None:
            return cache.new_sequence(), 0
        self._lru.move_to_end(entry.cache_seq)
        seq = cache.fork(entry.cache_seq)
        cache.trim(seq, n * self.page_size)  # whole pages: nothing is copied on write
        return seq, n * self.page_size

    def _find_tail(self, tokens: list[int], longer_than: int,
                   cache: KVCache) -> tuple[_Entry | None, int]:
        """The entry with a partial last page sharing the most leading tokens with
        ``tokens`` (as far as its window layers still hold what that length needs), if
        that is more than ``longer_than`` and not a whole number of pages."""
        best, best_n = None, longer_than
        for e in self._tails:
            n = _common(e.tokens, tokens)
            if n > best_n and n % self.page_size and cache.can_trim(e.cache_seq, n):
                best, best_n = e, n
        return best, best_n

    def _fork_tail(self, cache: KVCache, e: _Entry, n: int) -> tuple[int, int]:
        """A sequence of ``e``'s first ``n`` tokens: its whole pages shared, the partial
        last page copied into a page of its own now, so every page the sequence holds is
        either shared and full or its own (the engine counts room that way). Without a
        free page for the copy: the whole pages alone (nothing, if the window layers
        cannot be cut there)."""
        seq = cache.fork(e.cache_seq)
        cache.trim(seq, n)
        try:
            cache.unshare_last(seq)
            return seq, n
        except CacheFull:
            whole = n - n % self.page_size
            if not cache.can_trim(seq, whole):
                whole = 0
            cache.trim(seq, whole)
            return seq, whole

    def insert(self, cache: KVCache, cache_seq: int, tokens: list[int]) -> None:
        """Keep ``cache_seq`` (which holds ``tokens``, any number of them: a restored cache
        file) as an entry; the index owns it from now on."""
        if cache.length(cache_seq) != len(tokens) or not tokens:
            raise ValueError(f"sequence {cache_seq} holds {cache.length(cache_seq)} tokens, "
                             f"{len(tokens)} given")
        if any(_common(e.tokens, tokens) == len(tokens) and cache.can_trim(e.cache_seq, len(tokens))
               for e in self._lru.values()):
            cache.free(cache_seq)  # an entry already serves all of it
            return
        for e in [e for e in self._lru.values() if self._is_prefix(e, tokens)
                  and cache.can_trim(cache_seq, len(e.tokens))]:
            self._drop(cache, e)  # the new entry answers every lookup it would
        self._add(cache, _Entry(cache_seq, list(tokens), self.page_keys(tokens)))

    def _add(self, cache: KVCache, entry: _Entry) -> None:
        self._lru[entry.cache_seq] = entry
        for key in entry.keys:
            self._by_key.setdefault(key, []).append(entry)
        if len(entry.tokens) % self.page_size:
            self._tails.append(entry)
        while len(self._lru) > self.max_entries:
            self._drop(cache, next(iter(self._lru.values())))
            self.evictions += 1

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
        for e in [e for e in self._lru.values() if self._is_prefix(e, tokens)
                  and cache.can_trim(entry.cache_seq, len(e.tokens))]:
            self._drop(cache, e)  # the new entry answers every lookup it would
        self._add(cache, entry)

    @staticmethod
    def _is_prefix(e: _Entry, tokens: list[int]) -> bool:
        return len(e.tokens) < len(tokens) and e.tokens == tokens[:len(e.tokens)]

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
        if e in self._tails:
            self._tails.remove(e)
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


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------- on disk


@dataclass(eq=False)
class _File:
    path: Path
    tokens: list[int]  # whole pages
    keys: list[int]
    groups: list[dict]  # the header's: window, layers, first position held

    def serves(self, length: int, page_size: int) -> bool:
        return kvfile.can_serve(self.groups, len(self.tokens), length, page_size)


class DiskPrefixCache(PrefixCache):
    """A ``PrefixCache`` whose entries are also cache files (``kvslim.kvfile``) in
    ``folder``, so a restarted server finds them again (``KVSLIM_PREFIX_CACHE_DIR``).

    Every new entry is written when it is retained (a finished request's whole pages;
    an entry it extends is replaced on disk as in memory), and a prompt whose longest
    cached prefix is only on disk has that file restored into the pool first. The folder
    holds at most ``budget`` bytes: the least recently used files (written or restored
    longest ago, by mtime) go first. Files of other models, cache types or coding are
    left alone (the folder may serve several); a file refused on load is skipped. With
    sliding-window layers a file serves only the prefixes its window layers still hold
    (``kvfile.can_serve``): a shorter one is evaluated, and a shorter file is kept beside
    a longer one that cannot serve it.
    """

    def __init__(self, page_size: int, folder: str | os.PathLike, budget: int, model_id: str,
                 cache: KVCache, max_entries: int = 64, extra: dict | None = None):
        super().__init__(page_size, max_entries)
        self.folder, self.budget, self.model_id = Path(folder), budget, model_id
        self.extra = extra or {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._types = (cache.cache_type_k, cache.cache_type_v)
        self._files: dict[Path, _File] = {}
        self._disk_by_key: dict[int, list[_File]] = {}
        self.restored = self.written = 0
        for path in sorted(self.folder.glob(f"*{kvfile.SUFFIX}")):
            self._index(path)

    def _index(self, path: Path) -> None:
        """Add ``path`` to the lookup if it is this model's, with this pool's types."""
        try:
            meta = kvfile.read_header(path)
            if meta["model"] != self.model_id or (meta["type_k"], meta["type_v"]) != self._types:
                return
            tokens = kvfile.read_tokens(path)
        except (OSError, ValueError) as e:
            log.debug("prefix cache: %s skipped: %s", path, e)
            return
        keys = self.page_keys(tokens)
        if not keys or len(tokens) != len(keys) * self.page_size:
            return
        f = _File(path, tokens, keys, meta["groups"])
        self._files[path] = f
        for key in keys:
            self._disk_by_key.setdefault(key, []).append(f)

    def _unindex(self, f: _File, delete: bool = False) -> None:
        self._files.pop(f.path, None)
        for key in f.keys:
            holders = self._disk_by_key.get(key, [])
            if f in holders:
                holders.remove(f)
        if delete:
            with contextlib.suppress(OSError):
                f.path.unlink()

    def _find_file(self, tokens: list[int], keys: list[int]) -> tuple[_File | None, int]:
        for n in range(len(keys), 0, -1):
            for f in self._disk_by_key.get(keys[n - 1], ()):
                if f.tokens[:n * self.page_size] == tokens[:n * self.page_size] and \
                        f.serves(n * self.page_size, self.page_size):
                    return f, n
        return None, 0

    def attach(self, cache: KVCache, tokens: list[int]) -> tuple[int, int]:
        keys = self.page_keys(tokens)
        f, n = self._find_file(tokens, keys)
        if f is not None and n > self._find(tokens, keys, cache)[1]:
            self._restore(cache, f)
        return super().attach(cache, tokens)

    def _restore(self, cache: KVCache, f: _File) -> None:
        """Put file ``f`` into the pool as an entry (evicting older entries for room: they
        are on disk too); skipped, with a log line, when it cannot be."""
        try:
            saved = kvfile.read(f.path)
            kvfile.check(saved, cache, self.model_id)
        except (OSError, ValueError) as e:
            log.warning("prefix cache: %s not restored: %s", f.path, e)
            self._unindex(f)
            return
        need = saved.pages(cache.page_size)
        short = [k - free for k, free in zip(need, cache.free_per_group())]
        if max(short) > 0:
            self.evict(cache, short)
        if any(k > free for k, free in zip(need, cache.free_per_group())):
            return
        super().insert(cache, kvfile.restore(cache, saved), saved.tokens)
        self.restored += 1
        with contextlib.suppress(OSError):
            os.utime(f.path)

    def retain(self, cache: KVCache, cache_seq: int, tokens: list[int]) -> None:
        super().retain(cache, cache_seq, tokens)
        keys = self.page_keys(tokens)
        if not keys:
            return
        tokens = tokens[:len(keys) * self.page_size]
        f, n = self._find_file(tokens, keys)
        if n == len(keys):  # a file already holds all of it
            with contextlib.suppress(OSError):
                os.utime(f.path)
            return
        entry, n = self._find(tokens, keys, cache)
        if entry is None or n != len(keys) or len(entry.tokens) % self.page_size:
            return
        self._write(cache, entry)

    def _write(self, cache: KVCache, entry: _Entry) -> None:
        name = hashlib.sha256(repr((self.model_id, self._types, entry.tokens)).encode()).hexdigest()
        path = self.folder / f"{name[:40]}{kvfile.SUFFIX}"
        try:
            kvfile.save(path, cache, entry.cache_seq, entry.tokens, self.model_id, self.extra)
        except OSError as e:
            log.warning("prefix cache: %s not written: %s", path, e)
            return
        self.written += 1
        self._index(path)
        new = self._files.get(path)
        for old in [g for g in self._files.values() if new is not None and
                    _strict_prefix(g.tokens, entry.tokens) and new.serves(len(g.tokens), self.page_size)]:
            self._unindex(old, delete=True)  # the new file answers every lookup it would
        self._trim_folder()

    def _trim_folder(self) -> None:
        """Delete the least recently used files until the folder fits the budget."""
        files = []
        for p in self.folder.glob(f"*{kvfile.SUFFIX}"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.budget:
                break
            f = self._files.get(p)
            if f is not None:
                self._unindex(f)
            with contextlib.suppress(OSError):
                p.unlink()
            total -= size

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob(f"*{kvfile.SUFFIX}"))


def _strict_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) < len(b) and b[:len(a)] == a
