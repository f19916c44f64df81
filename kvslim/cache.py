"""Paged K/V cache: pools of fixed-size pages shared by many sequences.

Layers that keep the same span of a sequence share one page table per sequence, so a
page number means the same token range in each of them: the global layers (every
position) form one *group*, and the layers on a sliding window of ``w`` keys another,
with its own, smaller pool. As a sequence grows, a window group's pages that hold only
positions no query can see again go back to its pool (their table entries become -1),
so a windowed layer holds about ``w`` positions (plus a prefill chunk) per sequence
whatever its length. K and V are stored in their own ggml formats (chosen
independently), each as *planes* (the fields of a ggml block, see ``formats``):

    group.k_planes[name]: [group layers, group pages, n_kv_heads, page_size, head_dim/32, per_block]

Heads come before tokens inside a page so a kernel walking one head's tokens reads
contiguous memory. There is no full-precision copy anywhere: ``nbytes`` is exactly
sum over groups of layers x kv_heads x pages x page_size x (head_dim x
bytes_per_element(k) + v_head_dim x bytes_per_element(v)).

Writing follows the slot-mapping protocol of paged engines: ``reserve(cid, n)`` once
per step extends a sequence in every group (releasing pages that fell out of a window,
allocating pages, copying a shared last page on write); ``slots(cid, start, end,
group)`` names the new rows' slots in each group; then the attention backend's write
(``kvslim.kernels``; ``write(layer, slots, k, v)`` here is the plain-torch reference)
quantizes each layer's rows into its group's slots. Rows are quantized per token and
per head along head_dim, so appending a token never touches older ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvslim import formats, rounding

DEFAULT_PAGE_SIZE = 64

__all__ = ["KVCache", "CacheFull", "DEFAULT_PAGE_SIZE", "PageTable", "Group", "window_pages"]


class CacheFull(RuntimeError):
    """The pool has no free page for the request; nothing was changed."""


@dataclass
class PageTable:
    """What kernels need to find a batch of sequences in one group's pool."""

    pages: torch.Tensor  # [B, max_pages] int32, -1 past a sequence's last page or out of its window
    lens: torch.Tensor  # [B] int32 tokens per sequence
    page_size: int


