"""Least-squares block scales for the K/V cache ("lsq" rounding), same block formats.

ggml's reference quantizers take the block scale from the block's largest value
(q4_0: d = max / -8). That is never the scale of least squared error: the largest value
is rarely worth its own code, and the codes chosen by a scale are best served by the
least-squares scale for those codes, d = sum(x q) / sum(q q). Like llama.cpp's iq4_nl
(``ntry``), this tries a few scales around the max-based one, refits each, and keeps
the one of least error, counting the float16 rounding of the stored d (and m). The
ggml encoding itself is one of the candidates, so a block is never worse than ggml's.

Only d (and m for the _1 types) differ: the output is ordinary ggml blocks, decoded by
every kernel and by llama.cpp unchanged. ``formats.encode`` stays byte-exact with gguf;
this module is the cache's optional write path (``codec``).

Candidates (measured on SmolLM2's rotated K/V, relative squared error: 7 divisors come
within 1% of a 36-divisor search, at a fifth of the work): q4_0 / q5_0 divisors lo *
(1.125, 1.0625, ..., 0.75) of the signed max; q8_0 divisors 127 .. 124 of the absolute
max; q4_1 / q5_1 the [min, max] range with each end pulled in by 0, 1/4 or 1/2 of a
step, then (d, m) refitted. Errors are compared in float64 from the block's sums
(sum x^2 - 2 d sum x q + d^2 sum q^2), one pass per candidate, in both versions below.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from kvslim import formats
from kvslim.kernels import cpu
from kvslim.rotation import forward_row, rotate_kernel

__all__ = ["ROUNDINGS", "LSQ_TYPES", "encode", "supports_lsq", "symmetric_divisors",
           "affine_shrinks", "writer"]

ROUNDINGS = ("ggml", "lsq")
_SYMMETRIC = {"q4_0": (-8, 7), "q5_0": (-16, 15), "q8_0": (-127, 127)}
_AFFINE = {"q4_1": 15, "q5_1": 31}
LSQ_TYPES = tuple(_SYMMETRIC) + tuple(_AFFINE)


def supports_lsq(type: str) -> bool:
    return formats.get_format(type).name in LSQ_TYPES


def symmetric_divisors(type: str) -> list[float]:
    """Divisors c of the block's max for the candidate scales d = max / c."""
    lo, _ = _SYMMETRIC[type]
    if type == "q8_0":  # symmetric codes, unsigned max: 127 .. 124
        return [127.0 - i for i in range(4)]
    return [lo * (1.125 - i / 16) for i in range(7)]  # q4_0: -9, -8.5, ..., -6


def affine_shrinks() -> list[tuple[float, float]]:
    """(a, b): the candidate range is [min + a step, max - b step], step = (max - min) / top."""
    f = (0.0, 0.25, 0.5)
    return [(a, b) for a in f for b in f]


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _keep(best: tuple, cand: tuple) -> tuple:
    """Per block, the candidate (err, *fields) of smaller error (the first on ties)."""
    take = cand[0] < best[0]
    return tuple(torch.where(take, c, b) for b, c in zip(best, cand))


def _sums(blocks: torch.Tensor, q: torch.Tensor):
    """float64 sums over each block: (sum x q, sum q q, sum q) of codes q."""
    x, q = blocks.double(), q.double()
    return (x * q).sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), q.sum(-1, keepdim=True)


def _sym_error(sxx, d, sxq, sqq):
    """sum (x - d q)^2 from the sums, float64 (d the stored f16 value)."""
    d = d.double()
    return sxx - 2 * d * sxq + d * d * sqq


