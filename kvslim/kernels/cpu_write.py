"""The CPU cache writer: every K/V write of a CPU cache, in one numba call per step.

Rows are coded (optional Hadamard rotation, minus a per-head shift: ``kvslim.codec``)
and quantized straight into the cache's planes, with ggml's rounding (byte-identical to
``formats.encode``) or least-squares block scales (``rounding``, the same search one
block at a time). An uncoded cache is the identity side (no rotation, zero shift,
ggml rounding), so there is one write path for all.

Every write checks all its rows (slots inside the pool, finite values) before it
writes anything, so a refused write leaves the cache as it was. Sums in the lsq search
run in sequence, so a scale can differ from the torch reference's in its last bit:
both are least squares, both never worse than ggml's block.
"""
from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from numba import njit

from kvslim import formats, jit  # noqa: F401 - jit: before any kernel compiles
from kvslim.kernels import ggml
from kvslim.rotation import forward_row
from kvslim.rounding import LSQ_TYPES, affine_shrinks, symmetric_divisors

if TYPE_CHECKING:
    from kvslim.cache import KVCache

__all__ = ["Side", "write", "write_arrays", "sides", "per_version", "plain_sides", "PARALLEL_MIN_ROWS"]

_f2h, _h2f = ggml.float_to_half, ggml.half_to_float
_F0, _F1, _FH = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_DIVISORS = {t: np.array(symmetric_divisors(t), np.float32)
             for t in LSQ_TYPES if t in ("q4_0", "q5_0", "q8_0")}
_NO_DIVISORS = np.zeros(0, np.float32)
SHRINKS = np.array(affine_shrinks(), np.float32)  # [9, 2]


class Side(NamedTuple):
    """How one side's (K or V) rows of one layer are coded before they are quantized."""

    signs: np.ndarray  # [Hkv, D] float32: the rotation's signs times the key scaling (ones: none)
    size: int  # Hadamard block size, 0: no rotation
    shift: np.ndarray  # [Hkv, D] float32 subtracted after the rotation (zeros: none)
    lsq: bool  # least-squares block scales instead of ggml's
    divisors: np.ndarray  # the symmetric types' candidate divisors (rounding.symmetric_divisors)
    inv_scale: np.ndarray  # [Hkv] float32 multiplier after the shift (fp8 scales; ones: none)
    scaled: bool


# ---------------------------------------------------------------- least squares, one block


@njit(inline="always")
def _nf16(x):
    return _h2f(_f2h(x))


@njit(inline="always")
def _nround(x):  # half away from zero
    r = np.floor(abs(x) + _FH)
    return r if x >= _F0 else -r


@njit(inline="always")
def _sym_try(x, d, lo, hi, q):
    """Codes of x at scale d into q; (least-squares f16 scale, sum x q, sum q q) in float64."""
    inv = _F1 / d if d != _F0 else _F0
    sxq, sqq = 0.0, 0.0
    for j in range(32):
        t = min(max(_nround(x[j] * inv), lo), hi)
        q[j] = t
        sxq += np.float64(x[j]) * t
        sqq += np.float64(t) * t
    dd = _nf16(np.float32(sxq / sqq)) if sqq > 0.0 else _F0
    return dd, sxq, sqq


@njit(inline="always")
def _sym_sums(x, q):
    sxq, sqq = 0.0, 0.0
    for j in range(32):
        sxq += np.float64(x[j]) * q[j]
        sqq += np.float64(q[j]) * q[j]
    return sxq, sqq