def window_pages(window: int, page_size: int, max_len: int, chunk: int) -> int:
    """Most pages a layer on a ``window`` (0: none) holds at once for one sequence of up
    to ``max_len`` tokens fed at most ``chunk`` rows a step.

    A step from length L keeps positions L-window+1 .. L+chunk-1 (its first query's
    window and its own rows): window-1+chunk tokens, on at most one page more than they
    fill.
    """
    full = -(-max_len // page_size)
    return full if not window else min(full, -(-(window - 1 + chunk) // page_size) + 1)


class Group:
    """The pages of the layers that keep one span of a sequence: every position
    (``window`` 0) or the last ``window`` positions (plus a step's rows)."""

    def __init__(self, window: int, layers: list[int], n_pages: int, cache: "KVCache"):
        self.window, self.layers, self.n_pages = window, layers, n_pages
        self.k_planes = cache._alloc(cache.fmt_k, len(layers), n_pages, cache.head_dim)
        self.v_planes = cache._alloc(cache.fmt_v, len(layers), n_pages, cache.v_head_dim)
        self.refs = [0] * n_pages
        self.free = list(range(n_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self.pages: dict[int, list[int]] = {}  # cid -> page per page index, -1 out of the window

    def grow(self, n_pages: int, cache: "KVCache") -> None:
        """New planes of ``n_pages`` pages with the old ones copied in; page ids are kept."""
        old = self.n_pages
        k_old, v_old = self.k_planes, self.v_planes
        self.k_planes = cache._alloc(cache.fmt_k, len(self.layers), n_pages, cache.head_dim)
        self.v_planes = cache._alloc(cache.fmt_v, len(self.layers), n_pages, cache.v_head_dim)
        for new, prev in ((self.k_planes, k_old), (self.v_planes, v_old)):
            for name, t in new.items():
                t[:, :old] = prev[name]
        self.n_pages = n_pages
        self.refs += [0] * (n_pages - old)
        self.free = list(range(n_pages - 1, old - 1, -1)) + self.free  # old free pages first

    def live(self, cid: int) -> list[int]:
        return [p for p in self.pages[cid] if p >= 0]

    def first_live(self, cid: int, page_size: int, length: int) -> int:
        """First position of ``cid`` this group still holds (``length`` when none)."""
        return next((i * page_size for i, p in enumerate(self.pages[cid]) if p >= 0), length)

    def take(self) -> int:
        page = self.free.pop()
        self.refs[page] = 1
        return page

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free.append(page)

    def drop_out_of_window(self, cid: int, first: int, page_size: int) -> None:
        """Release the pages of ``cid`` holding only positions before ``first``."""
        pages = self.pages[cid]
        for i in range(min(len(pages), max(0, first) // page_size)):
            if pages[i] >= 0:
                self.release(pages[i])
                pages[i] = -1

    def need(self, cid: int, length: int, n: int, page_size: int) -> int:
        """Free pages that extending ``cid`` from ``length`` by ``n`` tokens takes."""
        pages = self.pages[cid]
        need = -(-(length + n) // page_size) - len(pages)
        if n > 0 and length % page_size and self.refs[pages[-1]] > 1:
            need += 1  # the shared last page is copied before it is written
        return need

    def extend(self, cid: int, length: int, n: int, page_size: int) -> None:
        pages = self.pages[cid]
        if n > 0 and length % page_size and self.refs[pages[-1]] > 1:
            pages[-1] = self.copy_page(pages[-1])
        while len(pages) * page_size < length + n:
            pages.append(self.take())

    def copy_page(self, src: int) -> int:
        dst = self.take()
        for planes in (self.k_planes, self.v_planes):
            for t in planes.values():
                t[:, dst] = t[:, src]
        self.release(src)
        return dst

    def truncate(self, cid: int, keep: int) -> None:
        """Keep the first ``keep`` page entries of ``cid``, releasing the live ones after."""
        pages = self.pages[cid]
        for page in pages[keep:]:
            if page >= 0:
                self.release(page)
        del pages[keep:]

    @property
    def nbytes(self) -> int:
        planes = list(self.k_planes.values()) + list(self.v_planes.values())
        return sum(t.numel() * t.element_size() for t in planes)


class KVCache:
    """Paged pools of quantized K/V blocks for all layers of one model.

    ``windows[i]``: keys per query of layer i on a sliding window (0 or None: every
    position; default all 0). Windowed layers get ``window_pages`` pages (default
    ``n_pages``), global layers ``n_pages``. The sequence API (``reserve``, ``fork``,
    ``trim``, ``free``) covers every group at once; the page counts it reports
    (``n_pages``, ``free_pages``, ``pages(cid)``, ``capacity``) are the first group's:
    the global layers' when there are any.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_pages: int, *,
                 page_size: int = DEFAULT_PAGE_SIZE, cache_type_k: str = "f16",
                 cache_type_v: str = "f16", v_head_dim: int | None = None,
                 device: str | torch.device = "cpu", codec=None,
                 windows: list[int] | None = None, window_pages: int | None = None):
        self.fmt_k = formats.get_format(cache_type_k)
        self.fmt_v = formats.get_format(cache_type_v)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for what, dim in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if dim <= 0 or dim % formats.QK:
                raise ValueError(f"{what} {dim} is not a multiple of {formats.QK}: block formats "
                                 "cannot hold it (the model falls back to an f16 cache with a "
                                 "warning; this cache has no such fallback)")
        window_pages = n_pages if window_pages is None else window_pages
        if min(n_layers, n_kv_heads, n_pages, page_size, window_pages) <= 0:
            raise ValueError("n_layers, n_kv_heads, n_pages, window_pages and page_size must "
                             "be positive")
        windows = [int(w or 0) for w in windows] if windows is not None else [0] * n_layers
        if len(windows) != n_layers or min(windows) < 0:
            raise ValueError(f"windows must give {n_layers} sizes >= 0, got {windows}")
        self.n_layers, self.n_kv_heads, self.page_size = n_layers, n_kv_heads, page_size
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.device = torch.device(device)
        self.windows = windows
        self.groups: list[Group] = []
        self._where: list[tuple[int, int]] = [(0, 0)] * n_layers  # layer -> (group, local layer)
        for w in sorted(set(windows)):  # 0 first: the global layers are group 0
            layers = [i for i in range(n_layers) if windows[i] == w]
            for local, layer in enumerate(layers):
                self._where[layer] = (len(self.groups), local)
            self.groups.append(Group(w, layers, window_pages if w else n_pages, self))
        self._lens: dict[int, int] = {}
        self._next_id = 0
        # How rows are coded beyond the block format (rotation, centering, rounding;
        # kvslim.codec.KVCodec), fixed for the pool's life: the cache is only ever read
        # the way it was written. None: rows are stored as given, with ggml rounding.
        self.codec = codec

    # -------------------------------------------------------------- construction

    def _alloc(self, fmt: formats.Format, n_layers: int, n_pages: int,
               dim: int) -> dict[str, torch.Tensor]:
        shape = (n_layers, n_pages, self.n_kv_heads, self.page_size, dim // formats.QK)
        return {name: torch.zeros(*shape, n, dtype=dt, device=self.device)
                for name, dt, n in fmt.planes}

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, cache_type_k: str,
                        cache_type_v: str, v_head_dim: int | None = None) -> float:
        """Exact cache bytes one token costs across ``n_layers`` layers."""
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return n_layers * n_kv_heads * (head_dim * formats.bytes_per_element(cache_type_k)
                                        + v_head_dim * formats.bytes_per_element(cache_type_v))

    @property
    def cache_type_k(self) -> str:
        return self.fmt_k.name

    @property
    def cache_type_v(self) -> str:
        return self.fmt_v.name

    @property
    def n_pages(self) -> int:
        return self.groups[0].n_pages

    @property
    def k_planes(self) -> dict[str, torch.Tensor]:
        """The first group's K planes (every layer's when no layer is on a window)."""
        return self.groups[0].k_planes

    @property
    def v_planes(self) -> dict[str, torch.Tensor]:
        return self.groups[0].v_planes

    @property
    def capacity(self) -> int:
        """Tokens the pool can hold (the first group's pages)."""
        return self.n_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool: every plane of every group, nothing else."""
        return sum(g.nbytes for g in self.groups)

    def group_of(self, layer: int) -> tuple[Group, int]:
        """(the group holding ``layer``, the layer's index in its planes)."""
        g, local = self._where[range(self.n_layers)[layer]]
        return self.groups[g], local

    def group_index(self, layer: int) -> int:
        return self._where[range(self.n_layers)[layer]][0]

    def window_groups(self) -> list[Group]:
        return [g for g in self.groups if g.window]

    def grow(self, n_pages: int) -> None:
        """Enlarge the pool to ``n_pages`` pages (new planes, the old pages copied in), every
        sequence kept: for a cache without a size fixed in advance (``kvslim.hf``). Only a
        pool of global layers grows (a window group's size follows the window, not this)."""
        if self.window_groups():
            raise ValueError("a K/V pool with sliding-window layers cannot grow")
        if n_pages <= self.n_pages:
            raise ValueError(f"cannot grow a pool of {self.n_pages} pages to {n_pages}")
        self.groups[0].grow(n_pages, self)

    # -------------------------------------------------------------- bookkeeping

    @property
    def free_pages(self) -> int:
        return len(self.groups[0].free)

    @property
    def pages_in_use(self) -> int:
        return self.n_pages - self.free_pages

    @property
    def sequences(self) -> list[int]:
        return list(self._lens)

    def length(self, cid: int) -> int:
        return self._lens[self._check_cid(cid)]

    def pages(self, cid: int, group: int = 0) -> list[int]:
        """Pages of ``cid`` in a group, by page index (-1: released, out of the window)."""
        return list(self.groups[group].pages[self._check_cid(cid)])

    def _check_cid(self, cid: int) -> int:
        if cid not in self._lens:
            raise KeyError(f"no sequence {cid} in this cache")
        return cid

    def new_sequence(self) -> int:
        """A new empty sequence (its id, ``cid``); it owns no page until it is written."""
        cid = self._next_id
        self._next_id += 1
        self._lens[cid] = 0
        for g in self.groups:
            g.pages[cid] = []
        return cid

    def pages_needed(self, cid: int, n: int, group: int = 0) -> int:
        """Free pages of a group that ``reserve(cid, n)`` would take (before a window's
        release)."""
        return self.groups[group].need(cid, self._lens[self._check_cid(cid)], n, self.page_size)

    def reserve(self, cid: int, n: int) -> torch.Tensor:
        """Extend ``cid`` by ``n`` tokens; return their slots [n] in the first group
        (page * page_size + offset; ``slots`` gives any group's).

        First, pages of a window group that hold only positions the step's first query
        cannot see go back to the pool (no later step of this sequence reads them). Then
        all or nothing: on ``CacheFull`` the sequence keeps its length and pages.
        """
        if n < 0:
            raise ValueError(f"cannot reserve {n} tokens")
        length, ps = self._lens[self._check_cid(cid)], self.page_size
        for g in self.window_groups():
            g.drop_out_of_window(cid, length - g.window + 1, ps)
        for g in self.groups:
            need = g.need(cid, length, n, ps)
            if need > len(g.free):
                what = f" (layers on a window of {g.window})" if g.window else ""
                raise CacheFull(
                    f"K/V cache full: {n} more tokens need {need} free pages of {ps} "
                    f"tokens{what}, {len(g.free)} free of {g.n_pages} "
                    f"({g.n_pages * ps} tokens in all)")
        for g in self.groups:
            g.extend(cid, length, n, ps)
        self._lens[cid] = length + n
        return self.slots(cid, length, length + n)

    def slots(self, cid: int, start: int, end: int, group: int = 0) -> torch.Tensor:
        """Slots [end - start] int64 of positions [start, end) of ``cid`` in a group."""
        # numpy, not torch: a decode step asks for one slot, and there (on a cold cache
        # after the kernel job) the torch ops cost 260 us a step, these 100 (SmolLM2, 2 vCPUs)
        pos, ps = np.arange(start, end), self.page_size
        table = np.asarray(self.groups[group].pages[self._check_cid(cid)], dtype=np.int64)
        return torch.from_numpy(table[pos // ps] * ps + pos % ps)

    def fork(self, cid: int) -> int:
        """A new sequence sharing all of ``cid``'s pages (copy on write)."""
        child = self.new_sequence()
        self._lens[child] = self._lens[self._check_cid(cid)]
        for g in self.groups:
            g.pages[child] = list(g.pages[cid])
            for page in g.live(child):
                g.refs[page] += 1
        return child

    def held_from(self, cid: int, group: int = 0) -> int:
        """First position of ``cid`` that a group still holds (0 for a global group; its
        length when it holds none)."""
        return self.groups[group].first_live(self._check_cid(cid), self.page_size, self._lens[cid])

    def new_held(self, n: int, first: list[int]) -> int:
        """A new sequence of ``n`` tokens whose rows the caller writes next (a restored cache
        file): group i holds the pages from position ``first[i]`` (a multiple of page_size,
        0 for a global group) on, those before it -1 as ``reserve`` leaves a window's.
        ValueError when a window group would miss keys the next query sees; all or
        nothing: CacheFull leaves the pool unchanged."""
        ps = self.page_size
        if n <= 0 or len(first) != len(self.groups):
            raise ValueError(f"cannot hold {n} tokens from {first} in {len(self.groups)} groups")
        spans = []
        for g, f in zip(self.groups, first):
            if f % ps or not 0 <= f <= (max(0, n - g.window + 1) if g.window else 0):
                raise ValueError(f"a group on a window of {g.window} cannot hold {n} tokens from "
                                 f"position {f} (pages of {ps})")
            spans.append((f // ps, -(-n // ps)))
        for g, (lo, hi) in zip(self.groups, spans):
            if hi - lo > len(g.free):
                what = f" (layers on a window of {g.window})" if g.window else ""
                raise CacheFull(f"K/V cache full: {n} tokens need {hi - lo} free pages of {ps} "
                                f"tokens{what}, {len(g.free)} free of {g.n_pages}")
        cid = self.new_sequence()
        for g, (lo, hi) in zip(self.groups, spans):
            g.pages[cid] = [-1] * lo + [g.take() for _ in range(lo, hi)]
        self._lens[cid] = n
        return cid

    def unshare_last(self, cid: int) -> None:
        """Copy ``cid``'s last page into a page of its own in every group where that page is
        partial and shared (the copy on write ``reserve`` would make, made now: the engine
        counts a sequence's room as if every page it holds were full or its own). All or
        nothing: CacheFull leaves the pool unchanged."""
        n, ps = self.length(cid), self.page_size
        if n % ps == 0:
            return
        shared = [g for g in self.groups if g.refs[g.pages[cid][-1]] > 1]
        if any(not g.free for g in shared):
            raise CacheFull("K/V cache full: no free page to copy a shared last page into")
        for g in shared:
            g.pages[cid][-1] = g.copy_page(g.pages[cid][-1])

    def can_trim(self, cid: int, length: int) -> bool:
        """Whether ``trim(cid, length)`` can keep what the next step needs: every window
        group must still hold the keys that a query at ``length`` sees."""
        now = self.length(cid)
        if length in (0, now):
            return 0 <= length <= now
        return 0 < length < now and all(
            g.first_live(cid, self.page_size, now) <= max(0, length - g.window + 1)
            for g in self.window_groups())

    def trim(self, cid: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``cid`` and release the pages past them.

        ValueError (nothing changed) when a window group has released keys that a query
        at ``length`` would see (``can_trim``)."""
        if not 0 <= length <= self.length(cid):
            raise ValueError(f"cannot trim sequence {cid} of {self._lens[cid]} tokens to {length}")
        if not self.can_trim(cid, length):
            raise ValueError(f"cannot trim sequence {cid} of {self._lens[cid]} tokens to {length}: "
                             "its window layers no longer hold the keys before it")
        keep = -(-length // self.page_size)
        for g in self.groups:
            g.truncate(cid, keep)
        self._lens[cid] = length

    def free(self, cid: int) -> None:
        """Release every page of ``cid`` and forget it."""
        self.trim(cid, 0)
        for g in self.groups:
            del g.pages[cid]
        del self._lens[cid]

    def reset(self) -> None:
        """Free every sequence."""
        for cid in list(self._lens):
            self.free(cid)

    # -------------------------------------------------------------- admission

    def held(self, cid: int) -> list[int]:
        """Pages per group that ``cid`` alone holds (refcount 1)."""
        return [sum(1 for p in g.live(cid) if g.refs[p] == 1) for g in self.groups]

    def claim(self, cid: int | None, max_len: int, chunk: int) -> list[int]:
        """Pages per group that ``cid`` (None: a new sequence) may still take from the free
        lists until it holds ``max_len`` tokens, fed at most ``chunk`` rows a step.

        A global group keeps every page, so it is what its table lacks; a window group
        holds at most ``window_pages`` at once, of which those it alone holds are taken.
        """
        ps = self.page_size
        out = []
        for i, g in enumerate(self.groups):
            table = g.pages[cid] if cid is not None else []
            if g.window:
                alone = self.held(cid)[i] if cid is not None else 0
                out.append(max(0, window_pages(g.window, ps, max_len, chunk) - alone))
            else:
                out.append(max(0, -(-max_len // ps) - len(table)))
        return out

    def free_per_group(self) -> list[int]:
        return [len(g.free) for g in self.groups]

    def pages_per_group(self) -> list[int]:
        return [g.n_pages for g in self.groups]

    # -------------------------------------------------------------- data

    def check_rows(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """ValueError unless k is [n, kv_heads, head_dim] and v [n, kv_heads, v_head_dim]
        for n = len(slots): every writer checks this before it writes."""
        n = slots.shape[0]
        for name, x, dim in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if tuple(x.shape) != (n, self.n_kv_heads, dim):
                raise ValueError(f"{name} rows must be [{n}, {self.n_kv_heads}, {dim}], "
                                 f"got {list(x.shape)}")

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize rows into reserved slots of the layer's group, in plain torch (the
        reference writer; the attention backends write through their own kernels,
        ``kvslim.kernels``).

        k: [n, kv_heads, head_dim], v: [n, kv_heads, v_head_dim], stored as given (in the
        cache's coordinates: the codec's rotation and centering are the caller's), with
        the codec's rounding. Raises ValueError (cache unchanged) on non-finite rows or
        wrong shapes.
        """
        self.check_rows(slots, k, v)
        c = self.codec
        enc_k = rounding.encode_rounded(k, self.fmt_k.name, c.rounding_k if c else "ggml")
        enc_v = rounding.encode_rounded(v, self.fmt_v.name, c.rounding_v if c else "ggml")
        slots = slots.to(self.device)
        page, off = slots // self.page_size, slots % self.page_size
        for planes, enc in zip(self.layer_planes(layer), (enc_k, enc_v)):
            for name, t in planes.items():
                t[page, :, off] = enc[name].to(self.device)

    def layer_planes(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """K and V planes of one layer: {name: [group pages, kv_heads, page_size, nb, per_block]}."""
        g, local = self.group_of(layer)
        return ({n: t[local] for n, t in g.k_planes.items()},
                {n: t[local] for n, t in g.v_planes.items()})

    def gather(self, layer: int, cid: int, start: int = 0, end: int | None = None):
        """Stored planes of tokens [start, end) of ``cid``: {name: [kv_heads, T, nb, per]} for K, V.

        ValueError for positions a window layer has released."""
        end = self.length(cid) if end is None else end
        if not 0 <= start <= end <= self._lens[cid]:
            raise ValueError(f"range [{start}, {end}) outside sequence {cid} of {self._lens[cid]}")
        g, _ = self.group_of(layer)
        first, last = start // self.page_size, -(-end // self.page_size)
        table = g.pages[cid][first:last]
        if any(p < 0 for p in table):
            raise ValueError(f"positions [{start}, {end}) of sequence {cid} are no longer held by "
                             f"layer {layer} (a window of {g.window})")
        pages = torch.tensor(table, dtype=torch.int64, device=self.device)
        lo, hi = start - first * self.page_size, end - first * self.page_size
        out = []
        for planes in self.layer_planes(layer):
            got = {}
            for name, t in planes.items():
                x = t[pages]  # [np, kvh, S, nb, per]
                x = x.transpose(0, 1).reshape(self.n_kv_heads, -1, *x.shape[3:])
                got[name] = x[:, lo:hi]
            out.append(got)
        return out[0], out[1]

    def read(self, layer: int, cid: int, start: int = 0, end: int | None = None):
        """Dequantized K [kv_heads, T, head_dim] and V [kv_heads, T, v_head_dim], float32."""
        gk, gv = self.gather(layer, cid, start, end)
        return formats.decode(gk, self.fmt_k.name), formats.decode(gv, self.fmt_v.name)

    def export(self, layer: int, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ggml bytes of a sequence's K and V rows: [kv_heads, T, nb * block_bytes] uint8."""
        gk, gv = self.gather(layer, cid)
        return formats.to_bytes(gk, self.fmt_k.name), formats.to_bytes(gv, self.fmt_v.name)

    def page_table(self, cids: list[int], group: int = 0) -> PageTable:
        """Page table and lengths of a batch of sequences in a group, on the cache's device."""
        g = self.groups[group]
        pages = [g.pages[self._check_cid(s)] for s in cids]
        table = np.full((len(cids), max([len(p) for p in pages] + [1])), -1, dtype=np.int32)
        for i, p in enumerate(pages):
            table[i, :len(p)] = p
        lens = np.array([self._lens[s] for s in cids], dtype=np.int32)
        return PageTable(torch.from_numpy(table).to(self.device),
                         torch.from_numpy(lens).to(self.device), self.page_size)

    # -------------------------------------------------------------- checks

    def check(self) -> None:
        """Assert the bookkeeping is consistent: refcounts, free lists, lengths, windows."""
        ps = self.page_size
        for g in self.groups:
            counts = [0] * g.n_pages
            for cid, pages in g.pages.items():
                n = self._lens[cid]
                assert len(pages) == -(-n // ps), f"cid {cid} page count"
                held = [p >= 0 for p in pages]
                assert held == sorted(held), f"cid {cid}: a released page after a held one"
                # what the next query (at position n) sees is held
                need = max(0, n - g.window + 1) // ps if g.window else 0
                assert all(held[need:]), f"cid {cid}: a page inside its window was released"
                for p in pages:
                    if p >= 0:
                        counts[p] += 1
            assert counts == g.refs, "refcounts differ from the page tables"
            free = set(g.free)
            assert len(free) == len(g.free), "a page is free twice"
            assert free == {p for p in range(g.n_pages) if counts[p] == 0}, "free list is wrong"

    def __repr__(self) -> str:
        windows = "".join(f", {len(g.layers)} layers on a window of {g.window} in {g.n_pages} pages"
                          for g in self.window_groups())
        return (f"KVCache({self.n_layers} layers, {self.n_kv_heads} kv heads, dim {self.head_dim}, "
                f"K {self.cache_type_k} / V {self.cache_type_v}, {self.n_pages} pages x "
                f"{self.page_size} tokens{windows}, {self.nbytes / 2**20:.1f} MiB)")
