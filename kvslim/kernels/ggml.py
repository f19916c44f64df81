"""ggml block primitives for numba kernels: f16/bf16 bits, the quantizers of one
32-value block, and the cache's planes seen as flat numpy arrays.

Shared by the cache writer (``kernels.cpu_write``) and the attention kernels
(``kernels.cpu``). The quantizers are exact float32 replicas of
``formats.*.encode_blocks`` (no fastmath: every rounding matters), so a block written
here is byte-identical to ``formats.encode``.

numba has no float16 on CPU: tiny LLVM intrinsics convert f16 <-> f32 (F16C
``vcvtph2ps`` / ``vcvtps2ph``); bf16 is its 16 bits shifted into a float32.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kvslim import formats, jit  # noqa: F401 - jit: before any kernel compiles

if TYPE_CHECKING:
    from kvslim.cache import KVCache

__all__ = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "E4M3", "E5M2",
           "CODES", "fp8_from_float", "fp8_to_float", "fp8_to_half",
           "Planes", "Geom", "plane_views", "geom", "precheck", "raise_for", "encode_block",
           "fetch_add", "load_acquire", "dense"]

# Format codes as the kernels branch on them (``formats.Format.code``).
CODES = {name: fmt.code for name, fmt in formats.FORMATS.items()}
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, E4M3, E5M2 = (
    CODES[n] for n in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
                       "fp8_e4m3", "fp8_e5m2"))

IQ4NL = np.array(formats.IQ4NL_VALUES, dtype=np.float32)
_IQ4NL_MID2 = np.array([formats.IQ4NL_VALUES[j - 1] + formats.IQ4NL_VALUES[j]
                        for j in range(1, 16)], dtype=np.float32)


class Planes(NamedTuple):
    """One side's (K or V) planes of every layer, flat; absent planes are 1-element dummies.

    A plane with e elements per block holds flat row r's block b at (r * nb + b) * e."""

    code: int  # formats.Format.code
    d: np.ndarray  # uint16 f16 bits of the block scales
    m: np.ndarray  # uint16 f16 bits of the block minimums (q4_1, q5_1)
    qh: np.ndarray  # uint32 fifth bits (q5_0, q5_1)
    qs: np.ndarray  # int8 codes
    x32: np.ndarray  # float32 values (f32)
    x16: np.ndarray  # uint16 bits (f16, bf16)


class Geom(NamedTuple):
    """Where one layer's rows lie: flat row ((layer * n_pages + page) * n_kv + h) * page_size + off."""

    layer: int
    n_pages: int
    n_kv: int
    page_size: int
    nb_k: int  # 32-value blocks per K row
    nb_v: int  # per V row
    qk: int  # values per block (32)
    tile: int  # tokens per attention tile (0 where no attention runs)


# ---------------------------------------------------------------- intrinsics

@intrinsic
def half_to_float(typingctx, bits):
    """uint16 holding f16 bits -> float32 (fpext, vcvtph2ps with F16C)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def float_to_half(typingctx, x):
    """float32 -> uint16 f16 bits, round to nearest even (fptrunc, vcvtps2ph)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(x), codegen


@intrinsic
def bits_to_float(typingctx, bits):
    """The low 32 bits of an integer -> float32 with those bits."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def float_to_bits(typingctx, x):
    """float32 -> its uint32 bits."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(x), codegen


# ---------------------------------------------------------------- one block
# Constants are float32 so numba does not promote the arithmetic to float64.

_F0, _F05, _F85, _F165 = np.float32(0.0), np.float32(0.5), np.float32(8.5), np.float32(16.5)
_F127, _FM8, _FM16, _F15, _F31, _FM127 = (np.float32(127.0), np.float32(-8.0), np.float32(-16.0),
                                          np.float32(15.0), np.float32(31.0), np.float32(-127.0))
_TINY = np.float32(1e-15)
_E4M3_F, _E5M2_F = np.float32(448.0), np.float32(57344.0)


@njit(inline="always")
def inv_or_zero(d):
    return np.float32(1.0) / d if d != _F0 else _F0


@njit(inline="always")
def code_of(t, hi):
    """MIN(hi, (int)t) as formats._code: a non-finite code becomes 0."""
    if not np.isfinite(t):
        return 0
    return np.int32(min(t, hi))