@njit(cache=True)
def _sym_block(x, code, divs, q, best):
    """Best (f16 scale, codes in ``best``) of the ggml scale and the candidates."""
    if code == ggml.Q8_0:
        lo, hi = np.float32(-127.0), np.float32(127.0)
        ref = _F0
        for j in range(32):
            ref = max(ref, abs(x[j]))
        d0 = ref / hi
    else:
        lo = np.float32(-8.0) if code == ggml.Q4_0 else np.float32(-16.0)
        hi = -lo - _F1
        ref = ggml.signed_absmax(x)
        d0 = ref / lo
    inv0 = ggml.inv_or_zero(d0)
    sxx = 0.0
    for j in range(32):  # ggml's own codes (formats.Q*_0.encode_blocks)
        sxx += np.float64(x[j]) * x[j]
        if code == ggml.Q8_0:
            best[j] = np.float32(ggml.code_of(ggml.roundf(x[j] * inv0), hi))
        else:
            best[j] = np.float32(ggml.code_of(np.trunc(x[j] * inv0 + (-lo + _FH)), hi - lo)) + lo
    bd = _nf16(d0)
    sxq, sqq = _sym_sums(x, best)
    d64 = np.float64(bd)
    berr = sxx - 2.0 * d64 * sxq + d64 * d64 * sqq
    for c in divs:
        d, sxq, sqq = _sym_try(x, ref / c, lo, hi, q)
        d64 = np.float64(d)
        e = sxx - 2.0 * d64 * sxq + d64 * d64 * sqq
        if e < berr:
            berr, bd = e, d
            best[:] = q
    return bd, lo


@njit(inline="always")
def _aff_err(sxx, sx, d, m, sxq, sqq, sq):
    d, m = np.float64(d), np.float64(m)
    return sxx - 2.0 * d * sxq - 2.0 * m * sx + d * d * sqq + 2.0 * d * m * sq + 32.0 * m * m


@njit(cache=True)
def _aff_block(x, top, shrinks, q, best):
    """Best (f16 d, f16 m, codes in ``best``) of ggml's [min, max] and shrunk ranges."""
    mn, mx = ggml.min_max(x)
    d0 = (mx - mn) / top
    inv0 = ggml.inv_or_zero(d0)
    sxx, sx, sxq, sqq, sq = 0.0, 0.0, 0.0, 0.0, 0.0
    for j in range(32):
        t = np.float32(ggml.code_of(np.trunc((x[j] - mn) * inv0 + _FH), top))
        best[j] = t
        sxx += np.float64(x[j]) * x[j]
        sx += x[j]
        sxq += np.float64(x[j]) * t
        sqq += np.float64(t) * t
        sq += t
    bd, bm = _nf16(d0), _nf16(mn)
    berr = _aff_err(sxx, sx, bd, bm, sxq, sqq, sq)
    for i in range(shrinks.shape[0]):
        lo = mn + shrinks[i, 0] * d0
        d = (mx - shrinks[i, 1] * d0 - lo) / top
        inv = _F1 / d if d > _F0 else _F0
        sxq, sqq, sq = 0.0, 0.0, 0.0
        for j in range(32):
            t = min(max(_nround((x[j] - lo) * inv), _F0), top)
            q[j] = t
            sxq += np.float64(x[j]) * t
            sqq += np.float64(t) * t
            sq += t
        det = 32.0 * sqq - sq * sq
        if not det > 0.0:
            continue
        dd = _nf16(np.float32((32.0 * sxq - sq * sx) / det))
        mm = _nf16(np.float32((sx - np.float64(dd) * sq) / 32.0))
        e = _aff_err(sxx, sx, dd, mm, sxq, sqq, sq)
        if e < berr:
            berr, bd, bm = e, dd, mm
            best[:] = q
    return bd, bm


@njit(cache=True)
def _lsq_block(p, x, blk, divs, shrinks, q, best):
    code, d, m, qh, qs = p.code, p.d, p.m, p.qh, p.qs
    if code == ggml.Q4_1 or code == ggml.Q5_1:
        top = np.float32(15.0) if code == ggml.Q4_1 else np.float32(31.0)
        dd, mm = _aff_block(x, top, shrinks, q, best)
        m[blk] = _f2h(mm)
        lo = _F0
    else:
        dd, lo = _sym_block(x, code, divs, q, best)
    d[blk] = _f2h(dd)
    if code == ggml.Q8_0:
        for j in range(32):
            qs[blk * 32 + j] = np.int8(best[j])
        return
    bits = np.uint32(0)
    for j in range(16):
        a, b = np.int32(best[j] - lo), np.int32(best[j + 16] - lo)
        qs[blk * 16 + j] = (a & 15) | ((b & 15) << 4)
        bits |= np.uint32((a >> 4) & 1) << np.uint32(j)
        bits |= np.uint32((b >> 4) & 1) << np.uint32(j + 16)
    if code == ggml.Q5_0 or code == ggml.Q5_1:
        qh[blk] = bits


# ---------------------------------------------------------------- rows