def _symmetric(blocks: torch.Tensor, type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [N, 32] -> (d [N, 1] float32 of f16 value, codes [N, 32] float in [lo, hi])."""
    lo, hi = _SYMMETRIC[type]
    sxx = (blocks.double() ** 2).sum(-1, keepdim=True)
    g = formats.encode(blocks, type)
    d0 = g["d"].float().reshape(-1, 1)
    q0 = (formats.decode(g, type).reshape(blocks.shape) / torch.where(d0 == 0, 1.0, d0)).round()
    sxq, sqq, _ = _sums(blocks, q0)
    best = (_sym_error(sxx, d0, sxq, sqq), d0, q0)
    ref = blocks.abs().amax(-1, keepdim=True) if type == "q8_0" else \
        torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    for c in symmetric_divisors(type):
        d = ref / c
        q = _round(blocks * torch.where(d == 0, 0.0, 1.0 / torch.where(d == 0, 1.0, d))).clamp(lo, hi)
        sxq, sqq, _ = _sums(blocks, q)
        d = _f16(torch.where(sqq > 0, sxq / sqq.clamp_min(1.0), 0.0).float())
        best = _keep(best, (_sym_error(sxx, d, sxq, sqq), d, q))
    return best[1], best[2]


def _aff_error(sxx, sx, d, m, sxq, sqq, sq, n):
    """sum (x - d q - m)^2 from the sums, float64."""
    d, m = d.double(), m.double()
    return sxx - 2 * d * sxq - 2 * m * sx + d * d * sqq + 2 * d * m * sq + n * m * m


def _affine(blocks: torch.Tensor, type: str):
    """blocks [N, 32] -> (d, m [N, 1] float32 of f16 values, codes [N, 32] float in [0, top])."""
    top = _AFFINE[type]
    n = float(blocks.shape[-1])
    x64 = blocks.double()
    sxx, sx = (x64 ** 2).sum(-1, keepdim=True), x64.sum(-1, keepdim=True)
    g = formats.encode(blocks, type)
    d0, m0 = g["d"].float().reshape(-1, 1), g["m"].float().reshape(-1, 1)
    q0 = ((formats.decode(g, type).reshape(blocks.shape) - m0) / torch.where(d0 == 0, 1.0, d0)).round()
    sxq, sqq, sq = _sums(blocks, q0)
    best = (_aff_error(sxx, sx, d0, m0, sxq, sqq, sq, n), d0, m0, q0)
    mn, mx = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (mx - mn) / top
    for a, b in affine_shrinks():
        lo, d = mn + a * step, (mx - b * step - (mn + a * step)) / top
        q = _round((blocks - lo) * torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)).clamp(0, top)
        sxq, sqq, sq = _sums(blocks, q)
        det = n * sqq - sq * sq
        ok = det > 0
        d = _f16(torch.where(ok, (n * sxq - sq * sx) / torch.where(ok, det, 1.0), 0.0).float())
        m = _f16(torch.where(ok, (sx - d.double() * sq) / n, mn.double()).float())
        best = _keep(best, (_aff_error(sxx, sx, d, m, sxq, sqq, sq, n), d, m, q))
    return best[1], best[2], best[3]


def _planes(type: str, d, q, m=None) -> dict[str, torch.Tensor]:
    """Codes (float, in the type's signed or unsigned range) and scales -> ggml planes."""
    fmt = formats.get_format(type)
    lo = _SYMMETRIC[type][0] if type in _SYMMETRIC else 0
    u = (q - lo).to(torch.int32)  # stored codes: q4_0 as q + 8, q5_0 as q + 16
    out = {"d": d.to(torch.float16)}
    if m is not None:
        out["m"] = m.to(torch.float16)
    if type == "q8_0":
        out["qs"] = q.to(torch.int8)
        return out
    u8 = u.to(torch.uint8)
    if any(name == "qh" for name, _, _ in fmt.planes):
        out["qh"] = formats._pack_high_bits(u8)
    out["qs"] = formats._pack_nibbles(u8 & 0x0F)
    return out


def encode(x: torch.Tensor, type: str, rounding: str = "ggml") -> dict[str, torch.Tensor]:
    """``formats.encode`` with a choice of rounding: [..., n] float -> planes [..., n/32, per].

    "ggml": formats.encode itself (byte-exact with gguf). "lsq": least-squares scales for
    the types in LSQ_TYPES (others are encoded as ggml does).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    name = formats.get_format(type).name
    if rounding == "ggml" or name not in LSQ_TYPES:
        return formats.encode(x, name)
    blocks = formats._as_blocks(x)  # float32 [N, 32]; refuses non-finite input as encode does
    if name in _SYMMETRIC:
        d, q = _symmetric(blocks, name)
        planes = _planes(name, d, q)
    else:
        d, m, q = _affine(blocks, name)
        planes = _planes(name, d, q, m)
    lead, nb = x.shape[:-1], x.shape[-1] // formats.QK
    return {k: v.reshape(*lead, nb, v.shape[-1]) for k, v in planes.items()}


def _torch_write(cache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Encode both sides (a non-finite value raises before either is stored), then store."""
    c = cache.codec
    enc = (encode(k, cache.cache_type_k, c.rounding_k), encode(v, cache.cache_type_v, c.rounding_v))
    slots = slots.to(cache.device)
    page, off = slots // cache.page_size, slots % cache.page_size
    for planes, e in zip((cache.k_planes, cache.v_planes), enc):
        for name, t in planes.items():
            t[layer][page, :, off] = e[name].to(cache.device)


# ---------------------------------------------------------------- numba (CPU)
# The same search as the torch functions above, one block at a time, writing straight
# into the cache's planes (the plane views of kernels.cpu, whose ggml encoder serves the
# sides that are not lsq). Sums run in sequence, so a scale can differ from the torch
# version's in its last bit: both are least squares, both never worse than ggml's block.

_f2h, _h2f = cpu._float_to_half, cpu._half_to_float
_F0, _F1, _FH = np.float32(0.0), np.float32(1.0), np.float32(0.5)
_DIVISORS = {t: np.array(symmetric_divisors(t), np.float32) for t in _SYMMETRIC}
_NO_DIVISORS = np.zeros(0, np.float32)
_SHRINKS = np.array(affine_shrinks(), np.float32)  # [9, 2]


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
    if code == cpu.Q8_0:
        lo, hi = np.float32(-127.0), np.float32(127.0)
        ref = _F0
        for j in range(32):
            ref = max(ref, abs(x[j]))
        d0 = ref / hi
    else:
        lo = np.float32(-8.0) if code == cpu.Q4_0 else np.float32(-16.0)
        hi = -lo - _F1
        ref = cpu._signed_absmax(x)
        d0 = ref / lo
    inv0 = cpu._inv(d0)
    sxx = 0.0
    for j in range(32):  # ggml's own codes (formats.Q*_0.encode_blocks)
        sxx += np.float64(x[j]) * x[j]
        if code == cpu.Q8_0:
            best[j] = np.float32(cpu._code(cpu._roundf(x[j] * inv0), hi))
        else:
            best[j] = np.float32(cpu._code(np.trunc(x[j] * inv0 + (-lo + _FH)), hi - lo)) + lo
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
    mn, mx = cpu._min_max(x)
    d0 = (mx - mn) / top
    inv0 = cpu._inv(d0)
    sxx, sx, sxq, sqq, sq = 0.0, 0.0, 0.0, 0.0, 0.0
    for j in range(32):
        t = np.float32(cpu._code(np.trunc((x[j] - mn) * inv0 + _FH), top))
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
def _lsq_block(code, x, blk, d, m, qh, qs, divs, shrinks, q, best):
    if code == cpu.Q4_1 or code == cpu.Q5_1:
        top = np.float32(15.0) if code == cpu.Q4_1 else np.float32(31.0)
        dd, mm = _aff_block(x, top, shrinks, q, best)
        m[blk] = _f2h(mm)
        lo = _F0
    else:
        dd, lo = _sym_block(x, code, divs, q, best)
    d[blk] = _f2h(dd)
    if code == cpu.Q8_0:
        for j in range(32):
            qs[blk * 32 + j] = np.int8(best[j])
        return
    bits = np.uint32(0)
    for j in range(16):
        a, b = np.int32(best[j] - lo), np.int32(best[j + 16] - lo)
        qs[blk * 16 + j] = (a & 15) | ((b & 15) << 4)
        bits |= np.uint32((a >> 4) & 1) << np.uint32(j)
        bits |= np.uint32((b >> 4) & 1) << np.uint32(j + 16)
    if code == cpu.Q5_0 or code == cpu.Q5_1:
        qh[blk] = bits


@njit(inline="always")
def _put_row(planes, xrow, row, nb, lsq, divs, shrinks, q, best, codes):
    """One head's row xrow [nb*32] into flat row ``row`` of a side's planes: lsq or ggml."""
    code, d, m, qh, qs, x32, x16 = planes
    for b in range(nb):
        xb = xrow[b * 32:(b + 1) * 32]
        if lsq:
            _lsq_block(code, xb, row * nb + b, d, m, qh, qs, divs, shrinks, q, best)
        else:
            cpu._encode_block(code, xb, row * nb + b, d, m, qh, qs, x32, x16, codes)


@njit(cache=True)
def _rows(x, slots, planes, geom, nb, lsq, divs, shrinks):
    layer, n_pages, n_kv, page_size = geom[0], geom[1], geom[2], geom[3]
    codes = np.empty(32, np.int32)
    q, best = np.empty(32, np.float32), np.empty(32, np.float32)
    for i in range(x.shape[0]):
        page, off = slots[i] // page_size, slots[i] % page_size
        for h in range(n_kv):
            row = ((layer * n_pages + page) * n_kv + h) * page_size + off
            _put_row(planes, x[i, h], row, nb, lsq, divs, shrinks, q, best, codes)


@njit(cache=True)
def _write(k, v, slots, kplanes, vplanes, geom, lsq_k, lsq_v, divs_k, divs_v, shrinks):
    bad = cpu._precheck(k, v, slots, geom)
    if bad:
        return bad
    _rows(k, slots, kplanes, geom, geom[4], lsq_k, divs_k, shrinks)
    _rows(v, slots, vplanes, geom, geom[5], lsq_v, divs_v, shrinks)
    return 0


@njit(cache=True)
def _coded_rows(x, slots, planes, geom, nb, signs, size, shift, lsq, divs, shrinks):
    """Rows x [n, H, D] rotated (size > 0), minus shift [H, D], encoded into their slots."""
    layer, n_pages, n_kv, page_size = geom[0], geom[1], geom[2], geom[3]
    scale = np.float32(1.0 / np.sqrt(size)) if size > 0 else _F1
    buf = np.empty(x.shape[2], np.float32)
    codes = np.empty(32, np.int32)
    q, best = np.empty(32, np.float32), np.empty(32, np.float32)
    for i in range(x.shape[0]):
        page, off = slots[i] // page_size, slots[i] % page_size
        for h in range(n_kv):
            forward_row(x[i, h], buf, signs, shift[h], size, scale)
            row = ((layer * n_pages + page) * n_kv + h) * page_size + off
            _put_row(planes, buf, row, nb, lsq, divs, shrinks, q, best, codes)


@njit(cache=True)
def _store(q, k, v, q_out, slots, kplanes, vplanes, geom, side_k, side_v, shrinks):
    """The codec's whole write in one call: q rotated into q_out, k and v coded into the
    cache (side = (signs, size, shift, lsq, divisors)). Return codes as in ``_write``."""
    bad = cpu._precheck(k, v, slots, geom)
    if bad:
        return bad
    _store_rows(q, k, v, q_out, slots, kplanes, vplanes, geom, side_k, side_v, shrinks)
    return 0


@njit(cache=True, nogil=True)
def _store_rows(q, k, v, q_out, slots, kplanes, vplanes, geom, side_k, side_v, shrinks):
    """``_store`` without the checks, for rows already checked; releases the GIL, so
    threads can code disjoint row ranges at once (their slots are distinct)."""
    signs, size = side_k[0], side_k[1]
    if size > 0:  # q by the keys' rotation, nothing subtracted
        rotate_kernel(q, q_out, signs, np.zeros((q.shape[1], q.shape[2]), np.float32), size, False)
    _coded_rows(k, slots, kplanes, geom, geom[4], signs, size, side_k[2], side_k[3], side_k[4],
                shrinks)
    _coded_rows(v, slots, vplanes, geom, geom[5], side_v[0], side_v[1], side_v[2], side_v[3],
                side_v[4], shrinks)


def can_store(cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``store_rows`` serves these rows (CPU cache, float32 rows on CPU)."""
    return (q.is_cpu and k.is_cpu and v.is_cpu and q.dtype is k.dtype is v.dtype is torch.float32
            and q.dim() == k.dim() == v.dim() == 3 and cache.device.type == "cpu")


def store_rows(cache, layer: int, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, sides) -> torch.Tensor:
    """CPU: code k, v into the cache and return the coded q, in one numba call.

    sides: ((signs, size, shift, lsq, divisors) for K, the same for V), numpy, from the
    codec (size 0: no rotation; shift zeros: no centering). q is returned as is when K
    is not rotated.
    """
    kviews, vviews = cpu._views(cache)
    q_out = torch.empty(q.shape, dtype=torch.float32) if sides[0][1] > 0 else q
    arrays = (q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), q_out.numpy(),
              slots.detach().to(torch.int64).contiguous().numpy())
    geom = cpu._geom(cache, layer)
    parts = _row_parts(slots.shape[0])
    if len(parts) == 1:
        cpu.raise_for(_store(*arrays, kviews, vviews, geom, sides[0], sides[1], _SHRINKS), cache)
        return q_out
    cpu.raise_for(cpu._precheck(arrays[1], arrays[2], arrays[4], geom), cache)  # nothing written on error
    futures = [_pool().submit(_store_rows, *(a[lo:hi] for a in arrays), kviews, vviews, geom,
                              sides[0], sides[1], _SHRINKS) for lo, hi in parts[1:]]
    lo, hi = parts[0]
    _store_rows(*(a[lo:hi] for a in arrays), kviews, vviews, geom, sides[0], sides[1], _SHRINKS)
    for f in futures:
        f.result()
    return q_out


# Long writes (prefill chunks) are split over threads: the lsq search makes coding a
# 512-row chunk a few ms per layer, a tenth of a prefill on one thread.
PARALLEL_MIN_ROWS = 64
_POOL = None


def _row_parts(n: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges, one per thread, for n rows (one range below PARALLEL_MIN_ROWS)."""
    parts = min(torch.get_num_threads(), max(1, n // PARALLEL_MIN_ROWS))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads() - 1),
                                   thread_name_prefix="kvslim-write")
    return _POOL


def side_args(cache_type: str, rotation, shift: np.ndarray, rounding: str) -> tuple:
    """``store_rows``'s per-side arguments for one layer's shift [H, D] float32."""
    signs = rotation.signs_np if rotation is not None else np.ones(shift.shape[1], np.float32)
    lsq = rounding == "lsq" and supports_lsq(cache_type)
    return (signs, rotation.size if rotation is not None else 0, shift, lsq,
            _DIVISORS.get(formats.get_format(cache_type).name, _NO_DIVISORS))


def _numba_write(cache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Both sides in one numba call; raises with the cache unchanged, as cpu.write_rows."""
    c = cache.codec
    lsq_k = c.rounding_k == "lsq" and supports_lsq(cache.cache_type_k)
    lsq_v = c.rounding_v == "lsq" and supports_lsq(cache.cache_type_v)
    kviews, vviews = cpu._views(cache)
    rc = _write(k.detach().to(torch.float32).contiguous().numpy(),
               v.detach().to(torch.float32).contiguous().numpy(),
               slots.detach().to(torch.int64).contiguous().numpy(), kviews, vviews,
               cpu._geom(cache, layer), lsq_k, lsq_v,
               _DIVISORS.get(cache.cache_type_k, _NO_DIVISORS),
               _DIVISORS.get(cache.cache_type_v, _NO_DIVISORS), _SHRINKS)
    cpu.raise_for(rc, cache)


def writer(cache):
    """``write(cache, layer, slots, k, v)`` storing rows with the cache codec's rounding:
    one numba call on CPU (both sides), the torch encoders elsewhere."""
    return _numba_write if cache.device.type == "cpu" else _torch_write
