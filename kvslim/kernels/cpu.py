"""Fused CPU attention that reads the stored ggml blocks directly (numba + llvmlite).

Decode rows, and chunks of at most ``NUMBA_MAX_Q`` rows per sequence, run one numba
kernel over (sequence x kv head x split-K chunk) work items merged by log-sum-exp; the
calling thread and helper threads claim the items from an atomic counter. Each item
walks its tokens in tiles (a few dozen tokens, never crossing a page) with an online
softmax, and handles all g = Hq/Hkv query heads (times the chunk's
rows) of its kv head together, so each stored byte is read once per step.
On a sliding-window layer each query row sees only its last ``window`` keys (a
sequence's items start at its first row's window, so a decode step reads the window
whatever the context) and scores can be soft-capped before the softmax (Gemma 2).

The two products of a tile, scores = q K^T and out += p V, are small vector
microkernels written in LLVM IR (llvmlite intrinsics). They read f32, f16, bf16, q8_0,
q4_0, fp8_e4m3 and fp8_e5m2 blocks in place and dequantize them in registers; q4_1, q5_0, q5_1 and iq4_nl
are first dequantized into a float tile of ~16 KiB that stays in L1. No float copy of
a sequence is ever made. Longer chunks (prefill) go to ``kernels.tiled``, whose flash
GEMMs win there.

One compiled kernel serves all 81 K/V type pairs: the kernel branches per tile on the
type's ``formats.Format.code``, so a first call compiles one function, not a version
per pair, and ``cache=True`` keeps it on disk (benchmarks/README.md has the cost).

The query stays float32. Quantizing it to q8_0 for an integer dot product, as
llama.cpp does, moves scores by ~1e-3 relative, past the 1e-4 error budget; and with
GQA the dequantization it would save is shared by the g query heads anyway.

The cache writes of this backend are ``kernels.cpu_write``'s; the ggml block
primitives both use are in ``kernels.ggml``. ``Backend.write_attend`` runs a step's write
and its attention as one job (the first thread in writes the rows, checked first, then
every thread takes items): in a decode layer that is one call between the matmuls, not
two, and each such call costs tens of microseconds of dispatch on a cold cache. Steps
with long chunks write first with ``cpu_write``'s threaded writer.
"""
from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kvslim import formats, jit  # noqa: F401 - jit: before any kernel compiles
from kvslim.kernels import cpu_write, ggml, threads, tiled
from kvslim.kernels.ggml import fetch_add, load_acquire
from kvslim.rotation import butterfly
from kvslim.kernels.ggml import (BF16, E4M3, E5M2, F16, F32, IQ4NL, Q4_0, Q4_1, Q5_0, Q5_1,
                                 Q8_0, bits_to_float, count_bad, half_to_float)

if TYPE_CHECKING:
    from kvslim.attention import Step
    from kvslim.cache import KVCache

__all__ = ["Backend", "attention", "available", "plan_work", "warmup", "NUMBA_MAX_Q"]

# tokens per online-softmax step x head_dim (a float tile is 16 KiB); the token count is a
# multiple of 4, the microkernels' step
TILE_FLOATS = 4096
# Query rows per sequence up to which a chunk runs here rather than in the tiled path,
# which decodes the whole context through torch on every call (benchmarks/README.md:
# where numba stops winning).
NUMBA_MAX_Q = 32
MIN_CHUNK = 256  # tokens: smaller split-K chunks cost more in merging than they balance
CHUNKS_PER_THREAD = 4

# fastmath without nnan/ninf: the kernel relies on exact infinity and NaN semantics
# nowhere, but a non-finite value must still propagate rather than be assumed away.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}

_NEG = np.float32(-1e30)  # "no score yet": finite, so exp(_NEG - m) is 0 without inf math


# ---------------------------------------------------------------- llvm helpers


def _data_ptr(context, builder, arrty, arr, idx):
    """Pointer to arr[idx] (no bounds or wraparound: callers pass valid uint64 offsets)."""
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx])


def _splat(builder, x, n: int):
    vt = ir.VectorType(x.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _store16(builder, ptr, k: int, vec):
    """Store a <16 x float> at ptr + k floats."""
    at = builder.gep(ptr, [ir.Constant(ir.IntType(64), k)])
    builder.store(vec, builder.bitcast(at, vec.type.as_pointer()), align=4)


def _load_bytes(builder, ptr, k: int):
    """The <16 x i8> at ptr + k."""
    at = builder.gep(ptr, [ir.Constant(ir.IntType(64), k)])
    return builder.load(builder.bitcast(at, ir.VectorType(ir.IntType(8), 16).as_pointer()),
                        align=1)


def _block_sig(out, qs, *rest):
    ok = (isinstance(out, types.Array) and out.dtype == types.float32 and out.ndim == 1
          and isinstance(qs, types.Array) and qs.dtype == types.int8 and qs.ndim == 1)
    return ok and all(r in (types.uint64, types.float32, types.uint32) for r in rest)


_V16F = ir.VectorType(ir.FloatType(), 16)
_V16I = ir.VectorType(ir.IntType(32), 16)


def _nibbles(builder, src):
    """The two <16 x i32> halves of a 4-bit block: low nibbles (values 0..15 of the block),
    high nibbles (values 16..31)."""
    b = builder.zext(_load_bytes(builder, src, 0), _V16I)
    return (builder.and_(b, ir.Constant(_V16I, [15] * 16)),
            builder.lshr(b, ir.Constant(_V16I, [4] * 16)))


def _store_affine(builder, dst, halves, s, lo):
    """dst[0:32] = s * halves + lo."""
    sv, lv = _splat(builder, s, 16), _splat(builder, lo, 16)
    for k, h in zip((0, 16), halves):
        y = builder.fmul(builder.sitofp(h, _V16F), sv, flags=["fast"])
        _store16(builder, dst, k, builder.fadd(y, lv, flags=["fast"]))


@intrinsic
def _q4_block(typingctx, out, o, qs, base, s, lo):
    """out[o:o+32] = s * nibbles(qs[base:base+16]) + lo (q4_0: lo = -8s; q4_1: lo = m)."""
    if not _block_sig(out, qs, o, base, s, lo):
        return None

    def codegen(context, builder, sig, args):
        dst = _data_ptr(context, builder, sig.args[0], args[0], args[1])
        src = _data_ptr(context, builder, sig.args[2], args[2], args[3])
        _store_affine(builder, dst, _nibbles(builder, src), args[4], args[5])
        return context.get_dummy_value()
    return types.void(out, o, qs, base, s, lo), codegen


@intrinsic
def _q5_block(typingctx, out, o, qs, base, hb, s, lo):
    """As _q4_block with bit j of hb (ggml's qh, little-endian u32) as bit 4 of value j."""
    if not _block_sig(out, qs, o, base, hb, s, lo):
        return None

    def codegen(context, builder, sig, args):
        dst = _data_ptr(context, builder, sig.args[0], args[0], args[1])
        src = _data_ptr(context, builder, sig.args[2], args[2], args[3])
        bits = _splat(builder, args[4], 16)
        one = ir.Constant(_V16I, [1] * 16)
        halves = []
        for k, h in zip((0, 16), _nibbles(builder, src)):
            top = builder.lshr(bits, ir.Constant(_V16I, list(range(k, k + 16))))
            top = builder.shl(builder.and_(top, one), ir.Constant(_V16I, [4] * 16))
            halves.append(builder.or_(h, top))
        _store_affine(builder, dst, halves, args[5], args[6])
        return context.get_dummy_value()
    return types.void(out, o, qs, base, hb, s, lo), codegen


# ---------------------------------------------------------------- tile microkernels
# Scores and the weighted sum of V are small matrix products per tile, written as
# 16-lane vector code that reads the stored blocks itself: a row's accumulators stay in
# registers across a loop and a block is dequantized once into registers and used by
# every query vector. (numba's loop vectorizer only vectorizes innermost loops, which
# forces a load and store of an accumulator per token or a horizontal sum per score,
# and dequantizing into a scratch tile first costs a store and reload per value.) LLVM
# splits <16 x float> into what the machine has (2 x AVX2, 4 x NEON).

_I64 = ir.IntType(64)
_V4F = ir.VectorType(ir.FloatType(), 4)
_V8F = ir.VectorType(ir.FloatType(), 8)
_V16H = ir.VectorType(ir.HalfType(), 16)
_V16S = ir.VectorType(ir.IntType(16), 16)


def _const(k: int):
    return ir.Constant(_I64, k)


def _vec_load(builder, ptr, off, vt=_V16F):
    return builder.load(builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer()), align=1)


