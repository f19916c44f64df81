"""Paged K/V cache: one pool of fixed-size pages shared by many sequences.

Every layer has the same page table for a sequence, so a page number means the same
token range in every layer. K and V are stored in their own ggml formats (chosen
independently), each as *planes* (the fields of a ggml block, see ``formats``):

    k_planes[name]: [n_layers, n_pages, n_kv_heads, page_size, head_dim/32, per_block]

Heads come before tokens inside a page so a kernel walking one head's tokens reads
contiguous memory. There is no full-precision copy anywhere: ``nbytes`` is exactly
layers x kv_heads x capacity x (head_dim x bytes_per_element(k) + v_head_dim x
bytes_per_element(v)).

Writing follows the slot-mapping protocol of paged engines: ``reserve(cid, n)`` once
per step extends a sequence and returns its new slots (allocating pages, copying a
shared last page on write), then the attention backend's write (``kvslim.kernels``;
``write(layer, slots, k, v)`` here is the plain-torch reference) quantizes each
layer's rows into those slots. Rows are quantized per token and per head along head_dim, so
appending a token never touches older ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvslim import formats, rounding

DEFAULT_PAGE_SIZE = 64

__all__ = ["KVCache", "CacheFull", "DEFAULT_PAGE_SIZE", "PageTable"]


class CacheFull(RuntimeError):
    """The pool has no free page for the request; nothing was changed."""


@dataclass
class PageTable:
    """What kernels need to find a batch of sequences in the pool."""

    pages: torch.Tensor  # [B, max_pages] int32, -1 past a sequence's last page
    lens: torch.Tensor  # [B] int32 tokens per sequence
    page_size: int


class KVCache:
    """A paged pool of quantized K/V blocks for all layers of one model."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_pages: int, *,
                 page_size: int = DEFAULT_PAGE_SIZE, cache_type_k: str = "f16",
                 cache_type_v: str = "f16", v_head_dim: int | None = None,
                 device: str | torch.device = "cpu", codec=None):
        self.fmt_k = formats.get_format(cache_type_k)
        self.fmt_v = formats.get_format(cache_type_v)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for what, dim in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if dim <= 0 or dim % formats.QK:
                raise ValueError(f"{what} {dim} is not a multiple of {formats.QK}: block formats "
                                 "cannot hold it (the model falls back to an f16 cache with a "
                                 "warning; this cache has no such fallback)")
        if min(n_layers, n_kv_heads, n_pages, page_size) <= 0:
            raise ValueError("n_layers, n_kv_heads, n_pages and page_size must be positive")
        self.n_layers, self.n_kv_heads, self.page_size = n_layers, n_kv_heads, page_size
        self.head_dim, self.v_head_dim, self.n_pages = head_dim, v_head_dim, n_pages
        self.device = torch.device(device)
        self.k_planes = self._alloc(self.fmt_k, head_dim)
        self.v_planes = self._alloc(self.fmt_v, v_head_dim)
        self._refs = [0] * n_pages
        self._free = list(range(n_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0
        # How rows are coded beyond the block format (rotation, centering, rounding;
        # kvslim.codec.KVCodec), fixed for the pool's life: the cache is only ever read
        # the way it was written. None: rows are stored as given, with ggml rounding.
        self.codec = codec

    # -------------------------------------------------------------- construction

    def _alloc(self, fmt: formats.Format, dim: int) -> dict[str, torch.Tensor]:
        shape = (self.n_layers, self.n_pages, self.n_kv_heads, self.page_size, dim // formats.QK)
        return {name: torch.zeros(*shape, n, dtype=dt, device=self.device)
                for name, dt, n in fmt.planes}

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, cache_type_k: str,
                        cache_type_v: str, v_head_dim: int | None = None) -> float:
        """Exact cache bytes one token costs across all layers."""
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
    def capacity(self) -> int:
        """Tokens the pool can hold."""
        return self.n_pages * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool: every plane of every layer, nothing else."""
        planes = list(self.k_planes.values()) + list(self.v_planes.values())
        return sum(t.numel() * t.element_size() for t in planes)

    def grow(self, n_pages: int) -> None:
        """Enlarge the pool to ``n_pages`` pages (new planes, the old pages copied in), every
        sequence kept: for a cache without a size fixed in advance (``kvslim.hf``)."""
        if n_pages <= self.n_pages:
            raise ValueError(f"cannot grow a pool of {self.n_pages} pages to {n_pages}")
        old, (k_old, v_old) = self.n_pages, (self.k_planes, self.v_planes)
        self.n_pages = n_pages
        self.k_planes = self._alloc(self.fmt_k, self.head_dim)
        self.v_planes = self._alloc(self.fmt_v, self.v_head_dim)
        for new, prev in ((self.k_planes, k_old), (self.v_planes, v_old)):
            for name, t in new.items():
                t[:, :old] = prev[name]
        self._refs += [0] * (n_pages - old)
        self._free = list(range(n_pages - 1, old - 1, -1)) + self._free  # old free pages first

    # -------------------------------------------------------------- bookkeeping

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.n_pages - len(self._free)

    @property
    def sequences(self) -> list[int]:
        return list(self._pages)

    def length(self, cid: int) -> int:
        return self._lens[self._check_cid(cid)]

    def pages(self, cid: int) -> list[int]:
        return list(self._pages[self._check_cid(cid)])

    def _check_cid(self, cid: int) -> int:
        if cid not in self._pages:
            raise KeyError(f"no sequence {cid} in this cache")
        return cid

    def _take_page(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def new_sequence(self) -> int:
        """A new empty sequence (its id, ``cid``); it owns no page until it is written."""
        cid = self._next_id
        self._next_id += 1
        self._pages[cid], self._lens[cid] = [], 0
        return cid

    def pages_needed(self, cid: int, n: int) -> int:
        """Free pages that ``reserve(cid, n)`` would take."""
        length, pages = self._lens[self._check_cid(cid)], self._pages[cid]
        need = -(-(length + n) // self.page_size) - len(pages)
        if n > 0 and length % self.page_size and self._refs[pages[-1]] > 1:
            need += 1  # the shared last page is copied before it is written
        return need

    def reserve(self, cid: int, n: int) -> torch.Tensor:
        """Extend ``cid`` by ``n`` tokens; return their slots [n] (page * page_size + offset).

        All or nothing: on ``CacheFull`` the sequence and the pool are unchanged.
        """
        if n < 0:
            raise ValueError(f"cannot reserve {n} tokens")
        need = self.pages_needed(cid, n)
        if need > len(self._free):
            raise CacheFull(
                f"K/V cache full: {n} more tokens need {need} free pages of {self.page_size} "
                f"tokens, {len(self._free)} free of {self.n_pages} "
                f"({self.capacity} tokens in all)")
        length, pages = self._lens[cid], self._pages[cid]
        if n > 0 and length % self.page_size and self._refs[pages[-1]] > 1:
            pages[-1] = self._copy_page(pages[-1])
        while len(pages) * self.page_size < length + n:
            pages.append(self._take_page())
        self._lens[cid] = length + n
        pos = torch.arange(length, length + n)
        table = torch.tensor(pages, dtype=torch.int64)
        return table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _copy_page(self, src: int) -> int:
        dst = self._take_page()
        for planes in (self.k_planes, self.v_planes):
            for t in planes.values():
                t[:, dst] = t[:, src]
        self._release(src)
        return dst

    def fork(self, cid: int) -> int:
        """A new sequence sharing all of ``cid``'s pages (copy on write)."""
        child = self.new_sequence()
        self._pages[child] = list(self._pages[self._check_cid(cid)])
        self._lens[child] = self._lens[cid]
        for page in self._pages[child]:
            self._refs[page] += 1
        return child

    def trim(self, cid: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``cid`` and release the pages past them."""
        if not 0 <= length <= self.length(cid):
            raise ValueError(f"cannot trim sequence {cid} of {self._lens[cid]} tokens to {length}")
        pages = self._pages[cid]
        keep = -(-length // self.page_size)
        for page in pages[keep:]:
            self._release(page)
        del pages[keep:]
        self._lens[cid] = length

    def free(self, cid: int) -> None:
        """Release every page of ``cid`` and forget it."""
        self.trim(cid, 0)
        del self._pages[cid], self._lens[cid]

    def reset(self) -> None:
        """Free every sequence."""
        for cid in list(self._pages):
            self.free(cid)

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
        """Quantize rows into reserved slots, in plain torch (the reference writer; the
        attention backends write through their own kernels, ``kvslim.kernels``).

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
        for planes, enc in ((self.k_planes, enc_k), (self.v_planes, enc_v)):
            for name, t in planes.items():
                t[layer][page, :, off] = enc[name].to(self.device)

    def layer_planes(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """K and V planes of one layer: {name: [n_pages, kv_heads, page_size, nb, per_block]}."""
        return ({n: t[layer] for n, t in self.k_planes.items()},
                {n: t[layer] for n, t in self.v_planes.items()})

    def gather(self, layer: int, cid: int, start: int = 0, end: int | None = None):
        """Stored planes of tokens [start, end) of ``cid``: {name: [kv_heads, T, nb, per]} for K, V."""
        end = self.length(cid) if end is None else end
        if not 0 <= start <= end <= self._lens[cid]:
            raise ValueError(f"range [{start}, {end}) outside sequence {cid} of {self._lens[cid]}")
        first, last = start // self.page_size, -(-end // self.page_size)
        pages = torch.tensor(self._pages[cid][first:last], dtype=torch.int64, device=self.device)
        lo, hi = start - first * self.page_size, end - first * self.page_size
        out = []
        for planes in self.layer_planes(layer):
            got = {}
            for name, t in planes.items():
                g = t[pages]  # [np, kvh, S, nb, per]
                g = g.transpose(0, 1).reshape(self.n_kv_heads, -1, *g.shape[3:])
                got[name] = g[:, lo:hi]
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

    def page_table(self, cids: list[int]) -> PageTable:
        """Page table and lengths of a batch of sequences, on the cache's device."""
        width = max([len(self._pages[self._check_cid(s)]) for s in cids] + [1])
        table = torch.full((len(cids), width), -1, dtype=torch.int32)
        for i, s in enumerate(cids):
            table[i, :len(self._pages[s])] = torch.tensor(self._pages[s], dtype=torch.int32)
        lens = torch.tensor([self._lens[s] for s in cids], dtype=torch.int32)
        return PageTable(table.to(self.device), lens.to(self.device), self.page_size)

    # -------------------------------------------------------------- checks

    def check(self) -> None:
        """Assert the bookkeeping is consistent: refcounts, free list, lengths."""
        counts = [0] * self.n_pages
        for cid, pages in self._pages.items():
            assert len(pages) == -(-self._lens[cid] // self.page_size), f"cid {cid} page count"
            for p in pages:
                counts[p] += 1
        assert counts == self._refs, "refcounts differ from the page tables"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is free twice"
        assert free == {p for p in range(self.n_pages) if counts[p] == 0}, "free list is wrong"

    def __repr__(self) -> str:
        return (f"KVCache({self.n_layers} layers, {self.n_kv_heads} kv heads, dim {self.head_dim}, "
                f"K {self.cache_type_k} / V {self.cache_type_v}, {self.n_pages} pages x "
                f"{self.page_size} tokens, {self.nbytes / 2**20:.1f} MiB)")