@njit(inline="always")
def _put_row(planes, xrow, row, nb, side, shrinks, q, best, codes):
    """One head's row xrow [nb*32] into flat row ``row`` of a side's planes: lsq or ggml."""
    for b in range(nb):
        xb = xrow[b * 32:(b + 1) * 32]
        if side.lsq:
            _lsq_block(planes, xb, row * nb + b, side.divisors, shrinks, q, best)
        else:
            ggml.encode_block(planes, xb, row * nb + b, codes)


@njit(cache=True)
def _coded_rows(x, slots, planes, geom, nb, side, shrinks):
    """Rows x [n, H, D] times side.signs [H, D], rotated (side.size > 0), minus side.shift
    [H, D], times side.inv_scale [H] (fp8), into their slots."""
    scale = np.float32(1.0 / np.sqrt(side.size)) if side.size > 0 else _F1
    buf = np.empty(x.shape[2], np.float32)
    codes = np.empty(32, np.int32)
    q, best = np.empty(32, np.float32), np.empty(32, np.float32)
    for i in range(x.shape[0]):
        page, off = slots[i] // geom.page_size, slots[i] % geom.page_size
        for h in range(geom.n_kv):
            forward_row(x[i, h], buf, side.signs[h], side.shift[h], side.size, scale)
            if side.scaled:
                for j in range(buf.shape[0]):
                    buf[j] = buf[j] * side.inv_scale[h]
            row = ((geom.layer * geom.n_pages + page) * geom.n_kv + h) * geom.page_size + off
            _put_row(planes, buf, row, nb, side, shrinks, q, best, codes)


@njit(cache=True, nogil=True)
def write_rows(k, v, slots, kplanes, vplanes, geom, side_k, side_v, shrinks):
    """K and V rows into the cache, unchecked; releases the GIL, so threads can write
    disjoint row ranges at once (their slots are distinct)."""
    _coded_rows(k, slots, kplanes, geom, geom.nb_k, side_k, shrinks)
    _coded_rows(v, slots, vplanes, geom, geom.nb_v, side_v, shrinks)


@njit(cache=True)
def _write(k, v, slots, kplanes, vplanes, geom, side_k, side_v, shrinks):
    """Check everything, then write; ``ggml.precheck``'s code, 0 when written."""
    bad = ggml.precheck(k, v, slots, geom)
    if bad:
        return bad
    write_rows(k, v, slots, kplanes, vplanes, geom, side_k, side_v, shrinks)
    return 0


# ---------------------------------------------------------------- torch glue

_SIDES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> (version, {layer: sides})


def _side(fmt: formats.Format, heads: int, dim: int, rotation, shift, rounding: str,
          inv_scale=None, mul=None) -> Side:
    signs = np.tile(rotation.signs_np if rotation is not None else np.ones(dim, np.float32),
                    (heads, 1))
    if mul is not None:  # the codec's key scaling, folded into the per-channel signs
        signs = signs * mul.cpu().to(torch.float32).numpy()
    shift = (shift.cpu().to(torch.float32).contiguous().numpy() if shift is not None
             else np.zeros((heads, dim), np.float32))
    inv = (inv_scale.cpu().to(torch.float32).contiguous().numpy() if inv_scale is not None
           else np.ones(heads, np.float32))
    return Side(signs, rotation.size if rotation is not None else 0, shift,
                rounding == "lsq" and fmt.name in LSQ_TYPES, _DIVISORS.get(fmt.name, _NO_DIVISORS),
                inv, inv_scale is not None)


def sides(cache: "KVCache", layer: int) -> tuple[Side, Side]:
    """The K and V sides of one layer of ``cache``, made once per codec version: views of
    the codec's tensors, so a mean set in place later (``KVCodec.set_means``) is read as
    it is, and made again when the codec's tensors are replaced (``KVCodec.to``)."""
    per = per_version(_SIDES, cache)
    got = per.get(layer)
    if got is None:
        c = cache.codec
        shift_k, shift_v = c.stored_shift(layer) if c is not None else (None, None)
        inv_k, inv_v = c.stored_scale(layer) if c is not None else (None, None)
        got = per[layer] = (
            _side(cache.fmt_k, cache.n_kv_heads, cache.head_dim, c and c.rotation_k, shift_k,
                  c.rounding_k if c is not None else "ggml", inv_k,
                  c.key_scale(layer) if c is not None else None),
            _side(cache.fmt_v, cache.n_kv_heads, cache.v_head_dim, c and c.rotation_v, shift_v,
                  c.rounding_v if c is not None else "ggml", inv_v))
    return got