def _fma(builder, slot, x, y):
    """*slot += x * y (contracted to an FMA)."""
    prod = builder.fmul(x, y, flags=["fast"])
    builder.store(builder.fadd(builder.load(slot), prod, flags=["fast"]), slot)


def _fold(builder, a, b, lo, hi):
    mask = [ir.Constant(ir.VectorType(ir.IntType(32), len(m)), m) for m in (lo, hi)]
    return builder.fadd(builder.shuffle_vector(a, b, mask[0]), builder.shuffle_vector(a, b, mask[1]),
                        flags=["fast"])


def _sum4(builder, v):
    """Four <16 x float> -> the <4 x float> of their sums: a transpose-add tree, 15 ops
    where four separate horizontal sums take 32."""
    halves = (list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32)))
    u, w = _fold(builder, v[0], v[1], *halves), _fold(builder, v[2], v[3], *halves)
    quarters = [j for b in range(0, 32, 8) for j in range(b, b + 4)]
    x = _fold(builder, u, w, quarters, [j + 4 for j in quarters])
    y = _fold(builder, x, x, [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])
    return _fold(builder, y, y, [0, 2, 4, 6], [1, 3, 5, 7])


def _eights(builder, halves):
    """Two <16 x float> -> four <8 x float> (values 0-7, 8-15, 16-23, 24-31)."""
    out = []
    for h in halves:
        for lo in (0, 8):
            out.append(builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(ir.IntType(32), 8),
                                                                  list(range(lo, lo + 8)))))
    return out