@njit(inline="always")
def roundf(x):
    a = abs(x)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return r if x > _F0 else (-r if x < _F0 else _F0)


@njit(inline="always")
def signed_absmax(x):
    best, at = np.float32(-1.0), 0
    for j in range(32):
        if abs(x[j]) > best:  # strict: the first of equal magnitudes wins, as argmax
            best, at = abs(x[j]), j
    return x[at]


@njit(inline="always")
def min_max(x):
    lo, hi = x[0], x[0]
    for j in range(1, 32):
        lo, hi = min(lo, x[j]), max(hi, x[j])
    return lo, hi


@njit(inline="always")
def put_nibbles(qs, base, codes):
    for j in range(16):  # value j low nibble, j+16 high; the int8 store wraps like a byte
        qs[base + j] = (codes[j] & 15) | ((codes[j + 16] & 15) << 4)


@njit(inline="always")
def high_bits(codes):
    bits = np.uint32(0)
    for j in range(32):
        bits |= np.uint32((codes[j] >> 4) & 1) << np.uint32(j)
    return bits


@njit
def iq4nl_block(x, codes):
    """Codes into ``codes``; returns the float32 scale (before f16 rounding)."""
    mx = signed_absmax(x)
    tiny = abs(mx) < _TINY
    d0 = np.float32(1.0) if tiny else mx / _FM127
    inv = np.float32(1.0) / d0
    sumqx, sumq2 = _F0, _F0
    for j in range(32):
        x2 = inv * x[j]
        x2 = x2 + x2
        idx = 0
        for step in (8, 4, 2, 1):
            if x2 >= _IQ4NL_MID2[idx + step - 1]:
                idx += step
        idx = 0 if tiny else idx
        codes[j] = idx
        q = IQ4NL[idx]
        wq = (x[j] * x[j]) * q
        sumqx = sumqx + wq * x[j]
        sumq2 = sumq2 + wq * q
    if tiny or not sumq2 > _F0:
        return _F0
    return sumqx / sumq2


@njit
def encode_block(p, x, blk, codes):
    """Quantize 32 float32 values x into block number ``blk`` of the flat planes ``p``."""
    code, d, m, qh, qs, x32, x16 = p.code, p.d, p.m, p.qh, p.qs, p.x32, p.x16
    if code == F32:
        for j in range(32):
            x32[blk * 32 + j] = x[j]
    elif code == F16:
        for j in range(32):
            x16[blk * 32 + j] = float_to_half(x[j])
    elif code == BF16:
        for j in range(32):
            n = np.int64(float_to_bits(x[j]))
            x16[blk * 32 + j] = np.uint16(((n + (0x7FFF + ((n >> 16) & 1))) >> 16) & 0xFFFF)
    elif code == Q8_0:
        amax = _F0
        for j in range(32):
            amax = max(amax, abs(x[j]))
        dd = amax / _F127
        inv = inv_or_zero(dd)
        d[blk] = float_to_half(dd)
        for j in range(32):
            qs[blk * 32 + j] = np.int8(code_of(roundf(x[j] * inv), _F127))
    elif code == IQ4_NL:
        d[blk] = float_to_half(iq4nl_block(x, codes))
        put_nibbles(qs, blk * 16, codes)
    elif code == E4M3 or code == E5M2:  # saturating, as formats._FP8
        top = _E4M3_F if code == E4M3 else _E5M2_F
        for j in range(32):
            qs[blk * 32 + j] = np.int8(fp8_from_float(min(max(x[j], -top), top), code))
    else:
        if code == Q4_0 or code == Q5_0:
            top = _F15 if code == Q4_0 else _F31
            dd = signed_absmax(x) / (_FM8 if code == Q4_0 else _FM16)
            lo, bias = _F0, _F85 if code == Q4_0 else _F165
        else:  # q4_1, q5_1
            top = _F15 if code == Q4_1 else _F31
            lo, hi = min_max(x)
            dd = (hi - lo) / top
            bias = _F05
            m[blk] = float_to_half(lo)
        inv = inv_or_zero(dd)
        d[blk] = float_to_half(dd)
        for j in range(32):
            codes[j] = code_of(np.trunc((x[j] - lo) * inv + bias), top) & 0xFF
        if code == Q5_0 or code == Q5_1:
            qh[blk] = high_bits(codes)
        put_nibbles(qs, blk * 16, codes)


