"""Paged K/V cache: one pool of fixed-size pages shared by many sequences.

Every layer has the same page table for a sequence, so a page number means the same
token range in every layer. K and V are stored in their own ggml formats (chosen
independently), each as *planes* (the fields of a ggml block, see ``formats``):

    k_planes[name]: [n_layers, n_pages, n_kv_heads, page_size, head_dim/32, per_block]

Heads come before tokens inside a page so a kernel walking one head's tokens reads
contiguous memory. There is no full-precision copy anywhere: ``nbytes`` is exactly
layers x kv_heads x capacity x (head_dim x bytes_per_element(k) + v_head_dim x
bytes_per_element(v)).

Writing follows the slot-mapping protocol of paged engines: ``reserve(seq, n)`` once
per step extends a sequence and returns its new slots (allocating pages, copying a
shared last page on write), then ``write(layer, slots, k, v)`` quantizes each layer's
rows into those slots. Rows are quantized per token and per head along head_dim, so
appending a token never touches older ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvslim import formats

DEFAULT_PAGE_SIZE = 64

__all__ = ["KVCache", "CacheFull", "DEFAULT_PAGE_SIZE", "PageTable"]


_FLOAT_ROWS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cpu_writer():
    """``kernels.cpu.write_rows`` (byte-identical to ``formats.encode``), None without numba."""
    try:
        from kvslim.kernels.cpu import write_rows
    except ImportError:
        return None
    return write_rows


def _triton_writer(cache: "KVCache"):
    """A fused quantize-on-write for CUDA/ROCm caches, or None where Triton cannot run."""
    try:
        from kvslim.kernels import triton as tk
    except ImportError:
        return None
    if tk.available(cache.device, cache.cache_type_k, cache.cache_type_v) is not None:
        return None

    def write(cache, layer, slots, k, v):
        # Check both sides before writing either, so a NaN in V leaves K untouched too.
        if not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
            raise ValueError("K/V rows hold non-finite values (NaN or inf); "
                             "the K/V cache refuses them")
        kp, vp = cache.layer_planes(layer)
        slots = slots.to(cache.device)
        tk.quantize_into(kp, slots, k, cache.cache_type_k, check_finite=False)
        tk.quantize_into(vp, slots, v, cache.cache_type_v, check_finite=False)

    return write


def _fused_writer(cache: "KVCache"):
    """The device's fused quantize-on-write (one kernel per side), or None for the torch path."""
    if cache.device.type == "cpu":
        return _cpu_writer()
    if cache.device.type == "cuda":
        return _triton_writer(cache)
    return None


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
        self._writer = None  # the device's fused quantize-on-write, looked up on first write
        # How rows are coded beyond the block format (rotation, centering, rounding;
        # kvslim.codec.KVCodec), fixed for the pool's life: the cache is only ever read
        # the way it was written. None: rows are stored as given, with ggml rounding.
        self.codec = codec
        self._lsq = self._lsq_writer()

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

    def length(self, seq: int) -> int:
        return self._lens[self._check_seq(seq)]

    def pages(self, seq: int) -> list[int]:
        return list(self._pages[self._check_seq(seq)])

    def _check_seq(self, seq: int) -> int:
        if seq not in self._pages:
            raise KeyError(f"no sequence {seq} in this cache")
        return seq

    def _take_page(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def new_sequence(self) -> int:
        """A new empty sequence; it owns no page until it is written."""
        seq = self._next_id
        self._next_id += 1
        self._pages[seq], self._lens[seq] = [], 0
        return seq

    def pages_needed(self, seq: int, n: int) -> int:
        """Free pages that ``reserve(seq, n)`` would take."""
        length, pages = self._lens[self._check_seq(seq)], self._pages[seq]
        need = -(-(length + n) // self.page_size) - len(pages)
        if n > 0 and length % self.page_size and self._refs[pages[-1]] > 1:
            need += 1  # the shared last page is copied before it is written
        return need

    def reserve(self, seq: int, n: int) -> torch.Tensor:
        """Extend ``seq`` by ``n`` tokens; return their slots [n] (page * page_size + offset).

        All or nothing: on ``CacheFull`` the sequence and the pool are unchanged.
        """
        if n < 0:
            raise ValueError(f"cannot reserve {n} tokens")
        need = self.pages_needed(seq, n)
        if need > len(self._free):
            raise CacheFull(
                f"K/V cache full: {n} more tokens need {need} free pages of {self.page_size} "
                f"tokens, {len(self._free)} free of {self.n_pages} "
                f"({self.capacity} tokens in all)")
        length, pages = self._lens[seq], self._pages[seq]
        if n > 0 and length % self.page_size and self._refs[pages[-1]] > 1:
            pages[-1] = self._copy_page(pages[-1])
        while len(pages) * self.page_size < length + n:
            pages.append(self._take_page())
        self._lens[seq] = length + n
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

    def fork(self, seq: int) -> int:
        """A new sequence sharing all of ``seq``'s pages (copy on write)."""
        child = self.new_sequence()
        self._pages[child] = list(self._pages[self._check_seq(seq)])
        self._lens[child] = self._lens[seq]
        for page in self._pages[child]:
            self._refs[page] += 1
        return child

    def trim(self, seq: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``seq`` and release the pages past them."""
        if not 0 <= length <= self.length(seq):
            raise ValueError(f"cannot trim sequence {seq} of {self._lens[seq]} tokens to {length}")
        pages = self._pages[seq]
        keep = -(-length // self.page_size)
        for page in pages[keep:]:
            self._release(page)
        del pages[keep:]
        self._lens[seq] = length

    def free(self, seq: int) -> None:
        """Release every page of ``seq`` and forget it."""
        self.trim(seq, 0)
        del self._pages[seq], self._lens[seq]

    def reset(self) -> None:
        """Free every sequence."""
        for seq in list(self._pages):
            self.free(seq)

    # -------------------------------------------------------------- data

    def _lsq_writer(self):
        """The least-squares rounding writer when the codec asks for it on a side whose
        type has it (kvslim.rounding), else None: the fused writers round as ggml does."""
        from kvslim import rounding

        c = self.codec
        want = c is not None and any(r == "lsq" and rounding.supports_lsq(f.name) for r, f in
                                     ((c.rounding_k, self.fmt_k), (c.rounding_v, self.fmt_v)))
        return rounding.writer(self) if want else None

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize rows into reserved slots. k: [n, kv_heads, head_dim], v: [n, kv_heads, v_head_dim].

        Raises ValueError (cache unchanged) on non-finite rows or wrong shapes.
        """
        n = slots.shape[0]
        for name, x, dim in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if tuple(x.shape) != (n, self.n_kv_heads, dim):
                raise ValueError(f"{name} rows must be [{n}, {self.n_kv_heads}, {dim}], "
                                 f"got {list(x.shape)}")
        if self._lsq is not None:
            self._lsq(self, layer, slots, k, v)
            return
        if self._writer is None:
            self._writer = _fused_writer(self) or False
        if self._writer and all(x.device.type == self.device.type and x.dtype in _FLOAT_ROWS
                                for x in (k, v)):
            self._writer(self, layer, slots, k, v)  # one kernel instead of ~15 torch ops per side
            return
        enc_k = formats.encode(k, self.fmt_k.name)  # [n, kvh, nb, per]
        enc_v = formats.encode(v, self.fmt_v.name)
        slots = slots.to(self.device)
        page, off = slots // self.page_size, slots % self.page_size
        for planes, enc in ((self.k_planes, enc_k), (self.v_planes, enc_v)):
            for name, t in planes.items():
                t[layer][page, :, off] = enc[name].to(self.device)

    def layer_planes(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """K and V planes of one layer: {name: [n_pages, kv_heads, page_size, nb, per_block]}."""
        return ({n: t[layer] for n, t in self.k_planes.items()},
                {n: t[layer] for n, t in self.v_planes.items()})

    def gather(self, layer: int, seq: int, start: int = 0, end: int | None = None):
        """Stored planes of tokens [start, end) of ``seq``: {name: [kv_heads, T, nb, per]} for K, V."""
        end = self.length(seq) if end is None else end
        if not 0 <= start <= end <= self._lens[seq]:
            raise ValueError(f"range [{start}, {end}) outside sequence {seq} of {self._lens[seq]}")
        first, last = start // self.page_size, -(-end // self.page_size)
        pages = torch.tensor(self._pages[seq][first:last], dtype=torch.int64, device=self.device)
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

    def read(self, layer: int, seq: int, start: int = 0, end: int | None = None):
        """Dequantized K [kv_heads, T, head_dim] and V [kv_heads, T, v_head_dim], float32."""
        gk, gv = self.gather(layer, seq, start, end)
        return formats.decode(gk, self.fmt_k.name), formats.decode(gv, self.fmt_v.name)

    def export(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ggml bytes of a sequence's K and V rows: [kv_heads, T, nb * block_bytes] uint8."""
        gk, gv = self.gather(layer, seq)
        return formats.to_bytes(gk, self.fmt_k.name), formats.to_bytes(gv, self.fmt_v.name)

    def page_table(self, seqs: list[int]) -> PageTable:
        """Page table and lengths of a batch of sequences, on the cache's device."""
        width = max([len(self._pages[self._check_seq(s)]) for s in seqs] + [1])
        table = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, :len(self._pages[s])] = torch.tensor(self._pages[s], dtype=torch.int32)
        lens = torch.tensor([self._lens[s] for s in seqs], dtype=torch.int32)
        return PageTable(table.to(self.device), lens.to(self.device), self.page_size)

    # -------------------------------------------------------------- checks

    def check(self) -> None:
        """Assert the bookkeeping is consistent: refcounts, free list, lengths."""
        counts = [0] * self.n_pages
        for seq, pages in self._pages.items():
            assert len(pages) == -(-self._lens[seq] // self.page_size), f"seq {seq} page count"
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