def per_version(store: weakref.WeakKeyDictionary, cache: "KVCache") -> dict:
    """``store``'s per-layer dict for ``cache``, emptied when its codec's version moved."""
    version = -1 if cache.codec is None else cache.codec.version
    got = store.get(cache)
    if got is None or got[0] != version:
        got = store[cache] = (version, {})
    return got[1]


def rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """x as the C-contiguous numpy array the writer reads."""
    return ggml.dense(x, dtype).numpy()


def plain_sides(heads: int, dim_k: int, dim_v: int) -> tuple[Side, Side]:
    """Sides that store rows as given, with ggml's rounding (a cache without a codec)."""
    return (_side(formats.get_format("f32"), heads, dim_k, None, None, "ggml"),
            _side(formats.get_format("f32"), heads, dim_v, None, None, "ggml"))


def write_arrays(k: np.ndarray, v: np.ndarray, slots: np.ndarray, kplanes: ggml.Planes,
                 vplanes: ggml.Planes, geom: ggml.Geom, coding: tuple[Side, Side]) -> int:
    """The numpy level of ``write``: ``ggml.precheck``'s code, 0 when written. Long
    writes are split over the write pool's threads once everything is checked."""
    parts = _row_parts(slots.shape[0])
    if len(parts) == 1:
        return _write(k, v, slots, kplanes, vplanes, geom, *coding, SHRINKS)
    bad = ggml.precheck(k, v, slots, geom)
    if bad:
        return bad
    arrays = (k, v, slots)
    futures = [_pool().submit(write_rows, *(a[lo:hi] for a in arrays), kplanes, vplanes, geom,
                              *coding, SHRINKS) for lo, hi in parts[1:]]
    lo, hi = parts[0]
    write_rows(*(a[lo:hi] for a in arrays), kplanes, vplanes, geom, *coding, SHRINKS)
    for f in futures:
        f.result()
    return 0


def write(cache: "KVCache", layer: int, slots: torch.Tensor, k: torch.Tensor,
          v: torch.Tensor) -> None:
    """Code and quantize k [n, Hkv, D], v [n, Hkv, Dv] (floating, CPU, the model's
    coordinates) into ``slots`` of a CPU cache, as its codec says. Raises with the cache
    unchanged on a non-finite value or a slot outside the pool."""
    k, v, slots, side_k, side_v = prepared(cache, layer, slots, k, v)
    layer = range(cache.n_layers)[layer]
    kplanes, vplanes = ggml.plane_views(cache, layer)
    rc = write_arrays(k, v, slots, kplanes, vplanes, ggml.geom(cache, layer), (side_k, side_v))
    ggml.raise_for(rc, cache)


def prepared(cache: "KVCache", layer: int, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> tuple:
    """``write``'s checks (``cache.check_rows``, then the layer), then what the writer
    kernels take: (k, v, slots) as numpy arrays and the layer's K and V sides (the
    attention job of ``kernels.cpu`` writes with them too)."""
    cache.check_rows(slots, k, v)
    layer = range(cache.n_layers)[layer]
    return (rows(k), rows(v), rows(slots, torch.int64), *sides(cache, layer))


# Long writes (prefill chunks) are split over threads: the lsq search makes coding a
# long chunk a sizeable part of a prefill on one thread (benchmarks/README.md).
PARALLEL_MIN_ROWS = 64
_POOL: list[ThreadPoolExecutor] = []
# A forked child has none of the pool's threads: start afresh, as kernels.cpu's helpers.
os.register_at_fork(after_in_child=_POOL.clear)


def _row_parts(n: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges, one per thread, for n rows (one range below PARALLEL_MIN_ROWS)."""
    if n < 2 * PARALLEL_MIN_ROWS:
        return [(0, n)]
    parts = min(torch.get_num_threads(), max(1, n // PARALLEL_MIN_ROWS))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads() - 1),
                                        thread_name_prefix="kvslim-write"))
    return _POOL[0]