def _sum4x8(builder, v):
    """Four <8 x float> -> the <4 x float> of their sums (a transpose-add tree)."""
    u = _fold(builder, v[0], v[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
    w = _fold(builder, v[2], v[3], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
    x = _fold(builder, u, w, [0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])
    return _fold(builder, x, x, [0, 2, 4, 6], [1, 3, 5, 7])


class _Rows:
    """How a microkernel finds block b of stored row ``row`` for one format: the two
    <16 x float> halves (values 0..15, 16..31). Tile-local token t has its scale at
    sc[t*nb + b] (converted from f16 beforehand)."""

    def __init__(self, fmt: int, context, builder, sig, args, first: int):
        # args[first:] = x32, x16, xi8, sc, row0, nb
        ptr = [_data_ptr(context, builder, sig.args[first + i], args[first + i], _const(0))
               for i in range(4)]
        self.fmt, self.b = fmt, builder
        self.x32, self.x16, self.xi8, self.sc = ptr
        self.row0, self.nb = args[first + 4], args[first + 5]

    def block(self, t, b, halves=(0, 16)):
        """The <16 x float> halves of block b of tile token t: values 0..15 (0) and
        16..31 (16), or those of ``halves`` only."""
        bld = self.b
        blk = bld.add(bld.mul(bld.add(self.row0, t), self.nb), b)
        if self.fmt == F32:
            return [_vec_load(bld, self.x32, bld.add(bld.mul(blk, _const(32)), _const(k)))
                    for k in halves]
        if self.fmt in (F16, BF16):
            raw = [_vec_load(bld, self.x16, bld.add(bld.mul(blk, _const(32)), _const(k)), _V16S)
                   for k in halves]
            if self.fmt == F16:
                return [bld.fpext(bld.bitcast(r, _V16H), _V16F) for r in raw]
            return [bld.bitcast(bld.shl(bld.zext(r, _V16I), ir.Constant(_V16I, [16] * 16)),
                                _V16F) for r in raw]
        vi8 = ir.VectorType(ir.IntType(8), 16)
        if self.fmt in (E4M3, E5M2):
            return self._fp8(blk, vi8, halves)
        s = bld.load(bld.gep(self.sc, [bld.add(bld.mul(t, self.nb), b)]))
        scale = _splat(bld, s, 16)
        if self.fmt == Q8_0:
            codes = [bld.sitofp(_vec_load(bld, self.xi8, bld.add(bld.mul(blk, _const(32)),
                                                                  _const(k)), vi8), _V16F)
                     for k in halves]
        else:  # q4_0: value j in the low nibble of byte j, j+16 in the high one; minus 8
            byte = bld.zext(_vec_load(bld, self.xi8, bld.mul(blk, _const(16)), vi8), _V16I)
            nib = {0: bld.and_(byte, ir.Constant(_V16I, [15] * 16)),
                   16: bld.lshr(byte, ir.Constant(_V16I, [4] * 16))}
            codes = [bld.sitofp(bld.sub(nib[k], ir.Constant(_V16I, [8] * 16)), _V16F)
                     for k in halves]
        return [bld.fmul(c, scale, flags=["fast"]) for c in codes]

    def _fp8(self, blk, vi8, halves):
        """fp8 bytes -> float via float16, as ggml.fp8_to_half: e5m2 is an f16's top byte,
        e4m3's exponent and mantissa move into f16's fields and the value is scaled by 2^8."""
        bld = self.b
        c16 = lambda k: ir.Constant(_V16S, [k] * 16)  # noqa: E731
        out = []
        for k in halves:
            raw = bld.zext(_vec_load(bld, self.xi8, bld.add(bld.mul(blk, _const(32)), _const(k)),
                                     vi8), _V16S)
            if self.fmt == E5M2:
                h = bld.shl(raw, c16(8))
            else:
                h = bld.or_(bld.shl(bld.and_(raw, c16(0x80)), c16(8)),
                            bld.shl(bld.and_(raw, c16(0x7F)), c16(7)))
            x = bld.fpext(bld.bitcast(h, _V16H), _V16F)
            if self.fmt == E4M3:
                x = bld.fmul(x, ir.Constant(_V16F, [256.0] * 16), flags=["fast"])
            out.append(x)
        return out


def _switch_rows(builder, nrows, emit):
    """Run emit(n) for the runtime row count n in 1..4."""
    end = builder.append_basic_block("rows.end")
    sw = builder.switch(nrows, end)
    for n in (1, 2, 3, 4):
        case = builder.append_basic_block(f"rows.{n}")
        sw.add_case(ir.Constant(nrows.type, n), case)
        builder.position_at_end(case)
        emit(n)
        builder.branch(end)
    builder.position_at_end(end)


def _direct_sig(*args):
    """(float32 arrays..., x32, x16, xi8, sc arrays, row0, nb) of a microkernel."""
    return (all(isinstance(a, types.Array) and a.ndim == 1 for a in args[-6:-2])
            and args[-6].dtype == types.float32 and args[-5].dtype == types.uint16
            and args[-4].dtype == types.int8 and args[-3].dtype == types.float32)


def _make_qk(fmt: int):
    """Intrinsic: scores of up to 4 query vectors x 4 tokens of one format."""
    @intrinsic
    def qk(typingctx, qv, qo, nrows, t0, ntok, p, po, TL, x32, x16, xi8, sc, row0, nb):
        """p[po + r*TL + t0 + i] = qv[qo + r*D :+D] . row(t0 + i) for r < nrows, i < 4, where
        rows past ntok repeat the last one (so a tile's tail never reads past its page)."""
        if not _direct_sig(qv, qo, nrows, t0, ntok, p, po, TL, x32, x16, xi8, sc, row0, nb):
            return None

        def codegen(context, builder, sig, args):
            qv_, qo_, nrows_, t0_, ntok_, p_, po_, tl = args[:8]
            rows = _Rows(fmt, context, builder, sig, args, 8)
            q = _data_ptr(context, builder, sig.args[0], qv_, qo_)
            out = _data_ptr(context, builder, sig.args[5], p_, builder.add(po_, t0_))
            d = builder.mul(rows.nb, _const(32))
            last = builder.sub(ntok_, _const(1))
            toks = [builder.add(t0_, builder.select(
                builder.icmp_unsigned("<", _const(i), ntok_), _const(i), last))
                for i in range(4)]

            def emit(n):
                # one <8 x float> accumulator per (query row, token): 16 at most, the ymm
                # registers of AVX2 (16-wide ones took 32 and spilled)
                zero = ir.Constant(_V8F, [0.0] * 8)
                acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)]
                       for _ in range(n)]
                with cgutils.for_range(builder, rows.nb) as loop:
                    b = loop.index
                    ks = [_eights(builder, rows.block(t, b)) for t in toks]
                    for r in range(n):
                        at = builder.add(builder.mul(d, _const(r)), builder.mul(b, _const(32)))
                        xs = [_vec_load(builder, q, builder.add(at, _const(k)), _V8F)
                              for k in (0, 8, 16, 24)]
                        for i in range(4):
                            for x, k in zip(xs, ks[i]):
                                _fma(builder, acc[r][i], x, k)
                for r in range(n):
                    sums = _sum4x8(builder, [builder.load(a) for a in acc[r]])
                    at = builder.gep(out, [builder.mul(tl, _const(r))])
                    builder.store(sums, builder.bitcast(at, _V4F.as_pointer()), align=4)
            _switch_rows(builder, nrows_, emit)
            return context.get_dummy_value()
        return types.void(qv, qo, nrows, t0, ntok, p, po, TL, x32, x16, xi8, sc, row0, nb), codegen
    return qk


def _make_pv(fmt: int):
    """Intrinsic: the weighted sum of a tile's V rows into up to 4 accumulators."""
    @intrinsic
    def pv(typingctx, p, po, TL, T, acc, ao, nrows, x32, x16, xi8, sc, row0, nb):
        """acc[ao + r*Dv + j] += sum_{t<T} p[po + r*TL + t] * row(t)[j] for r < nrows: each
        block of the rows stays in registers over the tile's tokens."""
        if not _direct_sig(p, po, TL, T, acc, ao, nrows, x32, x16, xi8, sc, row0, nb):
            return None

        def codegen(context, builder, sig, args):
            p_, po_, tl, T_, acc_, ao_, nrows_ = args[:7]
            rows = _Rows(fmt, context, builder, sig, args, 7)
            w = _data_ptr(context, builder, sig.args[0], p_, po_)
            a = _data_ptr(context, builder, sig.args[4], acc_, ao_)
            dv = builder.mul(rows.nb, _const(32))

            def emit(n):
                # a half block (16 values) at a time: 4 rows' accumulators are then 8 ymm
                # registers, not 16 (with the tile's values and weights, past AVX2's 16)
                with cgutils.for_range(builder, rows.nb) as loop:
                    for k in (0, 16):
                        base = builder.add(builder.mul(loop.index, _const(32)), _const(k))
                        at = [builder.bitcast(builder.gep(a, [builder.add(
                            builder.mul(dv, _const(r)), base)]), _V16F.as_pointer())
                            for r in range(n)]
                        slots = [cgutils.alloca_once_value(builder, builder.load(x, align=4))
                                 for x in at]
                        with cgutils.for_range(builder, T_) as tok:
                            t = tok.index
                            vs = rows.block(t, loop.index, (k,))[0]
                            for r in range(n):
                                wt = builder.load(builder.gep(w, [builder.add(
                                    builder.mul(tl, _const(r)), t)]))
                                _fma(builder, slots[r], _splat(builder, wt, 16), vs)
                        for r in range(n):
                            builder.store(builder.load(slots[r]), at[r], align=4)
            _switch_rows(builder, nrows_, emit)
            return context.get_dummy_value()
        return types.void(p, po, TL, T, acc, ao, nrows, x32, x16, xi8, sc, row0, nb), codegen
    return pv