# ---------------------------------------------------------------- fp8
# float32 -> fp8 bits exactly as torch's float8_e4m3fn / float8_e5m2 conversions: round to
# nearest even; e4m3fn saturates to +-448 (inf too: it has none), e5m2 overflows to inf;
# NaN -> 0x7F with the sign bit. Normal results round on the float32 bits (add half an
# fp8 ulp minus one, plus the kept lowest bit: ties go to even); below the smallest
# normal, adding a power of two whose float32 ulp is the fp8 subnormal step makes the
# FPU round to that step, and the low bits of the sum are the code.

_E4M3_MAX = np.uint32(0x43E00000)  # 448.0
_E5M2_INF = np.uint32(0x47700000)  # 61440.0: from here (a tie to even) up, e5m2 gives inf


@njit(inline="always")
def fp8_from_float(x, code):
    """float32 -> uint8 fp8 bits (code E4M3 or E5M2), as torch's ``.to(float8_*)``."""
    u = float_to_bits(np.float32(x))
    sign = np.uint32((u >> np.uint32(24)) & np.uint32(0x80))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint8(np.uint32(0x7F) | sign)
    if code == E4M3:
        mbits, small, magic, bias = np.uint32(20), np.uint32(121 << 23), np.uint32(141 << 23), 7
        if a > _E4M3_MAX:
            a = _E4M3_MAX
    else:
        mbits, small, magic, bias = np.uint32(21), np.uint32(113 << 23), np.uint32(134 << 23), 15
        if a >= _E5M2_INF:
            return np.uint8(np.uint32(0x7C) | sign)
    if a < small:
        s = float_to_bits(bits_to_float(a) + bits_to_float(magic))
        r = s - magic
    else:
        odd = (a >> mbits) & np.uint32(1)
        r = (a - np.uint32((127 - bias) << 23) + (np.uint32(1) << (mbits - np.uint32(1)))
             - np.uint32(1) + odd) >> mbits
    return np.uint8(r | sign)


@njit(inline="always")
def fp8_to_half(b, code):
    """uint8 fp8 bits -> (uint16 f16 bits, multiplier): value = f16 * multiplier, exact.

    e5m2 is a float16's top byte; e4m3 moves into the f16 exponent field (bias 15, so
    scaled by 2^8), its subnormals landing on f16 subnormals. The e4m3 NaN code (0x7F)
    decodes as 480 here: the cache never stores it (its writers saturate)."""
    b = np.uint16(np.uint8(b))  # int8 plane bytes too
    if code == E5M2:
        return np.uint16(b << np.uint16(8)), np.float32(1.0)
    return np.uint16(((b & np.uint16(0x80)) << np.uint16(8)) | ((b & np.uint16(0x7F)) << np.uint16(7))), \
        np.float32(256.0)


@njit(inline="always")
def fp8_to_float(b, code):
    """uint8 fp8 bits -> float32, as torch's ``.view(float8_*).float()`` (NaN codes too)."""
    b = np.uint8(b)
    if code == E4M3 and (b & np.uint8(0x7F)) == np.uint8(0x7F):
        return np.float32(np.nan) if b < np.uint8(128) else -np.float32(np.nan)
    h, mul = fp8_to_half(b, code)
    return half_to_float(h) * mul


@njit(cache=True)
def count_bad(x):
    n = 0
    for v in x.ravel():
        if not np.isfinite(v):
            n += 1
    return n


@njit(cache=True)
def precheck(k, v, slots, geom):
    """-1 if a slot is outside the pool, else the count of non-finite values in k (or else
    v): 0 means the write may go ahead. Every writer checks before writing anything."""
    capacity = geom.n_pages * geom.page_size
    for s in slots:
        if s < 0 or s >= capacity:
            return -1
    bad = count_bad(k)
    return bad if bad else count_bad(v)


def raise_for(rc: int, cache: "KVCache") -> None:
    """The exception for a ``precheck`` code (nothing was written)."""
    if rc < 0:
        raise IndexError(f"a slot is outside the pool of {cache.capacity} slots")
    if rc:
        raise ValueError(f"input holds {rc} non-finite values (NaN or inf); "
                         "the K/V cache refuses them")


# ---------------------------------------------------------------- torch glue