@intrinsic
def _prefetch(typingctx, arr, first, count):
    """Ask for arr[first : first + count] in L2 (prefetcht1 per 64-byte line): into L1 a
    whole tile evicts the one being computed (slower decode, benchmarks/README.md)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        start = builder.bitcast(_data_ptr(context, builder, sig.args[0], args[0], args[1]), i8p)
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        lines = builder.udiv(builder.add(builder.mul(args[2], _const(itemsize)), _const(63)),
                             _const(64))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0")
        with cgutils.for_range(builder, lines) as loop:
            at = builder.gep(start, [builder.mul(loop.index, _const(64))])
            builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, first, count), codegen


# Formats read in place; the others are dequantized into a float32 tile first (_load_tile)
# and read as F32 from there.
_qk_f32, _qk_f16, _qk_bf16, _qk_q8, _qk_q4 = (_make_qk(f) for f in (F32, F16, BF16, Q8_0, Q4_0))
_pv_f32, _pv_f16, _pv_bf16, _pv_q8, _pv_q4 = (_make_pv(f) for f in (F32, F16, BF16, Q8_0, Q4_0))
_qk_e4m3, _qk_e5m2, _pv_e4m3, _pv_e5m2 = (_make_qk(E4M3), _make_qk(E5M2), _make_pv(E4M3),
                                          _make_pv(E5M2))


# ---------------------------------------------------------------- exp

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))


@njit(inline="always", fastmath=_FAST)
def _exp(x):
    """exp(x) for float32 x <= 0 (Cephes expf, ~1 ulp). libm's expf does not vectorize
    here (no SVML), and np.floor on a scalar is an out-of-line ufunc call in numba."""
    x = max(x, _EXP_MIN)
    k = np.int32(x * _LOG2E - _HALF)  # for x <= 0 truncation rounds to nearest
    n = np.float32(k)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * (r * r) + r + _ONE
    return p * bits_to_float((k + np.int32(127)) << np.int32(23))


_T0, _T1, _T2, _T3, _T4 = (np.float32(c) for c in (
    -5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
    -3.33332819422e-1))
_TANH_SMALL = np.float32(0.625)
_TWO = np.float32(2.0)


@njit(inline="always", fastmath=_FAST)
def _tanh(x):
    """tanh(x) for float32 (Cephes tanhf, a few ulp): an odd polynomial below 0.625, where
    1 - exp(-2|x|) would cancel, and (1 - e) / (1 + e) with e = exp(-2|x|) above it; both
    are computed, so the select vectorizes (libm's tanhf is a call per score)."""
    a = abs(x)
    z = x * x
    small = ((((_T0 * z + _T1) * z + _T2) * z + _T3) * z + _T4) * z * x + x
    e = _exp(-_TWO * a)
    big = (_ONE - e) / (_ONE + e)
    big = big if x >= 0 else -big
    return small if a < _TANH_SMALL else big


# ---------------------------------------------------------------- tile loader
# Vectorization notes (checked in the assembly): numba wraps negative signed indexes,
# which turns every vector load into 16 scalar ones, so hot loops index with uint64;
# a loop with the constant trip count 32 is fully unrolled before LLVM's loop
# vectorizer runs and the unrolled code cannot be SLP-vectorized (numba arrays may
# alias), so per-block work is an intrinsic and block lengths are the runtime ``qk``.

_U0, _U1, _U2, _U3, _U4 = (np.uint64(i) for i in range(5))
_U16, _U32 = np.uint64(16), np.uint64(32)
_M15, _S4 = np.int32(15), np.int32(4)


@njit(fastmath=_FAST, cache=True)
def _load_scales(d, row0, T, nb, sc):
    """sc[:T*nb] = the f16 block scales of rows row0.. (contiguous), as float32.

    One vector loop: converting one scalar at a time merges into the previous vector
    register (vpinsrw), a dependency chain through every row.
    """
    for b in range(T * nb):
        sc[b] = half_to_float(d[row0 * nb + b])


@njit(inline="always")
def _prefetch_rows(code, d, m, qh, qs, x32, x16, row0, T, nb):
    """Prefetch the planes of T stored rows from row0 (the next tile), so the DRAM reads
    overlap the current tile's arithmetic: without it a decode step took twice as long
    from DRAM as from cache, one miss after another."""
    n = T * nb
    if code == F32:
        _prefetch(x32, row0 * nb * _U32, n * _U32)
    elif code == F16 or code == BF16:
        _prefetch(x16, row0 * nb * _U32, n * _U32)
    elif code == E4M3 or code == E5M2:
        _prefetch(qs, row0 * nb * _U32, n * _U32)
    else:
        _prefetch(d, row0 * nb, n)
        if code == Q4_1 or code == Q5_1:
            _prefetch(m, row0 * nb, n)
        if code == Q5_0 or code == Q5_1:
            _prefetch(qh, row0 * nb, n)
        per = _U32 if code == Q8_0 else _U16
        _prefetch(qs, row0 * nb * per, n * per)


@njit(fastmath=_FAST, cache=True)
def _load_tile(code, d, m, qh, qs, row0, T, nb, qk, out, sc, lo):
    """Dequantize the T stored rows row0.. of a q4_1, q5_0, q5_1 or iq4_nl plane set into
    out[:T*nb*qk] (the formats the microkernels do not read in place); uint64 indexes.

    Planes are flat: a plane with e elements per block holds row r's block b at
    (r*nb + b)*e. sc, lo: float32 scratch of T*nb.
    """
    nblk, blk0 = T * nb, row0 * nb
    _load_scales(d, row0, T, nb, sc)
    if code == Q4_1 or code == Q5_1:
        for b in range(nblk):
            lo[b] = half_to_float(m[blk0 + b])
    else:
        for b in range(nblk):
            lo[b] = np.float32(-16.0) * sc[b]
    half = qk >> _U1
    if code == Q4_1:
        for b in range(nblk):
            _q4_block(out, b * qk, qs, (blk0 + b) * half, sc[b], lo[b])
    elif code == Q5_0 or code == Q5_1:
        for b in range(nblk):
            _q5_block(out, b * qk, qs, (blk0 + b) * half, np.uint32(qh[blk0 + b]), sc[b], lo[b])
    else:  # iq4_nl: a codebook lookup, which generic vector code cannot express
        for b in range(nblk):
            base, ob = (blk0 + b) * half, b * qk
            for j in range(half):
                v = np.int32(np.uint8(qs[base + j]))
                out[ob + j] = sc[b] * IQ4NL[v & _M15]
                out[ob + half + j] = sc[b] * IQ4NL[v >> _S4]


# ---------------------------------------------------------------- attention kernel

@njit(fastmath=_FAST, cache=True)
def _scores(fmt, qv, D, R, T, p, TL, x32, x16, xi8, sc, row0, nb):
    """p[r*TL + t] = qv[r] . K row t, for r < R and t < T (rounded up to 4; the extra
    scores are never read), K read in place in format fmt (F32 for a dequantized tile)."""
    t = _U0
    while t < T:
        ntok = min(_U4, T - t)
        r = _U0
        while r < R:
            n = min(_U4, R - r)
            if fmt == F16:
                _qk_f16(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            elif fmt == BF16:
                _qk_bf16(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            elif fmt == Q8_0:
                _qk_q8(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            elif fmt == Q4_0:
                _qk_q4(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            elif fmt == E4M3:
                _qk_e4m3(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            elif fmt == E5M2:
                _qk_e5m2(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            else:
                _qk_f32(qv, r * D, n, t, ntok, p, r * TL, TL, x32, x16, xi8, sc, row0, nb)
            r += n
        t += _U4


@njit(fastmath=_FAST, cache=True)
def _accumulate(fmt, p, TL, T, acc, Dv, R, x32, x16, xi8, sc, row0, nb):
    """acc[r] += sum_t p[r*TL + t] * V row t for r < R, t < T (V read as in _scores)."""
    r = _U0
    while r < R:
        n = min(_U4, R - r)
        if fmt == F16:
            _pv_f16(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        elif fmt == BF16:
            _pv_bf16(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        elif fmt == Q8_0:
            _pv_q8(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        elif fmt == Q4_0:
            _pv_q4(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        elif fmt == E4M3:
            _pv_e4m3(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        elif fmt == E5M2:
            _pv_e5m2(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        else:
            _pv_f32(p, r * TL, TL, T, acc, r * Dv, n, x32, x16, xi8, sc, row0, nb)
        r += n


@njit(inline="always")
def _prepare(code, d, m, qh, qs, x32, row0, T, nb, qk, tile, sc, lo):
    """Make a tile readable by the microkernels: (format, float32 source, first row)."""
    if code == F32 or code == F16 or code == BF16 or code == E4M3 or code == E5M2:
        return code, x32, row0
    if code == Q8_0 or code == Q4_0:
        _load_scales(d, row0, T, nb, sc)
        return code, x32, row0
    _load_tile(code, d, m, qh, qs, row0, T, nb, qk, tile, sc, lo)
    return F32, tile, _U0


@njit(fastmath=_FAST, cache=True)
def _softmax_step(p, acc, mx, den, first, vis, R, T, Dv, TL, cap):
    """Scores -> weights for one tile: row r sees its tokens first[r] .. vis[r] - 1 (both
    clipped to [0, T]; a window's start and the causal end), soft-capped first when cap is
    positive; rescales acc once per tile when the running max grows."""
    for r in range(R):
        po = r * TL
        a, n = first[r], vis[r]
        if cap > 0:
            for t in range(a, n):
                p[po + t] = cap * _tanh(p[po + t] / cap)
        mt = mx[r]
        for t in range(a, n):
            mt = max(mt, p[po + t])
        corr = _exp(mx[r] - mt)
        tot = np.float32(0.0)
        for t in range(a):
            p[po + t] = 0.0
        for t in range(a, n):
            e = _exp(p[po + t] - mt)
            p[po + t] = e
            tot += e
        for t in range(n, T):
            p[po + t] = 0.0
        den[r] = den[r] * corr + tot
        mx[r] = mt
        if corr != 1.0:
            for j in range(Dv):
                acc[r * Dv + j] *= corr


@njit(inline="always")
def _tile_at(b, h, t, t1, geom, pages):
    """First stored row (uint64) and token count of the tile at token t of item (b, h):
    at most geom.tile tokens, within one page and before t1."""
    page_size = geom.page_size
    pi = t // page_size
    off = t - pi * page_size
    T = min(geom.tile, page_size - off, t1 - t)
    return np.uint64(((geom.layer * geom.n_pages + pages[b, pi]) * geom.n_kv + h) * page_size
                     + off), T


@njit(fastmath=_FAST, cache=True)
def _attend_chunk(w, q, scale, cap, kplanes, vplanes, geom, job):
    """Online softmax of work item w = (b, h, t0, t1) into job.part_acc[w], job.part_ml[w];
    scores soft-capped by cap (0: none), keys limited to job.window per query (0: none)."""
    kcode, kd, km, kqh, kqs, kx32, kx16 = kplanes
    vcode, vd, vm, vqh, vqs, vx32, vx16 = vplanes
    n_kv, TL, pages, q_off = geom.n_kv, geom.tile, job.pages, job.q_off
    nbk, nbv, qk = np.uint64(geom.nb_k), np.uint64(geom.nb_v), np.uint64(geom.qk)
    b, h, t0, t1 = job.work[w, 0], job.work[w, 1], job.work[w, 2], job.work[w, 3]
    g = q.shape[1] // n_kv
    D, Dv = nbk * qk, nbv * qk
    nq, L = job.q_lens[b], job.kv_lens[b]
    R = nq * g  # query vectors of this kv head: row i, member gg -> i*g + gg
    qv = np.empty(R * D, np.float32)
    lim = np.empty(R, np.int64)  # tokens visible to each query vector (causal)
    start = np.empty(R, np.int64)  # its first visible token: p - window + 1 on a window
    for i in range(nq):
        for gg in range(g):
            r = i * g + gg
            lim[r] = L - nq + i + 1
            start[r] = max(0, lim[r] - job.window) if job.window > 0 else 0
            for j in range(D):
                qv[r * D + j] = q[q_off[b] + i, h * g + gg, j] * scale
    acc = np.zeros(R * Dv, np.float32)
    mx = np.full(R, _NEG, np.float32)
    den = np.zeros(R, np.float32)
    vis, vfirst = np.empty(R, np.uint64), np.empty(R, np.uint64)
    kt, vt = np.empty(TL * D, np.float32), np.empty(TL * Dv, np.float32)
    sc, lo = np.empty(TL * max(nbk, nbv), np.float32), np.empty(TL * max(nbk, nbv), np.float32)
    p = np.empty(R * TL, np.float32)
    uR, uTL = np.uint64(R), np.uint64(TL)
    t = t0
    row0, T = _tile_at(b, h, t, t1, geom, pages)
    _prefetch_rows(kcode, kd, km, kqh, kqs, kx32, kx16, row0, np.uint64(T), nbk)
    _prefetch_rows(vcode, vd, vm, vqh, vqs, vx32, vx16, row0, np.uint64(T), nbv)
    while t < t1:
        row0, T = _tile_at(b, h, t, t1, geom, pages)
        more = t + T < t1
        if more:  # the next tile's K now, its V after this tile's scores: spread out
            nrow0, nT = _tile_at(b, h, t + T, t1, geom, pages)
            _prefetch_rows(kcode, kd, km, kqh, kqs, kx32, kx16, nrow0, np.uint64(nT), nbk)
        uT = np.uint64(T)
        for r in range(R):
            vis[r] = np.uint64(max(0, min(T, lim[r] - t)))
            vfirst[r] = np.uint64(max(0, min(T, start[r] - t)))
        fmt, src, first = _prepare(kcode, kd, km, kqh, kqs, kx32, row0, uT, nbk, qk, kt, sc, lo)
        _scores(fmt, qv, D, uR, uT, p, uTL, src, kx16, kqs, sc, first, nbk)
        if more:
            _prefetch_rows(vcode, vd, vm, vqh, vqs, vx32, vx16, nrow0, np.uint64(nT), nbv)
        _softmax_step(p, acc, mx, den, vfirst, vis, uR, uT, Dv, uTL, cap)
        fmt, src, first = _prepare(vcode, vd, vm, vqh, vqs, vx32, row0, uT, nbv, qk, vt, sc, lo)
        _accumulate(fmt, p, uTL, uT, acc, Dv, uR, src, vx16, vqs, sc, first, nbv)
        t += T
    for r in range(R):
        job.part_ml[w, r, 0] = mx[r]
        job.part_ml[w, r, 1] = den[r]
        for j in range(Dv):
            job.part_acc[w, r, j] = acc[r * Dv + j]


@njit(fastmath=_FAST, cache=True)
def _merge_group(gi, out, n_kv, job):
    """Combine the split-K partials of one (sequence, kv head) into out rows."""
    q_lens, q_off, part_acc, part_ml = job.q_lens, job.q_off, job.part_acc, job.part_ml
    w0, w1 = job.groups[gi], job.groups[gi + 1]
    b, h = job.work[w0, 0], job.work[w0, 1]
    g = out.shape[1] // n_kv
    Dv = out.shape[2]
    for r in range(q_lens[b] * g):
        top = _NEG
        for w in range(w0, w1):
            top = max(top, part_ml[w, r, 0])
        den = np.float32(0.0)
        for w in range(w0, w1):
            den += part_ml[w, r, 1] * _exp(part_ml[w, r, 0] - top)
        row, col = q_off[b] + r // g, h * g + r % g
        for j in range(Dv):
            out[row, col, j] = 0.0
        for w in range(w0, w1):
            c = _exp(part_ml[w, r, 0] - top) / den
            for j in range(Dv):
                out[row, col, j] += c * part_acc[w, r, j]


# ---------------------------------------------------------------- threads
# Work items are claimed from an atomic counter by the calling thread and by helper
# threads (numba nogil code, so they run in parallel). Unlike an OpenMP parallel region,
# nobody waits for a thread that has not started: on a busy machine a late helper finds
# the items gone and the caller has done them, where a static OpenMP split stalls a
# decode step by whole scheduler time slices (benchmarks/README.md).


@njit(inline="always")
def _code_q(q, qc, signs, pre, post, size):
    """qc = (H(S (q * pre)) * scale) * post per [N, Hq, D] row (size 0: no butterfly, scale
    1): the codec's ``transform_q``, in ``rotation.scaled_rotate_kernel``'s order of
    roundings, so the coded queries are the same bit for bit."""
    n, heads, dim = q.shape
    scale = np.float32(1.0 / np.sqrt(size)) if size > 0 else np.float32(1.0)
    for i in range(n):
        for h in range(heads):
            row = qc[i, h]
            for j in range(dim):
                row[j] = (q[i, h, j] * pre[h, j]) * signs[j]
            if size > 0:
                butterfly(row, size)
            for j in range(dim):
                row[j] = (row[j] * scale) * post[h]


@njit(inline="always")
def _restore(out, signs, mul, shift, size):
    """out = S H(out * mul + shift) * scale per [N, Hq, Dv] row, in place (size 0: only
    out * mul + shift): the codec's ``restore``, its multiply then
    ``rotation.rotate_kernel``'s inverse, rounded as they round."""
    n, heads, dim = out.shape
    scale = np.float32(1.0 / np.sqrt(size)) if size > 0 else np.float32(1.0)
    for i in range(n):
        for h in range(heads):
            row = out[i, h]
            for j in range(dim):
                row[j] = row[j] * mul[h]
            for j in range(dim):
                row[j] = row[j] + shift[h, j]
            if size > 0:
                butterfly(row, size)
                for j in range(dim):
                    row[j] = row[j] * scale * signs[j]


@njit(nogil=True, cache=True)
def _attend_items(flag, gen, linger, counters, q, qc, scale, cap, kplanes, vplanes, geom, job,
                  wk, wv, wslots, side_k, side_v, shrinks, wres, qsigns, qpre, qpost, qsize):
    """Claim and run work items until none is left, on any number of threads at once:
    counters[0] hands out items, counters[1] counts the finished ones (flag, gen, linger:
    ``threads.Helpers.run``'s).

    The first thread to arrive (``threads.first_in``) prepares what every item reads
    while the others wait: it writes the step's own rows (wk, wv into wslots; none when
    wslots is empty), then codes the queries q into qc (``_code_q``: the cache's codec;
    ones and size 0 leave them as they are). So a decode layer's write, query coding and
    attention are one call, not three (each costs tens of microseconds of dispatch on the
    cold cache between matmuls). wres[0]: the write's ``ggml.precheck`` code; when it is
    not 0 nothing is written and no item runs."""
    threads.job_begins(flag, gen)
    if threads.first_in(counters):
        if wslots.shape[0]:
            wres[0] = ggml.precheck(wk, wv, wslots, geom)
            if wres[0] == 0:
                cpu_write.write_rows(wk, wv, wslots, kplanes, vplanes, geom, side_k, side_v,
                                      shrinks)
        if wres[0] == 0:
            _code_q(q, qc, qsigns, qpre, qpost, qsize)
        threads.first_done(counters)
    if wres[0] != 0:
        threads.job_ends(flag, gen, linger)
        return
    while True:
        w = fetch_add(counters, 0)
        if w >= job.work.shape[0]:
            threads.job_ends(flag, gen, linger)
            return
        _attend_chunk(w, qc, scale, cap, kplanes, vplanes, geom, job)
        fetch_add(counters, 1)


@njit(nogil=True, cache=True)
def _finish(counters, out, n_kv, job, wres, osigns, omul, oshift, osize):
    """Wait for the items other threads still run (at most one each), then merge and
    restore the output from the cache's coordinates (``_restore``; ones, zeros and size
    0 leave it as it is). Nothing ran when the write was refused."""
    if wres[0] != 0:
        return
    while load_acquire(counters, 1) < job.work.shape[0]:
        pass
    for gi in range(job.groups.shape[0] - 1):
        _merge_group(gi, out, n_kv, job)
    _restore(out, osigns, omul, oshift, osize)


# ---------------------------------------------------------------- torch glue


class Job(NamedTuple):
    """One step's split-K work, shared by every layer (the kernels' view of a Step)."""

    pages: np.ndarray  # [B, max_pages] int64 page table
    kv_lens: np.ndarray  # [B] int64
    q_lens: np.ndarray  # [B] int64
    q_off: np.ndarray  # [B + 1] int64 first packed query row of each sequence
    work: np.ndarray  # [W, 4] int64 items (b, h, t0, t1)
    groups: np.ndarray  # [G + 1] int64: items of one (b, h) are work[groups[i]:groups[i+1]]
    part_acc: np.ndarray  # [W, rows, Dv] float32 partial outputs
    part_ml: np.ndarray  # [W, rows, 2] float32 partial (max, denominator)
    window: int  # keys per query on a sliding window (0: every key before it)


class _Scratch:
    """``Backend.prepare``'s per-step state: which sequences run where, the work list."""

    def __init__(self, step: "Step", window: int = 0, table=None):
        cache, q_lens = step.cache, step.q_lens
        self.fused = [b for b, n in enumerate(q_lens) if 0 < n <= NUMBA_MAX_Q]
        self.tiled = [b for b, n in enumerate(q_lens) if n > NUMBA_MAX_Q]
        self.kv_lens = np.asarray(step.kv_lens, np.int64)
        # On a sliding-window layer a sequence's work starts at its first row's window
        # (the first key any row reads; a window group holds nothing before it) and the
        # kernel limits every row to its own window.
        first_row = self.kv_lens - np.asarray(q_lens, np.int64)
        starts = np.maximum(first_row - window + 1, 0) if window else None
        self.work, self.groups = plan_work(self.kv_lens, self.fused, cache.n_kv_heads,
                                           threads.threads(), starts)
        self.window = window
        self._step, self._job = step, None
        self._table = step.page_table if table is None else table
        self._layers: dict[tuple[int, int], _Scratch] = {}

    def for_layer(self, layer: int, window: int) -> "_Scratch":
        """The scratch of ``layer`` attending over a ``window`` (0: every key), made once
        per step for each cache group and window: a window group's page table names only
        the pages inside the window, which are all a windowed layer's work reads."""
        group = self._step.cache.group_index(layer)
        if not (window or group):
            return self
        key = (group, window)
        if key not in self._layers:
            self._layers[key] = _Scratch(self._step, window, self._step.layer_table(layer))
        return self._layers[key]

    def job(self, group: int, dv: int) -> Job:
        """The kernels' record, with partial buffers for ``group`` query heads per kv head
        (known at the first layer's call), made once per step."""
        if self._job is None:
            st = self._step
            rows = max([st.q_lens[b] * group for b in self.fused] + [1])
            self._job = Job(self._table.pages.to(torch.int64).numpy(), self.kv_lens,
                            np.asarray(st.q_lens, np.int64), np.asarray(st.q_offsets, np.int64),
                            self.work, self.groups,
                            np.empty((len(self.work), rows, dv), np.float32),
                            np.empty((len(self.work), rows, 2), np.float32), self.window)
        return self._job


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_work(kv_lens: np.ndarray, seqs: list[int], n_kv: int, threads: int,
              starts: np.ndarray | None = None):
    """Split-K work items (b, h, t0, t1), items of one (b, h) adjacent; group offsets.

    About CHUNKS_PER_THREAD near-equal, 64-token aligned items per thread for one
    sequence: threads claim items as they go, and small equal items leave little for one
    thread at the end. A sequence's split depends on its own keys only, never on what
    else is in the batch, so its partial sums are added in the same order whether it runs
    alone or batched: greedy output does not depend on other requests.
    starts: first key per sequence (a sliding window's), 0 when None.
    """
    first = [0 if starts is None else int(starts[b]) for b in range(len(kv_lens))]
    work, groups = [], [0]
    for b in seqs:
        L, a = int(kv_lens[b]), first[b]
        chunk = max(MIN_CHUNK, _cdiv((L - a) * n_kv, CHUNKS_PER_THREAD * threads))
        n = max(1, _cdiv(L - a, chunk))
        step = _cdiv(_cdiv(L - a, n), 64) * 64
        for h in range(n_kv):
            work += [(b, h, t0, min(L, t0 + step)) for t0 in range(a, L, step)]
            groups.append(len(work))
    return (np.asarray(work, np.int64).reshape(-1, 4), np.asarray(groups, np.int64))


def _tile_tokens(head_dim: int, v_head_dim: int) -> int:
    return max(4, TILE_FLOATS // max(head_dim, v_head_dim) // 4 * 4)


def _run(q: np.ndarray, scale: float, kplanes, vplanes, geom, job: Job, out: np.ndarray,
         softcap: float = 0.0, write: tuple | None = None, coding: tuple | None = None) -> int:
    """The fused items of a step on the caller's and the helper threads, merged into out,
    after ``write`` (k, v, slots, side_k, side_v: ``cpu_write.prepared``) when given, with
    q coded and out restored by ``coding`` (``coding()``; None: q already coded); the
    write's ``ggml.precheck`` code (0: written and attended)."""
    counters, wres = np.zeros(4, np.int64), np.zeros(1, np.int64)
    code = coding or plain_coding(q.shape[1], q.shape[2], out.shape[2])
    threads.pool().run(
        _attend_items, (counters, q, np.empty_like(q), np.float32(scale), np.float32(softcap),
                        kplanes, vplanes, geom, job, *(write or _no_write()), cpu_write.SHRINKS,
                        wres, *code[:4]),
        len(job.work) - 1, _finish, (counters, out, geom.n_kv, job, wres, *code[4:]))
    return int(wres[0])


@functools.lru_cache(maxsize=32)
def plain_coding(heads: int, dim_k: int, dim_v: int) -> tuple:
    """``coding`` that changes nothing: (q signs [D], pre [Hq, D], post [Hq], size, output
    signs [Dv], mul [Hq], shift [Hq, Dv], size) as ones, zeros and no butterfly (writable
    float32, as a codec's own: one compiled kernel)."""
    ones = np.ones
    return (ones(dim_k, np.float32), ones((heads, dim_k), np.float32), ones(heads, np.float32), 0,
            ones(dim_v, np.float32), ones(heads, np.float32), np.zeros((heads, dim_v), np.float32), 0)


_CODINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> (version, {layer: coding})


def coding(cache: "KVCache", layer: int, heads: int) -> tuple:
    """What the job applies to one layer's queries and output for ``cache``'s codec
    (``KVCodec.query_terms``, ``output_terms``): views of the codec's tensors, so a mean
    set later (``KVCodec.set_means``) is read as it is; made once per layer and codec
    version (``KVCodec.to`` replaces the tensors)."""
    plain = plain_coding(heads, cache.head_dim, cache.v_head_dim)
    codec = cache.codec
    if codec is None:
        return plain
    per = cpu_write.per_version(_CODINGS, cache)
    got = per.get(layer)
    if got is None:
        rk, pre, post = codec.query_terms(layer)
        rv, mul, shift = codec.output_terms(layer)
        got = per[layer] = (
            rk.signs_np if rk is not None else plain[0], _f32(pre, plain[1]),
            _f32(post, plain[2]), rk.size if rk is not None else 0,
            rv.signs_np if rv is not None else plain[4], _f32(mul, plain[5]),
            _f32(shift, plain[6]), rv.size if rv is not None else 0)
    return got


def _f32(t: torch.Tensor | None, plain: np.ndarray) -> np.ndarray:
    if t is None:
        return plain
    if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != plain.shape:
        raise ValueError(f"codec term {list(t.shape)} {t.dtype}: expected {list(plain.shape)} "
                         "contiguous float32")
    return t.numpy()


@functools.lru_cache(maxsize=1)
def _no_write() -> tuple:
    """``_attend_items``' write arguments for no rows (the types of real ones: one
    compiled kernel)."""
    rows = np.zeros((0, 1, formats.QK), np.float32)
    return (rows, rows, np.zeros(0, np.int64), *cpu_write.plain_sides(1, formats.QK, formats.QK))


def attention(q: torch.Tensor, cache: "KVCache", layer: int, step: "Step",
              scale: float, window: int = 0, softcap: float = 0.0,
              write: tuple | None = None, coded: bool = True) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence -> [N, Hq, Dv] float32 (see module docstring);
    ``step`` prepared by ``Backend.prepare``. window: a sliding-window layer's keys per
    query (0: every key before it); softcap: scores s -> softcap * tanh(s / softcap)
    before the softmax (0: none). write: (slots, k, v), the step's rows of this layer,
    written first (``cpu_write.write``'s checks; nothing written when q is refused).
    coded=False: q and the output are in the model's coordinates; the cache's codec
    codes q and restores the output (in the job, or around the tiled path's calls)."""
    n, hq, dim = q.shape
    if dim != cache.head_dim or hq % cache.n_kv_heads or n != step.n_rows:
        raise ValueError(f"q {list(q.shape)} does not fit {step.n_rows} rows, head_dim "
                         f"{cache.head_dim} and a multiple of {cache.n_kv_heads} heads")
    st: _Scratch = step.scratch.for_layer(layer, window)
    q = ggml.dense(q)
    bad = count_bad(q.numpy())
    if bad:  # a NaN query would leave garbage, not NaN, after the max-subtracted softmax
        raise ValueError(f"query holds {bad} non-finite values (NaN or inf)")
    layer = range(cache.n_layers)[layer]
    if st.tiled or not len(st.work):  # long chunks: the threaded writer, torch's attention
        if write is not None:
            cpu_write.write(cache, layer, *write)
        if not coded and cache.codec is not None:
            q = cache.codec.transform_q(layer, q)
            return cache.codec.restore(layer, attention(q, cache, layer, step, scale, window,
                                                        softcap))
        write = None
    out = torch.empty(n, hq, cache.v_head_dim, dtype=torch.float32)
    if len(st.work):
        kplanes, vplanes = ggml.plane_views(cache, layer)
        geom = ggml.geom(cache, layer, _tile_tokens(cache.head_dim, cache.v_head_dim))
        rc = _run(q.numpy(), scale, kplanes, vplanes, geom,
                  st.job(hq // cache.n_kv_heads, cache.v_head_dim), out.numpy(), softcap,
                  None if write is None else cpu_write.prepared(cache, layer, *write),
                  None if coded else coding(cache, layer, hq))
        ggml.raise_for(rc, cache)
    for b in st.tiled:  # long chunks: torch's flash GEMMs, banded past a window or capped
        lo, hi = step.q_offsets[b], step.q_offsets[b + 1]
        pages, kv_len = step.layer_table(layer).pages[b], step.kv_lens[b]
        out[lo:hi] = tiled.attend_banded(q[lo:hi], cache, layer, pages, kv_len, scale, window,
                                         softcap) \
            if (window and kv_len > window) or softcap else \
            tiled.attend_sequence(q[lo:hi], cache, layer, pages, kv_len, scale)
    return out


class Backend:
    """The CPU backend: numba writes (``cpu_write``), fused attention, tiled long chunks."""

    name = "cpu"

    def prepare(self, step: "Step") -> None:
        step.scratch = _Scratch(step)

    def write(self, cache: "KVCache", layer: int, step: "Step", k: torch.Tensor,
              v: torch.Tensor) -> None:
        cpu_write.write(cache, layer, step.layer_slots(layer), k, v)

    def attend(self, q: torch.Tensor, cache: "KVCache", layer: int, step: "Step",
               scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        return attention(q, cache, layer, step, scale, window, softcap)

    def write_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: "KVCache",
                     layer: int, step: "Step", scale: float, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
        """``write``, the codec's ``transform_q``, ``attend`` and its ``restore`` as one
        kernel job: q and the result in the model's coordinates, as ``Attention.__call__``'s."""
        return attention(q, cache, layer, step, scale, window, softcap,
                         (step.layer_slots(layer), k, v), coded=False)


def warmup(type_k: str = "q8_0", type_v: str = "q4_0") -> None:
    """Compile (or load from numba's disk cache) the writer and the attention kernel now,
    on a one-page pool of ``type_k`` K and ``type_v`` V (one kernel serves every type).

    The first compile takes seconds (benchmarks/README.md); an engine can call this
    while it loads a model, even from another thread, instead of paying it on the first
    token.
    """
    qk, page = formats.QK, 4
    kplanes, vplanes = ggml.tiny_planes(type_k, page), ggml.tiny_planes(type_v, page)
    geom = ggml.Geom(0, 1, 1, page, 1, 1, qk, _tile_tokens(qk, qk))
    rows, slots = np.zeros((2, 1, qk), np.float32), np.arange(2, dtype=np.int64)
    cpu_write.write_arrays(rows, rows, slots, kplanes, vplanes, geom, cpu_write.plain_sides(1, qk, qk))
    kv_lens = np.array([2], np.int64)
    work, groups = plan_work(kv_lens, [0], 1, 1)
    job = Job(np.zeros((1, 1), np.int64), kv_lens, kv_lens.copy(), np.array([0, 2], np.int64),
              work, groups, np.empty((len(work), 2, qk), np.float32),
              np.empty((len(work), 2, 2), np.float32), 0)
    _run(rows, 1.0, kplanes, vplanes, geom, job, np.empty((2, 1, qk), np.float32))
    _run(rows, 1.0, kplanes, vplanes, geom, job, np.empty((2, 1, qk), np.float32), 0.0,
         (rows, rows, slots, *cpu_write.plain_sides(1, qk, qk)))  # a decode step's form


def available(device, type_k: str, type_v: str) -> str | None:
    """None on CPU for every type (numba imported with this module); else the reason."""
    if torch.device(device).type != "cpu":
        return f"the numba kernels run on CPU only, not {torch.device(device).type}"
    missing = [t for t in (type_k, type_v) if t not in ggml.CODES]
    return f"no numba kernel for cache type {', '.join(missing)}" if missing else None