_DUMMY = {dt: np.zeros(1, dt) for dt in (np.uint16, np.uint32, np.int8, np.float32)}
_NP_VIEW = {"d": (torch.int16, np.uint16), "m": (torch.int16, np.uint16),
            "qh": (torch.int32, np.uint32), "qs": (torch.int8, np.int8)}
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GEOMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> {(layer, tile): Geom}


def _flat(t: torch.Tensor, tdt: torch.dtype, ndt) -> np.ndarray:
    """A flat numpy view (shared memory) of a contiguous plane, reinterpreted."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(tdt).reshape(-1).numpy().view(ndt)


def _side(fmt: formats.Format, planes: dict[str, torch.Tensor]) -> Planes:
    """The kernels' view of one side's planes {name: [..., per_block]}."""
    got = {name: _flat(planes[name], *_NP_VIEW[name]) for name in planes if name in _NP_VIEW}
    x32, x16 = _DUMMY[np.float32], _DUMMY[np.uint16]
    if "x" in planes:
        if fmt.code == F32:
            x32 = _flat(planes["x"], torch.float32, np.float32)
        else:
            x16 = _flat(planes["x"], torch.int16, np.uint16)
    return Planes(fmt.code, got.get("d", _DUMMY[np.uint16]), got.get("m", _DUMMY[np.uint16]),
                  got.get("qh", _DUMMY[np.uint32]), got.get("qs", _DUMMY[np.int8]), x32, x16)


def dense(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x as a C-contiguous tensor of ``dtype`` that numpy can view: x itself when it is
    one already (a decode step's kernels take microseconds, so the glue around them
    counts), else a detached copy."""
    if x.dtype is dtype and not x.requires_grad and x.is_contiguous():
        return x
    return x.detach().to(dtype).contiguous()


def plane_views(cache: "KVCache", layer: int = 0) -> tuple[Planes, Planes]:
    """Numpy views of the K and V planes of a CPU cache's group holding ``layer`` (all
    the group's layers: ``geom`` places one in them), made once per group and again when
    the group's planes are replaced (``Group.grow`` makes new dicts of new tensors; the
    entry holds the old dicts, so their ids cannot be reused while it is compared)."""
    group, _ = cache.group_of(layer)
    per = _VIEWS.setdefault(cache, {})
    got = per.get(id(group))
    if got is None or got[0] is not group.k_planes or got[1] is not group.v_planes:
        got = per[id(group)] = (group.k_planes, group.v_planes, _side(cache.fmt_k, group.k_planes),
                                _side(cache.fmt_v, group.v_planes))
    return got[2], got[3]


def geom(cache: "KVCache", layer: int, tile: int = 0) -> Geom:
    """Where ``layer`` sits in its group's planes, made once per (layer, tile) and again
    when the group grows (every decode layer asks twice: the write and the attention)."""
    per = _GEOMS.setdefault(cache, {})
    got = per.get((layer, tile))
    group, local = cache.group_of(layer)  # IndexError out of range, as tensor indexing
    if got is None or got.n_pages != group.n_pages or got.layer != local:
        got = per[(layer, tile)] = Geom(local, group.n_pages, cache.n_kv_heads, cache.page_size,
                                        cache.head_dim // formats.QK,
                                        cache.v_head_dim // formats.QK, formats.QK, tile)
    return got


def tiny_planes(type: str, page_size: int) -> Planes:
    """The planes of a one-layer, one-page, one-head pool of 32-value rows (warmups)."""
    fmt = formats.get_format(type)
    return _side(fmt, {name: torch.zeros(1, 1, 1, page_size, 1, n, dtype=dt)
                       for name, dt, n in fmt.planes})


# ---------------------------------------------------------------- work claiming
# The CPU kernels' threads (attention, quantized matmuls) claim work items from an int64
# counter array: these two atomics are all they share.

_I64 = ir.IntType(64)


@intrinsic
def fetch_add(typingctx, counters, slot):
    """counters[slot] += 1 atomically; returns the value before (claims a work item)."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        base = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(base, [args[1]])
        return builder.atomic_rmw("add", ptr, ir.Constant(_I64, 1), "seq_cst")
    return types.int64(counters, slot), codegen


@intrinsic
def load_acquire(typingctx, counters, slot):
    """counters[slot], read atomically (a plain load could be hoisted out of a wait loop)."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        base = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load_atomic(builder.gep(base, [args[1]]), "acquire", 8)
    return types.int64(counters, slot), codegen
