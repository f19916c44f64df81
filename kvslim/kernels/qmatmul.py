"""Matmuls that read GGUF weight blocks in place (numba, CPU).

A weight is a byte range of the mapped GGUF file: ``rows`` rows of ``row_bytes`` bytes,
each row a run of ggml blocks (32 or 256 values) or plain f32/f16/bf16 values. Nothing
here holds a float copy of a matrix.

- ``gemv``: few input rows (decode). For the hot types a fused block dot per output row
  and input row decodes the blocks in registers (see "fused block dots"); other types
  dequantize each row into a buffer that stays in L1/L2 and dot it with every input row.
  Either way each block is read from memory once per call. Output rows are
  split into work items that the caller and helper threads claim from an atomic
  counter (late threads find the items gone instead of stalling the step).
- ``dequantize_rows``: rows into a float32 tile (same threads), for prefill, where
  torch's GEMM on a tile of a few MiB beats any per-row dot (``kvslim.weights`` picks).

One compiled function serves every type: the type is a small integer code the kernel
branches on per chunk, so a first call compiles one function per kernel, cached on disk.

Several weights can be one matmul (q, k and v; gate and up): ``parts`` lists them and
the work items span all of them, one job and one output. A part may name a head size
``hd``: its output column j (in head h, half a, index i of head_dim/2) is the stored
row h*hd + 2i + a. That undoes llama's GGUF q/k row permutation (see
``gguf_loader.unpermute_qk``) on the output, for free, instead of copying the weights:
the GEMV reads the rows in file order and writes each result to its permuted column
(reading them in output order, back and forth inside a head, ran at a third of the
bandwidth), a prefill tile dequantizes them in output order. (Rotating the
file's order with interleaved RoPE instead would also keep q.k, but the cache's coding
-- mean keys, un-rotation -- and every other architecture work in NEOX order.)
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kvslim import jit  # noqa: F401 - before any kernel compiles (kvslim.jit)
from kvslim.kernels.ggml import bits_to_float, fetch_add, load_acquire
from kvslim.kernels.qtypes import TYPES
from kvslim.kernels.threads import first_done, first_in, job_begins, job_ends, pool

(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
 IQ4_XS) = range(len(TYPES))

# columns of each `parts` row: byte offset, row bytes, type code, rows, first output column,
# head size of the q/k un-permutation (0: rows in order)
PART_FIELDS = 6

_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                    dtype=np.float32)  # iq4_nl / iq4_xs codebook
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


# ---------------------------------------------------------------- intrinsics


@intrinsic
def _half(typingctx, bits):
    """The low 16 bits of an integer, as f16 bits -> float32 (vcvtph2ps with F16C)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        h = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


# ---------------------------------------------------------------- vector block pieces
# LLVM does not vectorize the byte decoding below by itself (it cannot tell the float
# stores from the byte loads apart), so the hot types' 16-value pieces are written as
# vector IR: load 16 bytes, widen, mask/shift/merge the code bits, one multiply-add.

_V16I = ir.VectorType(ir.IntType(32), 16)
_V16F = ir.VectorType(ir.FloatType(), 16)
_V16B = ir.VectorType(ir.IntType(8), 16)


def _vconst(xs):
    return ir.Constant(_V16I, list(xs) if hasattr(xs, "__iter__") else [xs] * 16)


def _vsplat(builder, x, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))


def _ptr(context, builder, arrty, arr, idx):
    return builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx])


def _load16(builder, base, off, signed=False):
    at = builder.bitcast(builder.gep(base, [off]), _V16B.as_pointer())
    b = builder.load(at, align=1)
    return builder.sext(b, _V16I) if signed else builder.zext(b, _V16I)


def _codes(builder, base, p, q, sh32, signed=False, shift=0, high=None, mask=1, bias=0):
    """<16 x i32> codes of byte p (i64) of base: the signed byte, or its nibble at ``shift``;
    with bits 4 (and 5) from ``high``: "bytes" (byte q+j (i64 q) >> sh32, ``mask``ed) or
    "bits" (bit sh32+j of the i32 q); minus ``bias``."""
    code = _load16(builder, base, p, signed)
    if not signed:
        code = builder.and_(builder.lshr(code, _vconst(shift)), _vconst(15))
    if high == "bytes":
        h = builder.lshr(_load16(builder, base, q), _vsplat(builder, sh32, _V16I))
        code = builder.or_(code, builder.shl(builder.and_(h, _vconst(mask)), _vconst(4)))
    elif high == "bits":
        lane = builder.add(_vsplat(builder, sh32, _V16I), _vconst(range(16)))
        h = builder.and_(builder.lshr(_vsplat(builder, q, _V16I), lane), _vconst(1))
        code = builder.or_(code, builder.shl(h, _vconst(4)))
    if bias:
        code = builder.sub(code, _vconst(bias))
    return code


def _make_piece(signed=False, shift=0, high=None, mask=1, bias=0):
    """An intrinsic piece(y, o, d, p, q, sh, s, lo): y[o:o+16] = s * code + lo, where
    code_j = byte p+j of d (signed, or its nibble at ``shift``), with bit 4 (and 5) taken
    from ``high``: "bytes" (byte q+j shifted right by sh, ``mask``ed) or "bits" (bit sh+j of
    the integer q), minus ``bias``."""

    @intrinsic
    def piece(typingctx, y, o, d, p, q, sh, s, lo):
        def codegen(context, builder, sig, args):
            base = _ptr(context, builder, sig.args[2], args[2], ir.Constant(_I64, 0))
            high_at = args[4] if high == "bytes" else builder.trunc(args[4], _I32)
            code = _codes(builder, base, args[3], high_at, builder.trunc(args[5], _I32),
                          signed, shift, high, mask, bias)
            val = builder.fmul(builder.sitofp(code, _V16F), _vsplat(builder, args[6], _V16F),
                               flags=["fast"])
            val = builder.fadd(val, _vsplat(builder, args[7], _V16F), flags=["fast"])
            dst = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]),
                                  _V16F.as_pointer())
            builder.store(val, dst, align=4)
            return context.get_dummy_value()
        return types.void(y, o, d, p, q, sh, s, lo), codegen
    return piece


_P_I8 = _make_piece(signed=True)
_P_LO, _P_HI = _make_piece(shift=0), _make_piece(shift=4)
_P_Q5_LO, _P_Q5_HI = _make_piece(shift=0, high="bits"), _make_piece(shift=4, high="bits")
_P_Q6_LO = _make_piece(shift=0, high="bytes", mask=3, bias=32)
_P_Q6_HI = _make_piece(shift=4, high="bytes", mask=3, bias=32)
_P_Q5K_LO = _make_piece(shift=0, high="bytes", mask=1)
_P_Q5K_HI = _make_piece(shift=4, high="bytes", mask=1)


@intrinsic
def _f16x16(typingctx, y, o, d, p):
    """y[o:o+16] = the 16 f16 values at byte p of d."""
    def codegen(context, builder, sig, args):
        vh = ir.VectorType(ir.HalfType(), 16)
        src = builder.bitcast(_ptr(context, builder, sig.args[2], args[2], args[3]), vh.as_pointer())
        val = builder.fpext(builder.load(src, align=1), _V16F)
        dst = builder.bitcast(_ptr(context, builder, sig.args[0], args[0], args[1]), _V16F.as_pointer())
        builder.store(val, dst, align=4)
        return context.get_dummy_value()
    return types.void(y, o, d, p), codegen


# ---------------------------------------------------------------- fused block dots
# dot(d, p, nb, x, xs): the dot of nb blocks stored from byte p of d with x[0:nb * block
# values], one loop in vector IR (xs: sums of x over each 16 values). A block is groups
# of 16-value pieces sharing a scale s and an offset lo: the codes, widened to float, are
# multiplied with x into a group sum, then s * (group sum) goes into one of four
# <16 x float> accumulators in registers, and lo * (x's sum over the group) into a scalar
# one. So each value costs a conversion and one multiply-add; no row buffer is written
# and read back, and no horizontal sum is taken before the row's end.

_NACC = 4  # independent accumulators: FMA latency x throughput on AVX2 cores
# The integer dots ask for the bytes this far ahead of the block they are at (prefetcht0,
# one per 64-byte line): their loops hold too few loads in flight for the hardware
# prefetchers to keep a streamed matrix ahead of them (benchmarks/README.md: 2 KiB
# measured best, 1 KiB no gain, 4 KiB a little less, on a Zen 3). A prefetch never
# faults, so one past the file's end is harmless.
_PREFETCH = 2048


def _c(n):
    return ir.Constant(_I64, n)


def _byte(builder, base, off):
    """The byte at i64 offset off, as i32."""
    return builder.zext(builder.load(builder.gep(base, [off])), _I32)


def _half_at(builder, base, off):
    """The f16 at byte offset off, as float."""
    at = builder.bitcast(builder.gep(base, [off]), ir.IntType(16).as_pointer())
    return builder.fpext(builder.bitcast(builder.load(at, align=1), ir.HalfType()), ir.FloatType())


def _u32_at(builder, base, off):
    at = builder.bitcast(builder.gep(base, [off]), _I32.as_pointer())
    return builder.load(at, align=1)


def _hsum(builder, v):
    """The sum of a <n x float>'s lanes (n a power of two)."""
    n = v.type.count
    while n > 1:
        n //= 2
        idx = ir.VectorType(_I32, n)
        lo = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(idx, list(range(n, 2 * n))))
        v = builder.fadd(lo, hi, flags=["fast"])
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _make_dot(block_bytes, block_values, emit):
    """An intrinsic dot(d, p, nb, x, xs) -> float32 for blocks that
    ``emit(builder, base, blk)`` returns as groups (s, lo or None, [<16 x i32> codes]),
    in value order: value = code * s + lo."""

    @intrinsic
    def dot(typingctx, d, p, nb, x, xs):
        def codegen(context, builder, sig, args):
            fast = ["fast"]
            base = _ptr(context, builder, sig.args[0], args[0], _c(0))
            xbase = _ptr(context, builder, sig.args[3], args[3], _c(0))
            sbase = _ptr(context, builder, sig.args[4], args[4], _c(0))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16))
                    for _ in range(_NACC)]
            acc_lo = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
            with cgutils.for_range(builder, args[2]) as loop:
                blk = builder.add(args[1], builder.mul(loop.index, _c(block_bytes)))
                xo = builder.mul(loop.index, _c(block_values))
                so = builder.mul(loop.index, _c(block_values // 16))
                acc = [builder.load(a) for a in accs]
                lo_sum = builder.load(acc_lo)
                i = 0  # 16-value piece of the block
                for g, (s, lo, codes) in enumerate(emit(builder, base, blk)):
                    t, xsum = None, None
                    for code in codes:
                        at = builder.bitcast(builder.gep(xbase, [builder.add(xo, _c(16 * i))]),
                                             _V16F.as_pointer())
                        prod = builder.fmul(builder.sitofp(code, _V16F), builder.load(at, align=4),
                                            flags=fast)
                        t = prod if t is None else builder.fadd(t, prod, flags=fast)
                        if lo is not None:
                            x16 = builder.load(builder.gep(sbase, [builder.add(so, _c(i))]))
                            xsum = x16 if xsum is None else builder.fadd(xsum, x16, flags=fast)
                        i += 1
                    scaled = builder.fmul(t, _vsplat(builder, s, _V16F), flags=fast)
                    acc[g % _NACC] = builder.fadd(acc[g % _NACC], scaled, flags=fast)
                    if lo is not None:
                        lo_sum = builder.fadd(lo_sum, builder.fmul(lo, xsum, flags=fast), flags=fast)
                for a, v in zip(accs, acc):
                    builder.store(v, a)
                builder.store(lo_sum, acc_lo)
            total = builder.load(accs[0])
            for a in accs[1:]:
                total = builder.fadd(total, builder.load(a), flags=fast)
            return builder.fadd(_hsum(builder, total), builder.load(acc_lo), flags=fast)
        return types.float32(d, types.int64, types.int64, x, xs), codegen
    return dot


def _emit_q8_0(b, base, blk):
    s = _half_at(b, base, blk)
    return [(s, None, [_codes(b, base, b.add(blk, _c(2 + 16 * h)), None, None, signed=True)
                       for h in range(2)])]


def _emit_q4_0(b, base, blk):
    s = _half_at(b, base, blk)
    q = b.add(blk, _c(2))
    return [(s, None, [_codes(b, base, q, None, None, shift=sh, bias=8) for sh in (0, 4)])]


def _emit_q4_1(b, base, blk):
    s, m = _half_at(b, base, blk), _half_at(b, base, b.add(blk, _c(2)))
    q = b.add(blk, _c(4))
    return [(s, m, [_codes(b, base, q, None, None, shift=sh) for sh in (0, 4)])]


def _emit_q5(b, base, blk, with_min):
    """q5_0 (values - 16) and q5_1 (+ min): bit j of the u32 qh is bit 4 of value j."""
    s = _half_at(b, base, blk)
    at = 4 if with_min else 2
    m = _half_at(b, base, b.add(blk, _c(2))) if with_min else None
    qh, q = _u32_at(b, base, b.add(blk, _c(at))), b.add(blk, _c(at + 4))
    return [(s, m, [_codes(b, base, q, qh, ir.Constant(_I32, 16 * i), shift=4 * i, high="bits",
                           bias=0 if with_min else 16) for i in range(2)])]


def _scale_min_ir(b, base, sc, j):
    """_scale_min_k4 in IR: (scale, min) of sub-block j from the 12 bytes at i64 sc, as i32."""
    byte = lambda i: _byte(b, base, b.add(sc, _c(i)))  # noqa: E731
    i32 = lambda n: ir.Constant(_I32, n)  # noqa: E731
    if j < 4:
        return b.and_(byte(j), i32(63)), b.and_(byte(j + 4), i32(63))
    s = b.or_(b.and_(byte(j + 4), i32(15)), b.shl(b.lshr(byte(j - 4), i32(6)), i32(4)))
    m = b.or_(b.lshr(byte(j + 4), i32(4)), b.shl(b.lshr(byte(j), i32(6)), i32(4)))
    return s, m


def _emit_k4(b, base, blk, five):
    """q4_K and q5_K: 8 sub-blocks of 32 values, 6-bit scales and mins."""
    dd, dmin = _half_at(b, base, blk), _half_at(b, base, b.add(blk, _c(2)))
    sc = b.add(blk, _c(4))
    groups = []
    for g in range(4):
        q = b.add(blk, _c((48 if five else 16) + 32 * g))
        for j, shift in ((2 * g, 0), (2 * g + 1, 4)):
            s, m = _scale_min_ir(b, base, sc, j)
            d1 = b.fmul(dd, b.sitofp(s, ir.FloatType()), flags=["fast"])
            lo = b.fneg(b.fmul(dmin, b.sitofp(m, ir.FloatType()), flags=["fast"]))
            codes = []
            for h in range(2):
                qq = b.add(q, _c(16 * h))
                if five:
                    codes.append(_codes(b, base, qq, b.add(blk, _c(16 + 16 * h)),
                                        ir.Constant(_I32, j), shift=shift, high="bytes", mask=1))
                else:
                    codes.append(_codes(b, base, qq, None, None, shift=shift))
            groups.append((d1, lo, codes))
    return groups


def _emit_q6_k(b, base, blk):
    dd = _half_at(b, base, b.add(blk, _c(208)))
    groups = [None] * 16
    for n in range(2):  # 128 values from 64 bytes of ql, 32 of qh, 8 scales
        ql, qh, sc = 64 * n, 128 + 32 * n, 192 + 8 * n
        for h in range(2):
            a, c = b.add(blk, _c(ql + 16 * h)), b.add(blk, _c(qh + 16 * h))
            a2 = b.add(blk, _c(ql + 32 + 16 * h))
            for k, (src, shift, sh) in enumerate(((a, 0, 0), (a2, 0, 2), (a, 4, 4), (a2, 4, 6))):
                s8 = b.load(b.gep(base, [b.add(blk, _c(sc + h + 2 * k))]))
                s = b.fmul(dd, b.sitofp(s8, ir.FloatType()), flags=["fast"])
                code = _codes(b, base, src, c, ir.Constant(_I32, sh), shift=shift, high="bytes",
                              mask=3, bias=32)
                groups[8 * n + 2 * k + h] = (s, None, [code])
    return groups


_D_Q8_0 = _make_dot(34, 32, _emit_q8_0)
_D_Q4_0 = _make_dot(18, 32, _emit_q4_0)
_D_Q4_1 = _make_dot(20, 32, _emit_q4_1)
_D_Q5_0 = _make_dot(22, 32, lambda b, base, blk: _emit_q5(b, base, blk, False))
_D_Q5_1 = _make_dot(24, 32, lambda b, base, blk: _emit_q5(b, base, blk, True))
_D_Q4_K = _make_dot(144, 256, lambda b, base, blk: _emit_k4(b, base, blk, False))
_D_Q5_K = _make_dot(176, 256, lambda b, base, blk: _emit_k4(b, base, blk, True))
_D_Q6_K = _make_dot(210, 256, _emit_q6_k)


# ---------------------------------------------------------------- integer block dots
# idot(d, p, nb, xq, xd, xs, xs16): as dot, with x quantized per 32 values by ``quantize_rows``
# (15-bit codes, kept in xq twice: as two int8 planes, high and low, and as int16; scale
# xd and scale x code sum xs of each 32 values, xs16 of each 16). A 32-value chunk of a
# block is multiplied with x's codes in integer SIMD, in one of two forms:
# - "words" (q4_K, q4_0, q4_1, q8_0): the weight's codes come out of 16-bit (or 32-bit)
#   lanes by shifts and masks, the chunk's even-indexed codes in one <16 x i16>, its
#   odd-indexed ones in another, no shuffle; each against the same 16 of x's int16 codes
#   (stored in that order) by one vpmaddwd: two multiplies per 32 values.
# - bytes (q5_0, q5_1, q5_K, q6_K, whose fifth and sixth bits cost more shifts in 16-bit
#   lanes: slower that way, measured): the codes as an unsigned <32 x i8>, against each
#   of x's planes: u8 x i8 pairs summed into i16 (vpmaddubsw), pairs of those into i32
#   (vpmaddwd, x 128 for the high plane): four multiplies.
# Lane j of the i32 sums covers values 4j..4j+3 either way (the same integer sums, bit for
# bit). Then one float conversion and one multiply-add by (weight scale x x's scale: per
# 16 values for q6_K, whose 8 lanes are its two 16s) per chunk into four <8 x float>
# accumulators. Codes go in unsigned (q8_0's signed, in 16-bit lanes); the offsets (mins,
# q4_0's, q5_0's and q6_K's biases) multiply x's sums: four blocks' at once for 32-value
# blocks, vectors of 8 (16 for q6_K's per-16 scales) for the K-quants, whose 6-bit scales
# and mins are decoded 8 at a time. One thread, hot, on a Zen 3, words against bytes:
# q4_K 7-10% faster, q4_0 20%, q4_1 9%, q8_0 31% (benchmarks/README.md).
# Why 15 bits: llama.cpp's q8 activations (one int8 plane, x rounded to 8 bits) cost
# SmolLM2 a KLD of 2.9e-3 against its float32 weights (benchmarks/README.md), 29x the
# budget; 15 bits are 128x finer. Nothing saturates: i16 pair sums of codes at most 63
# (q6_K's) times plane values within [-127, 127]; i32 pairs of codes at most 128 in size
# times x's codes at most 16256.
# Without AVX2 the same sums are plain vector IR.

_V32B = ir.VectorType(ir.IntType(8), 32)
_V16S = ir.VectorType(ir.IntType(16), 16)
_V8I = ir.VectorType(_I32, 8)
_V8F = ir.VectorType(ir.FloatType(), 8)
_V4F = ir.VectorType(ir.FloatType(), 4)


def _avx2(context) -> bool:
    """Whether numba generates code for a CPU with AVX2 (vpmaddubsw, vpmaddwd)."""
    try:
        return "+avx2" in context.codegen()._tm_features.split(",")
    except AttributeError:  # numba internals moved: the portable form below
        return False


def _vnni(context) -> bool:
    """Whether numba generates code for a CPU with 256-bit VNNI (vpdpbusd: a byte
    multiply-add that also adds into its destination): AVX512-VNNI with AVX512VL, or
    AVX-VNNI."""
    try:
        features = set(context.codegen()._tm_features.split(","))
    except AttributeError:  # numba internals moved: without
        return False
    return {"+avx512vnni", "+avx512vl"} <= features or "+avxvnni" in features


def _dpbusd(builder, acc, u, s):
    """<8 x i32>: acc[i] + the sum of u[4i+j] * s[4i+j] over j < 4 (u unsigned, s signed
    bytes), one vpdpbusd (LLVM emits the VEX form where the CPU has AVX-VNNI only)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V8I, _V32B, _V32B]),
                                        "llvm.x86.avx512.vpdpbusd.256")
    return builder.call(fn, [acc, u, s])


def _pairs(builder, v):
    """<n/2>: v[2i] + v[2i+1]."""
    n = v.type.count
    even = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def _maddubs(builder, avx2, u, s):
    """<16 x i16>: u[2i] * s[2i] + u[2i+1] * s[2i+1] (u unsigned, s signed bytes)."""
    if avx2:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16S, [_V32B, _V32B]),
                                            "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(fn, [u, s])
    wide = ir.VectorType(ir.IntType(16), 32)
    return _pairs(builder, builder.mul(builder.zext(u, wide), builder.sext(s, wide)))


def _maddwd(builder, avx2, a, b):
    """<8 x i32>: a[2i] * b[2i] + a[2i+1] * b[2i+1] (signed i16)."""
    if avx2:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I, [_V16S, _V16S]),
                                            "llvm.x86.avx2.pmadd.wd")
        return builder.call(fn, [a, b])
    wide = ir.VectorType(_I32, 16)
    return _pairs(builder, builder.mul(builder.sext(a, wide), builder.sext(b, wide)))


def _splat(builder, x, n):
    vt = ir.VectorType(x.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _bytes(builder, base, off, n=32):
    """<n x i8> at i64 offset off."""
    at = builder.bitcast(builder.gep(base, [off]), ir.VectorType(ir.IntType(8), n).as_pointer())
    return builder.load(at, align=1)


def _words(builder, base, off):
    """<16 x i16> at i64 byte offset off."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), _V16S.as_pointer()), align=1)


def _k16(v):
    return ir.Constant(_V16S, [v] * 16)


def _b32(v):
    return ir.Constant(_V32B, [v] * 32 if isinstance(v, int) else list(v))


def _nibbles(builder, base, q):
    """<32 x i8>: the low nibbles of the 16 bytes at q, then their high nibbles (q4_0, q5_0
    ... order)."""
    b = _bytes(builder, base, q, 16)
    lo = builder.and_(b, ir.Constant(b.type, [15] * 16))
    hi = builder.lshr(b, ir.Constant(b.type, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))


def _bit4(builder, base, qh):
    """<32 x i8>: 16 where bit j of the 4 bytes at qh is set, else 0 (q5_0 / q5_1's fifth bits)."""
    b = _bytes(builder, base, qh, 4)
    b = builder.shuffle_vector(b, b, ir.Constant(ir.VectorType(_I32, 32), [i // 8 for i in range(32)]))
    set_ = builder.icmp_unsigned("!=", builder.and_(b, _b32([1 << (i % 8) for i in range(32)])), _b32(0))
    return builder.select(set_, _b32(16), _b32(0))


class _X:
    """x's quantized row as the integer dots read it: its scales xd and code sums xs for
    the 32-value chunks of the block whose first chunk is x0, and its code sums of 16."""

    def __init__(self, builder, dbase, sbase, s16base, x0):
        self.b, self.dbase, self.sbase, self.s16base, self.x0 = builder, dbase, sbase, s16base, x0

    def _at(self, base, c, n):
        at = self.b.gep(base, [self.b.add(self.x0, _c(c))])
        if n == 1:
            return self.b.load(at)
        return self.b.load(self.b.bitcast(at, ir.VectorType(ir.FloatType(), n).as_pointer()), align=4)

    def d(self, c=0, n=1):
        """x's scale of chunk c (n: the n chunks from c, as a vector)."""
        return self._at(self.dbase, c, n)

    def s(self, c=0, n=1):
        """x's scaled code sum of chunk c (n: the n chunks from c, as a vector)."""
        return self._at(self.sbase, c, n)

    def s16(self, n):
        """<n x float>: x's scaled code sums of the n 16-value groups from the block's first."""
        at = self.b.gep(self.s16base, [self.b.mul(self.x0, _c(2))])
        return self.b.load(self.b.bitcast(at, ir.VectorType(ir.FloatType(), n).as_pointer()), align=4)


def _lane(builder, v, j):
    """<8 x float>: lane j of v everywhere."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), [j] * 8))


def _iemit_q8_0_words(b, base, blk):
    """q8_0 against x's 16-bit codes: its 32 signed bytes read as 16 words, the even bytes
    sign-extended by a shift left and an arithmetic shift right, the odd ones by the
    latter alone (three shifts where the planes move the signs onto x's codes)."""
    w = _words(b, base, b.add(blk, _c(2)))
    eight = _k16(8)
    return "words", (b.ashr(b.shl(w, eight), eight), b.ashr(w, eight)), _c(0), None, None


def _iemit_q4_words(b, base, blk, with_min):
    """q4_0 / q4_1 against x's 16-bit codes: the 16 code bytes in both halves of a 32-byte
    vector (one broadcast load), each 32-bit lane shifted by 0 / 4 (low / high half: the
    values 2i / 16 + 2i in the low 16 bits, 2i + 1 / 17 + 2i in the high) or 8 / 12 for
    the odd-indexed values, masked to 4 bits a word: the even- and odd-indexed codes of
    the 32 in x's order, two shifts and two masks, no shuffle."""
    at = b.bitcast(b.gep(base, [b.add(blk, _c(4 if with_min else 2))]), ir.VectorType(_I32, 4).as_pointer())
    q = b.load(at, align=1)
    y = b.shuffle_vector(q, q, ir.Constant(_V8I, [0, 1, 2, 3, 0, 1, 2, 3]))
    nib = _v8([0x000F000F] * 8)

    def codes(lo, hi):
        return b.bitcast(b.and_(b.lshr(y, _v8([lo] * 4 + [hi] * 4)), nib), _V16S)
    return ("words", (codes(0, 4), codes(8, 12)), _c(0), _c(2) if with_min else None,
            None if with_min else -8.0)


def _iemit_q5(b, base, blk, with_min):
    """q5_0 (codes - 16) and q5_1 (+ min): bit j of the 4 bytes qh is bit 4 of value j."""
    at = 4 if with_min else 2
    code = b.or_(_nibbles(b, base, b.add(blk, _c(at + 4))), _bit4(b, base, b.add(blk, _c(at))))
    return 0, code, _c(0), _c(2) if with_min else None, None if with_min else -16.0


def _halves4(b, base, offs):
    """<4 x float>: the f16 values at the i64 byte offsets offs (up to 4; the other lanes 0),
    converted together (one vcvtph2ps for four blocks' scales, not one each). The four
    are gathered into a 64-bit integer register, not inserted lane by lane: scalar loads
    and shifts, one move into a vector register."""
    v = None
    for j, off in enumerate(offs):
        at = b.bitcast(b.gep(base, [off]), ir.IntType(16).as_pointer())
        h = b.zext(b.load(at, align=1), _I64)
        h = b.shl(h, _c(16 * j)) if j else h
        v = h if v is None else b.or_(v, h)
    return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), 4)), _V4F)


def _floats4(b, base, i0, n):
    """<4 x float>: base[i0 .. i0 + n) (n <= 4; one vector load when n is 4, else the
    other lanes 0: nothing is read past the n values)."""
    if n == 4:
        return b.load(b.bitcast(b.gep(base, [i0]), _V4F.as_pointer()), align=4)
    v = ir.Constant(_V4F, [0.0] * 4)
    for j in range(n):
        v = b.insert_element(v, b.load(b.gep(base, [b.add(i0, _c(j))])), ir.Constant(_I32, j))
    return v


def _v8(values):
    return ir.Constant(_V8I, list(values))


def _scales_mins_k4(b, base, sc):
    """_scale_min_k4 for all 8 sub-blocks at once: (scales, mins) <8 x i32> from the 12
    bytes at i64 sc, decoded four at a time in 32-bit integer registers (the scalar ALUs,
    idle in these loops, where vector shuffles would load the vector pipes the dot
    needs): bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; byte 8 + j
    holds the low 4 bits of scale 4 + j and of min 4 + j, whose top 2 bits are the top 2
    of bytes j and 4 + j."""
    u0, u1, u2 = (_u32_at(b, base, b.add(sc, _c(4 * i))) for i in range(3))
    low6, low4, two = (ir.Constant(_I32, m) for m in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))

    def top2(u):  # bits 6-7 of each byte, as bits 4-5
        return b.shl(b.and_(b.lshr(u, ir.Constant(_I32, 6)), two), ir.Constant(_I32, 4))

    def widen(lo, hi):  # two i32 of 4 bytes -> <8 x i32>
        q = b.or_(b.zext(lo, _I64), b.shl(b.zext(hi, _I64), _c(32)))
        return b.zext(b.bitcast(q, ir.VectorType(ir.IntType(8), 8)), _V8I)
    scales = widen(b.and_(u0, low6), b.or_(b.and_(u2, low4), top2(u0)))
    mins = widen(b.and_(u1, low6), b.or_(b.and_(b.lshr(u2, ir.Constant(_I32, 4)), low4), top2(u1)))
    return scales, mins


def _k4_terms(b, base, blk, x):
    """q4_K / q5_K's (scale, offset) <8 x float> per 32-value chunk: d x scale_j x x's
    scale, and -dmin x min_j x x's scaled code sum (the block's offset term)."""
    fast = ["fast"]
    dd, dmin = _half_at(b, base, blk), _half_at(b, base, b.add(blk, _c(2)))
    sc, mn = _scales_mins_k4(b, base, b.add(blk, _c(4)))
    scale = b.fmul(b.fmul(b.sitofp(sc, _V8F), _splat(b, dd, 8), flags=fast), x.d(0, 8), flags=fast)
    lo = b.fmul(b.fmul(b.sitofp(mn, _V8F), _splat(b, b.fneg(dmin), 8), flags=fast), x.s(0, 8), flags=fast)
    return scale, lo


def _iemit_k4(b, base, blk, x, five):
    """q4_K and q5_K: 8 chunks of 32 values, 6-bit scales and mins, all 8 decoded and
    multiplied with x's 8 scales (and sums) as vectors."""
    scale, lo = _k4_terms(b, base, blk, x)
    qh = _bytes(b, base, b.add(blk, _c(16))) if five else None
    chunks = []
    for g in range(4):
        q = _bytes(b, base, b.add(blk, _c((48 if five else 16) + 32 * g)))
        for j in (2 * g, 2 * g + 1):
            code = b.lshr(q, _b32(4)) if j % 2 else b.and_(q, _b32(15))
            if five:
                code = b.or_(code, b.shl(b.and_(b.lshr(qh, _b32(j)), _b32(1)), _b32(4)))
            chunks.append((0, code, _lane(b, scale, j)))
    return chunks, lo


def _iemit_q4_k_words(b, base, blk, x):
    """q4_K against x's codes in 16-bit lanes ("words" chunks): each 32 bytes of codes read
    as 16 words, word i holding values 2i and 2i + 1 of chunk 2g (the low nibbles of its two
    bytes) and of chunk 2g + 1 (the high nibbles): a shift and a mask give each chunk's
    even- and odd-indexed codes as <16 x i16>, no shuffle, and one vpmaddwd each multiplies
    them with x's 15-bit codes (in the same order, ``quantize_rows``). Per 32 values two
    multiplies where the byte planes take four; the same integer sums, lane for lane."""
    scale, lo = _k4_terms(b, base, blk, x)
    chunks = []
    for g in range(4):
        w = _words(b, base, b.add(blk, _c(16 + 32 * g)))
        even, odd = b.and_(w, _k16(15)), b.and_(b.lshr(w, _k16(8)), _k16(15))  # chunk 2g
        chunks.append(("words", (even, odd), _lane(b, scale, 2 * g)))
        even, odd = b.and_(b.lshr(w, _k16(4)), _k16(15)), b.lshr(w, _k16(12))  # chunk 2g + 1
        chunks.append(("words", (even, odd), _lane(b, scale, 2 * g + 1)))
    return chunks, lo


def _iemit_q6_k(b, base, blk, x):
    """q6_K: 8 chunks of 32 6-bit codes (minus 32), an int8 scale per 16 values. The codes
    go into the integer sums as they are (0..63); the bias of 32 is the block's offset
    term, -32 d sum_j scale_j s16_j over x's scaled code sums of 16 (two vpmaddubsw and
    two subtractions a chunk fewer). The scales are applied in float: lanes 0-3 of a
    chunk's integer sums cover its first 16 values, lanes 4-7 its second 16, so each
    chunk's multiplier is one pick of two lanes from the block's 16 (d x scale x x's
    scale), where building integer scales for vpmaddwd took a byte shuffle, a widening
    and a shift a chunk."""
    fast = ["fast"]
    d = _half_at(b, base, b.add(blk, _c(208)))
    v16 = ir.VectorType(ir.FloatType(), 16)
    raw = _bytes(b, base, b.add(blk, _c(192)), 16)
    scales = b.sitofp(raw, v16)  # <16 x float>
    # the multipliers of each 8 scales in the order 0 2 4 6 1 3 5 7: chunk k of a half
    # takes element k of each 128-bit lane (scales 2k and 2k + 1), one in-lane shuffle
    order = [h + i for h in (0, 8) for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    xd = x.d(0, 8)
    xd16 = b.shuffle_vector(xd, xd, ir.Constant(ir.VectorType(_I32, 16), [j // 2 for j in order]))
    mult = b.fmul(b.fmul(b.shuffle_vector(scales, scales, ir.Constant(ir.VectorType(_I32, 16), order)),
                         _splat(b, d, 16), flags=fast), xd16, flags=fast)
    bias = b.fmul(scales, x.s16(16), flags=fast)  # scale_j * s16_j
    bias = b.fadd(b.shuffle_vector(bias, bias, ir.Constant(ir.VectorType(_I32, 8), list(range(8)))),
                  b.shuffle_vector(bias, bias, ir.Constant(ir.VectorType(_I32, 8), list(range(8, 16)))),
                  flags=fast)
    lo = b.fmul(bias, _splat(b, b.fmul(d, ir.Constant(ir.FloatType(), -32.0), flags=fast), 8), flags=fast)
    chunks = []
    for n in range(2):  # 128 values from 64 bytes of ql, 32 of qh, 8 scales
        qh = _bytes(b, base, b.add(blk, _c(128 + 32 * n)))
        for k in range(4):  # values 32k..32k+31: ql at 32 (k % 2), nibble k // 2, qh bits 2k
            ql = _bytes(b, base, b.add(blk, _c(64 * n + 32 * (k % 2))))
            code = b.lshr(ql, _b32(4)) if k >= 2 else b.and_(ql, _b32(15))
            code = b.or_(code, b.shl(b.and_(b.lshr(qh, _b32(2 * k)), _b32(3)), _b32(4)))
            # scales 8n + 2k (values 0-15) and 8n + 2k + 1 (16-31)
            pick = ir.Constant(ir.VectorType(_I32, 8), [8 * n + k] * 4 + [8 * n + 4 + k] * 4)
            chunks.append((0, code, b.shuffle_vector(mult, mult, pick)))
    return chunks, lo


def _make_idot(block_bytes, block_values, emit, portable=False, vnni=True):
    """An intrinsic idot(d, p, nb, xq, xd, xs, xs16) -> float32 for blocks of ``block_values``
    (xs16: x's scaled code sums of 16, which only q6_K's offset term reads).

    256-value blocks: ``emit(builder, base, blk, x)`` (x: ``_X``) returns the block as
    32-value chunks (form, codes, scale) -- form 0: codes an unsigned <32 x i8> read
    against x's two planes; form "words": codes the chunk's even- and odd-indexed codes as
    two <16 x i16>, read against x's 16-bit codes; scale: the float scale times x's, a
    float or an <8 x float> for the 8 lanes of the chunk's integer sums, lane j over
    values 4j..4j+3 -- and the block's offset term (an <8 x float> to sum, or None), in
    value order: value = code * float scale + offset.

    32-value blocks: ``emit(builder, base, blk)`` returns (form, codes, the byte offset of
    the f16 scale d, that of the f16 min m or None, or a multiplier c of d or None): value =
    code * d + (m, or c * d). Four blocks run together: their scales are converted
    and multiplied with x's as one <4 x float>, their offset terms summed as another (one
    conversion and one multiply-add for four blocks where a block's own took five scalar
    instructions each: a third of a q4_1 block's work).
    Where the CPU has VNNI (``_vnni``), a chunk against x's planes is two vpdpbusd and a
    shift, not two vpmaddubsw, two vpmaddwd and an add: the same integer sums in the same
    lanes (one thread, in L2, on a Zen 4: q5_K 19.7 against 17.5 GB/s, q5_1 16.3 against
    14.6, q5_0 15.0 against 13.7, q6_K 21.7 against 20.7; benchmarks/README.md).
    portable: the plain vector IR even where AVX2 is there (the tests compare the two).
    vnni=False: the AVX2 sequence even where the CPU has VNNI (``benchmarks/weights.py
    --only core`` times the two)."""
    per = block_values // 32
    unroll = _NACC if per == 1 else 1  # 32-value blocks: one accumulator chain per block

    @intrinsic
    def idot(typingctx, d, p, nb, xq, xd, xs, xs16):
        def codegen(context, builder, sig, args):
            fast, avx2 = ["fast"], _avx2(context) and not portable
            use_vnni = vnni and _vnni(context) and not portable
            base = _ptr(context, builder, sig.args[0], args[0], _c(0))
            qbase, dbase, sbase, s16base = (_ptr(context, builder, sig.args[i], args[i], _c(0))
                                            for i in (3, 4, 5, 6))
            ones, high = ir.Constant(_V16S, [1] * 16), ir.Constant(_V16S, [128] * 16)
            zero8 = ir.Constant(_V8F, [0.0] * 8)
            accs = [cgutils.alloca_once_value(builder, zero8) for _ in range(_NACC)]
            lo_slot = cgutils.alloca_once_value(builder, zero8)
            lo4_slot = cgutils.alloca_once_value(builder, ir.Constant(_V4F, [0.0] * 4))

            words0 = builder.mul(args[2], _c(2 * block_values))  # x's 16-bit codes: after the planes

            def chunk_sum(x0, c, form, w):
                """<8 x i32>: w . x's codes of chunk x0 + c (both planes, or the 16-bit
                codes for "words": w = its even- and odd-indexed codes)."""
                at = builder.mul(builder.add(x0, _c(c)), _c(64))
                if form == "words":
                    xw = [_words(builder, qbase, builder.add(words0, builder.add(at, _c(o))))
                          for o in (0, 32)]
                    return builder.add(_maddwd(builder, avx2, w[0], xw[0]),
                                       _maddwd(builder, avx2, w[1], xw[1]))
                xs = [_bytes(builder, qbase, at), _bytes(builder, qbase, builder.add(at, _c(32)))]
                if use_vnni:  # 128 * (w . high plane) + w . low plane, in 32-bit lanes
                    high_sum = _dpbusd(builder, ir.Constant(_V8I, [0] * 8), w, xs[0])
                    return _dpbusd(builder, builder.shl(high_sum, ir.Constant(_V8I, [7] * 8)), w, xs[1])
                pairs = [_maddubs(builder, avx2, w, v) for v in xs]  # high and low planes
                return builder.add(_maddwd(builder, avx2, pairs[0], high),
                                   _maddwd(builder, avx2, pairs[1], ones))

            pf = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
                "llvm.prefetch.p0")

            def prefetch(blk, nbytes):
                """The lines of nbytes from _PREFETCH bytes past byte blk."""
                for k in range(-(-nbytes // 64)):
                    at = builder.gep(base, [builder.add(blk, _c(_PREFETCH + 64 * k))])
                    builder.call(pf, [at] + [ir.Constant(_I32, v) for v in (0, 3, 1)])

            def add_scaled(acc, k, isum, s):
                acc[k] = builder.fadd(acc[k], builder.fmul(builder.sitofp(isum, _V8F), s, flags=fast),
                                      flags=fast)

            def blocks(i0, n):
                """n 256-value blocks from block i0 into the accumulators."""
                acc = [builder.load(a) for a in accs]
                lo_acc = builder.load(lo_slot)
                c_all = 0
                for u in range(n):
                    i = builder.add(i0, _c(u))
                    blk = builder.add(args[1], builder.mul(i, _c(block_bytes)))
                    x0 = builder.mul(i, _c(per))
                    prefetch(blk, block_bytes)
                    chunks, lo = emit(builder, base, blk, _X(builder, dbase, sbase, s16base, x0))
                    for c, (form, w, s) in enumerate(chunks):
                        s = s if isinstance(s.type, ir.VectorType) else _splat(builder, s, 8)
                        add_scaled(acc, c_all % _NACC, chunk_sum(x0, c, form, w), s)
                        c_all += 1
                    if lo is not None:
                        lo_acc = builder.fadd(lo_acc, lo, flags=fast)
                for a, v in zip(accs + [lo_slot], acc + [lo_acc]):
                    builder.store(v, a)

            def blocks32(i0, n):
                """n <= 4 32-value blocks from block i0: scales and offsets four at a time."""
                acc = [builder.load(a) for a in accs]
                raw = []
                for u in range(n):
                    blk = builder.add(args[1], builder.mul(builder.add(i0, _c(u)), _c(block_bytes)))
                    raw.append((blk, emit(builder, base, blk)))
                prefetch(raw[0][0], n * block_bytes)
                _, _, d_off, m_off, lo_mul = raw[0][1]
                dw = _halves4(builder, base, [builder.add(blk, d_off) for blk, _ in raw])
                s4 = builder.fmul(dw, _floats4(builder, dbase, i0, n), flags=fast)
                for u, (blk, (form, w, _, _, _)) in enumerate(raw):
                    s = builder.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(_I32, 8), [u] * 8))
                    add_scaled(acc, u, chunk_sum(builder.add(i0, _c(u)), 0, form, w), s)
                for a, v in zip(accs, acc):
                    builder.store(v, a)
                if m_off is None and lo_mul is None:
                    return
                lo = _halves4(builder, base, [builder.add(blk, m_off) for blk, _ in raw]) \
                    if m_off is not None else builder.fmul(dw, ir.Constant(_V4F, [lo_mul] * 4), flags=fast)
                lo = builder.fmul(lo, _floats4(builder, sbase, i0, n), flags=fast)
                builder.store(builder.fadd(builder.load(lo4_slot), lo, flags=fast), lo4_slot)

            step = blocks32 if per == 1 else blocks
            n_main = builder.udiv(args[2], _c(unroll)) if unroll > 1 else args[2]
            with cgutils.for_range(builder, n_main) as loop:
                step(builder.mul(loop.index, _c(unroll)), unroll)
            if unroll > 1:
                with cgutils.for_range(builder, builder.urem(args[2], _c(unroll))) as loop:
                    step(builder.add(builder.mul(n_main, _c(unroll)), loop.index), 1)
            total = builder.load(accs[0])
            for a in accs[1:] + [lo_slot]:
                total = builder.fadd(total, builder.load(a), flags=fast)
            return builder.fadd(_hsum(builder, total), _hsum(builder, builder.load(lo4_slot)),
                                flags=fast)
        return types.float32(d, types.int64, types.int64, xq, xd, xs, xs16), codegen
    return idot


# type code -> (block bytes, block values, emit) of the integer dots
IDOT_BLOCKS = {
    Q8_0: (34, 32, _iemit_q8_0_words),
    Q4_0: (18, 32, lambda b, base, blk: _iemit_q4_words(b, base, blk, False)),
    Q4_1: (20, 32, lambda b, base, blk: _iemit_q4_words(b, base, blk, True)),
    Q5_0: (22, 32, lambda b, base, blk: _iemit_q5(b, base, blk, False)),
    Q5_1: (24, 32, lambda b, base, blk: _iemit_q5(b, base, blk, True)),
    Q4_K: (144, 256, _iemit_q4_k_words),
    Q5_K: (176, 256, lambda b, base, blk, x: _iemit_k4(b, base, blk, x, True)),
    Q6_K: (210, 256, _iemit_q6_k),
}
(_I_Q8_0, _I_Q4_0, _I_Q4_1, _I_Q5_0, _I_Q5_1, _I_Q4_K, _I_Q5_K,
 _I_Q6_K) = (_make_idot(*IDOT_BLOCKS[t]) for t in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K))


# ---------------------------------------------------------------- block decoders
# Each writes the values of one block at byte p of d into y[o:]: ggml's dequantize_row_*
# (float32 arithmetic in ggml's order), checked against gguf.quants.dequantize by the tests.


@njit(inline="always")
def _u16(d, p):
    return np.int64(d[p]) | (np.int64(d[p + 1]) << 8)


@njit(inline="always")
def _f16(d, p):
    return _half(_u16(d, p))


@njit(inline="always")
def _i8(b):
    return np.int64(b) - ((np.int64(b) & 128) << 1)


_Z = np.float32(0.0)


@njit(inline="always", fastmath=_FAST)
def _q8_0(d, p, y, o):
    s = _f16(d, p)
    _P_I8(y, o, d, p + 2, 0, 0, s, _Z)
    _P_I8(y, o + 16, d, p + 18, 0, 0, s, _Z)


@njit(inline="always", fastmath=_FAST)
def _q4(d, q, y, o, s, lo):
    """y = s * nibble + lo for the 16 bytes at q (low nibbles first)."""
    _P_LO(y, o, d, q, 0, 0, s, lo)
    _P_HI(y, o + 16, d, q, 0, 0, s, lo)


@njit(inline="always", fastmath=_FAST)
def _q5(d, p, q, y, o, s, lo):
    """As _q4 with bit j of the u32 at p (ggml's qh) as bit 4 of value j."""
    qh = _u16(d, p) | (_u16(d, p + 2) << 16)
    _P_Q5_LO(y, o, d, q, qh, 0, s, lo)
    _P_Q5_HI(y, o + 16, d, q, qh, 16, s, lo)


@njit(inline="always", fastmath=_FAST)
def _iq4(d, q, y, o, s):
    for j in range(16):
        b = np.int64(d[q + j])
        y[o + j] = s * _KVALUES[b & 15]
        y[o + j + 16] = s * _KVALUES[b >> 4]


@njit(inline="always")
def _scale_min_k4(j, d, p):
    """The 6-bit scale and min of sub-block j from the 12 packed bytes at p (q4_K, q5_K)."""
    if j < 4:
        return np.int64(d[p + j]) & 63, np.int64(d[p + j + 4]) & 63
    sc = (np.int64(d[p + j + 4]) & 15) | ((np.int64(d[p + j - 4]) >> 6) << 4)
    m = (np.int64(d[p + j + 4]) >> 4) | ((np.int64(d[p + j]) >> 6) << 4)
    return sc, m


@njit(inline="always", fastmath=_FAST)
def _q4_k(d, p, y, o):
    dd, dmin = _f16(d, p), _f16(d, p + 2)
    for g in range(4):  # 64 values: 32 low nibbles, 32 high nibbles of 32 bytes
        sc1, m1 = _scale_min_k4(2 * g, d, p + 4)
        sc2, m2 = _scale_min_k4(2 * g + 1, d, p + 4)
        d1, lo1 = dd * np.float32(sc1), -dmin * np.float32(m1)
        d2, lo2 = dd * np.float32(sc2), -dmin * np.float32(m2)
        q, yo = p + 16 + 32 * g, o + 64 * g
        _P_LO(y, yo, d, q, 0, 0, d1, lo1)
        _P_LO(y, yo + 16, d, q + 16, 0, 0, d1, lo1)
        _P_HI(y, yo + 32, d, q, 0, 0, d2, lo2)
        _P_HI(y, yo + 48, d, q + 16, 0, 0, d2, lo2)


@njit(inline="always", fastmath=_FAST)
def _q5_k(d, p, y, o):
    dd, dmin = _f16(d, p), _f16(d, p + 2)
    for g in range(4):
        sc1, m1 = _scale_min_k4(2 * g, d, p + 4)
        sc2, m2 = _scale_min_k4(2 * g + 1, d, p + 4)
        d1, lo1 = dd * np.float32(sc1), -dmin * np.float32(m1)
        d2, lo2 = dd * np.float32(sc2), -dmin * np.float32(m2)
        q, yo = p + 48 + 32 * g, o + 64 * g
        _P_Q5K_LO(y, yo, d, q, p + 16, 2 * g, d1, lo1)
        _P_Q5K_LO(y, yo + 16, d, q + 16, p + 32, 2 * g, d1, lo1)
        _P_Q5K_HI(y, yo + 32, d, q, p + 16, 2 * g + 1, d2, lo2)
        _P_Q5K_HI(y, yo + 48, d, q + 16, p + 32, 2 * g + 1, d2, lo2)


@njit(inline="always", fastmath=_FAST)
def _q6_k(d, p, y, o):
    dd = _f16(d, p + 208)
    for n in range(2):  # 128 values from 64 bytes of ql, 32 of qh, 8 scales
        ql, qh, sc, yo = p + 64 * n, p + 128 + 32 * n, p + 192 + 8 * n, o + 128 * n
        for h in range(2):  # 16 values each: scales sc[h], sc[h + 2], ...
            a, b, c, z = ql + 16 * h, ql + 32 + 16 * h, qh + 16 * h, yo + 16 * h
            _P_Q6_LO(y, z, d, a, c, 0, dd * np.float32(_i8(d[sc + h])), _Z)
            _P_Q6_LO(y, z + 32, d, b, c, 2, dd * np.float32(_i8(d[sc + h + 2])), _Z)
            _P_Q6_HI(y, z + 64, d, a, c, 4, dd * np.float32(_i8(d[sc + h + 4])), _Z)
            _P_Q6_HI(y, z + 96, d, b, c, 6, dd * np.float32(_i8(d[sc + h + 6])), _Z)


@njit(inline="always", fastmath=_FAST)
def _q2_k(d, p, y, o):
    dd, dmin = _f16(d, p + 80), _f16(d, p + 82)
    for n in range(2):  # 128 values from 32 bytes of 2-bit codes, 8 scale bytes
        q = p + 16 + 32 * n
        for k in range(4):  # shift 2k
            for half in range(2):
                sc = np.int64(d[p + 8 * n + 2 * k + half])
                dl, ml = dd * np.float32(sc & 15), dmin * np.float32(sc >> 4)
                yo = o + 128 * n + 32 * k + 16 * half
                for j in range(16):
                    y[yo + j] = dl * np.float32((np.int64(d[q + 16 * half + j]) >> (2 * k)) & 3) - ml


@njit(inline="always", fastmath=_FAST)
def _q3_k(d, p, y, o):
    dd = _f16(d, p + 108)
    for n in range(2):
        q = p + 32 + 32 * n
        for k in range(4):
            for half in range(2):
                i = 8 * n + 2 * k + half  # sub-block of 16 values
                lo4 = (np.int64(d[p + 96 + i]) & 15) if i < 8 else (np.int64(d[p + 96 + i - 8]) >> 4)
                hi2 = (np.int64(d[p + 104 + i % 4]) >> (2 * (i // 4))) & 3
                dl = dd * np.float32((lo4 | (hi2 << 4)) - 32)
                bit = 4 * n + k  # hmask bit of this shift
                yo = o + 128 * n + 32 * k + 16 * half
                for j in range(16):
                    l = 16 * half + j  # noqa: E741
                    c = (np.int64(d[q + l]) >> (2 * k)) & 3
                    c -= 0 if (np.int64(d[p + l]) >> bit) & 1 else 4
                    y[yo + j] = dl * np.float32(c)


@njit(inline="always", fastmath=_FAST)
def _iq4_xs(d, p, y, o):
    dd = _f16(d, p)
    sh = _u16(d, p + 2)
    for ib in range(8):
        ls = ((np.int64(d[p + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
        _iq4(d, p + 8 + 16 * ib, y, o + 32 * ib, dd * np.float32(ls - 32))


@njit(fastmath=_FAST, cache=True)
def _dequantize(code, d, p, n, y):
    """y[0:n] = the n values stored from byte p (n a multiple of the type's block size)."""
    if code == F32:
        for j in range(n):
            y[j] = bits_to_float(_u16(d, p + 4 * j) | (_u16(d, p + 4 * j + 2) << 16))
    elif code == F16:
        for j in range(n // 16):
            _f16x16(y, 16 * j, d, p + 32 * j)
        for j in range(n // 16 * 16, n):
            y[j] = _f16(d, p + 2 * j)
    elif code == BF16:
        for j in range(n):
            y[j] = bits_to_float(_u16(d, p + 2 * j) << 16)
    elif code == Q8_0:
        for b in range(n // 32):
            _q8_0(d, p + 34 * b, y, 32 * b)
    elif code == Q4_0:
        for b in range(n // 32):
            s = _f16(d, p + 18 * b)
            _q4(d, p + 18 * b + 2, y, 32 * b, s, np.float32(-8.0) * s)
    elif code == Q4_1:
        for b in range(n // 32):
            _q4(d, p + 20 * b + 4, y, 32 * b, _f16(d, p + 20 * b), _f16(d, p + 20 * b + 2))
    elif code == Q5_0:
        for b in range(n // 32):
            s = _f16(d, p + 22 * b)
            _q5(d, p + 22 * b + 2, p + 22 * b + 6, y, 32 * b, s, np.float32(-16.0) * s)
    elif code == Q5_1:
        for b in range(n // 32):
            _q5(d, p + 24 * b + 4, p + 24 * b + 8, y, 32 * b, _f16(d, p + 24 * b),
                _f16(d, p + 24 * b + 2))
    elif code == IQ4_NL:
        for b in range(n // 32):
            _iq4(d, p + 18 * b + 2, y, 32 * b, _f16(d, p + 18 * b))
    elif code == Q4_K:
        for b in range(n // 256):
            _q4_k(d, p + 144 * b, y, 256 * b)
    elif code == Q6_K:
        for b in range(n // 256):
            _q6_k(d, p + 210 * b, y, 256 * b)
    elif code == Q5_K:
        for b in range(n // 256):
            _q5_k(d, p + 176 * b, y, 256 * b)
    elif code == Q2_K:
        for b in range(n // 256):
            _q2_k(d, p + 84 * b, y, 256 * b)
    elif code == Q3_K:
        for b in range(n // 256):
            _q3_k(d, p + 110 * b, y, 256 * b)
    elif code == IQ4_XS:
        for b in range(n // 256):
            _iq4_xs(d, p + 136 * b, y, 256 * b)


# ---------------------------------------------------------------- kernels


@njit(inline="always")
def _src_row(j, hd):
    """Stored row of output row j: llama's GGUF q/k permutation undone (hd: head size)."""
    if hd == 0:
        return j
    h, r = j // hd, j % hd
    half = hd // 2
    return h * hd + 2 * (r % half) + r // half


@njit(inline="always")
def _dst_row(s, hd):
    """Output row of stored row s: the inverse of _src_row."""
    if hd == 0:
        return s
    h, r = s // hd, s % hd
    return h * hd + (r % 2) * (hd // 2) + r // 2


@njit(inline="always")
def _has_dot(code):
    return code in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)


@njit(inline="always", fastmath=_FAST)
def _dot(code, d, p, k, x, xs):
    """The dot of the k values stored from byte p with x (xs: x's sums over 16 values;
    a type _has_dot)."""
    if code == Q4_K:
        return _D_Q4_K(d, p, k // 256, x, xs)
    if code == Q6_K:
        return _D_Q6_K(d, p, k // 256, x, xs)
    if code == Q4_0:
        return _D_Q4_0(d, p, k // 32, x, xs)
    if code == Q4_1:
        return _D_Q4_1(d, p, k // 32, x, xs)
    if code == Q8_0:
        return _D_Q8_0(d, p, k // 32, x, xs)
    if code == Q5_0:
        return _D_Q5_0(d, p, k // 32, x, xs)
    if code == Q5_K:
        return _D_Q5_K(d, p, k // 256, x, xs)
    return _D_Q5_1(d, p, k // 32, x, xs)


@njit(inline="always", fastmath=_FAST)
def _idot(code, d, p, k, xq, xd, xs, xs16):
    """As _dot, on x quantized per 32 values (quantize_rows)."""
    if code == Q4_K:
        return _I_Q4_K(d, p, k // 256, xq, xd, xs, xs16)
    if code == Q6_K:
        return _I_Q6_K(d, p, k // 256, xq, xd, xs, xs16)
    if code == Q4_0:
        return _I_Q4_0(d, p, k // 32, xq, xd, xs, xs16)
    if code == Q4_1:
        return _I_Q4_1(d, p, k // 32, xq, xd, xs, xs16)
    if code == Q8_0:
        return _I_Q8_0(d, p, k // 32, xq, xd, xs, xs16)
    if code == Q5_0:
        return _I_Q5_0(d, p, k // 32, xq, xd, xs, xs16)
    if code == Q5_K:
        return _I_Q5_K(d, p, k // 256, xq, xd, xs, xs16)
    return _I_Q5_1(d, p, k // 32, xq, xd, xs, xs16)


@njit(nogil=True, fastmath=_FAST, cache=True)
def _gemv_items(flag, gen, linger, counters, d, parts, work, x, xs, xq, xd, xs32, xs16, ints, out,
                fused):
    """Claim work items (part, first row, end row) until none is left: out[:, col] = x @ row.

    fused (the hot types): each input row is dotted with the row's blocks as they are
    decoded, in registers; the row's bytes (a few KiB) stay in L1 for the next input row.
    ints[code] set: that dot in integers on x's codes (xq, xd, xs32, xs16: quantize_rows).
    Otherwise each row is dequantized whole into a buffer (L1/L2), then dotted with every
    input row; one decode call per row beat one per 256 values (measured). Either way an
    output value depends on its own input row only (batch invariance).

    xs, xq, xd, xs32, xs16 arrive unfilled (``gemv``): the first thread here fills those that
    are not empty from x (``threads.first_in``) while the others wait, a few microseconds;
    one numba call per matmul fewer than filling them first (in a decode step every call
    costs microseconds: its Python runs on a cold cache)."""
    job_begins(flag, gen)
    if first_in(counters):
        if xs.shape[1]:
            _sums16_into(x, xs)
        if xq.shape[1]:
            _quantize_into(x, xq, xd, xs32, xs16)
        first_done(counters)
    m_rows, k = x.shape
    buf = np.empty(k, dtype=np.float32)
    while True:
        w = fetch_add(counters, 0)
        if w >= work.shape[0]:
            job_ends(flag, gen, linger)
            return
        part = parts[work[w, 0]]
        off, rb, code, col0, hd = part[0], part[1], part[2], part[4], part[5]
        # The fused dots read the stored rows in file order, one stream per item (a q/k
        # part's output columns are permuted instead: reading its rows in output order
        # jumped back and forth and ran at a third of the bandwidth, measured).
        if fused and _has_dot(code) and ints[code]:
            for s in range(work[w, 1], work[w, 2]):
                p, j = off + s * rb, col0 + _dst_row(s, hd)
                for m in range(m_rows):
                    out[m, j] = _idot(code, d, p, k, xq[m], xd[m], xs32[m], xs16[m])
            fetch_add(counters, 1)
            continue
        if fused and _has_dot(code):
            for s in range(work[w, 1], work[w, 2]):
                p, j = off + s * rb, col0 + _dst_row(s, hd)
                for m in range(m_rows):
                    out[m, j] = _dot(code, d, p, k, x[m], xs[m])
            fetch_add(counters, 1)
            continue
        for j in range(work[w, 1], work[w, 2]):
            _dequantize(code, d, off + _src_row(j, hd) * rb, k, buf)
            for m in range(m_rows):
                s = np.float32(0.0)
                for i in range(k):
                    s += buf[i] * x[m, i]
                out[m, col0 + j] = s
        fetch_add(counters, 1)


@njit(nogil=True, fastmath=_FAST, cache=True)
def _dequantize_items(flag, gen, linger, counters, d, parts, work, out):
    """Claim work items (part, first row, end row): out[row - work[0, 1]] = the row's values,
    so one job fills a tile of consecutive output rows of one part."""
    job_begins(flag, gen)
    r_base = work[0, 1]
    while True:
        w = fetch_add(counters, 0)
        if w >= work.shape[0]:
            job_ends(flag, gen, linger)
            return
        part = parts[work[w, 0]]
        off, rb, code, hd = part[0], part[1], part[2], part[5]
        k = out.shape[1]
        for j in range(work[w, 1], work[w, 2]):
            _dequantize(code, d, off + _src_row(j, hd) * rb, k, out[j - r_base])
        fetch_add(counters, 1)


@njit(nogil=True, cache=True)
def _finished(counters):
    """Items finished so far (an atomic read)."""
    return load_acquire(counters, 1)


@njit(fastmath=_FAST, cache=True)
def gather_rows(d, part, ids, out):
    """out[i] = values of output row ids[i] of `part` (token embedding lookup)."""
    off, rb, code, hd = part[0], part[1], part[2], part[5]
    k = out.shape[1]
    for i in range(ids.shape[0]):
        _dequantize(code, d, off + _src_row(ids[i], hd) * rb, k, out[i])


# ---------------------------------------------------------------- threads


def _run(fn, args: tuple, n_items: int, linger: bool = True) -> None:
    """fn(flag, gen, linger, *args) on the caller's and the helper threads (args[0]: the
    counters), then wait for every item (linger: ``threads.Helpers.run``'s)."""
    helpers = pool()
    helpers.run(fn, args, min(helpers.n, n_items - 1), _wait, (args[0], n_items), linger)


def _wait(counters: np.ndarray, n_items: int) -> None:
    # A helper still on its last item may be waiting for a core (a busy machine): yield
    # to it rather than spin through its time slice.
    while _finished(counters) < n_items:
        os.sched_yield()


# ---------------------------------------------------------------- entry points


def plan_work(parts: np.ndarray, rows_per_item: int) -> np.ndarray:
    """int64 [W, 3] work items (part, first row, end row) covering every row of every part."""
    items = [(i, r, min(r + rows_per_item, int(p[3])))
             for i, p in enumerate(parts) for r in range(0, int(p[3]), rows_per_item)]
    return np.array(items, dtype=np.int64).reshape(-1, 3)


FLOAT_DOTS = np.zeros(len(TYPES), dtype=np.int8)  # gemv's ``ints`` for the float dots only
INT_DOTS = np.array([t in IDOT_BLOCKS for t in range(len(TYPES))], dtype=np.int8)  # wherever there is one


def gemv_inputs(parts: np.ndarray, ints: np.ndarray, fused: bool = True) -> tuple[bool, bool]:
    """(any part takes the integer dot, any part takes the float one) for ``gemv``: which
    forms of x it prepares (a QLinear asks once, not per call)."""
    if not fused:
        return False, False
    picked = ints[parts[:, 2]] != 0
    return bool(picked.any()), bool((~picked).any())


def gemv(data: np.ndarray, parts: np.ndarray, work: np.ndarray, x: np.ndarray,
         out: np.ndarray, fused: bool = True, ints: np.ndarray = FLOAT_DOTS,
         inputs: tuple[bool, bool] | None = None) -> None:
    """out[M, N] = x[M, K] @ W.T for the parts' rows (x, out float32 C-contiguous).
    ints: int8 [type codes], 1 where the integer dot runs (x quantized per 32 values
    first; ``kvslim.weights`` chooses by measurement), 0 for the float dot.
    fused=False: every type through the row buffer (the earlier kernel, kept as the
    baseline that tests and benchmarks/weights.py compare the fused dots against).
    inputs: ``gemv_inputs(parts, ints, fused)``, when the caller keeps it."""
    inputs = gemv_inputs(parts, ints, fused) if inputs is None else inputs
    counters = np.zeros(4, dtype=np.int64)
    _run(_gemv_items, (counters, data, parts, work, x, *x_forms(*x.shape, inputs), ints, out,
                       fused), len(work))


def x_forms(m: int, k: int, inputs: tuple[bool, bool]) -> tuple[np.ndarray, ...]:
    """(xs, xq, xd, xs32, xs16): the forms of x [M, K] a GEMV reads, unfilled
    (``_gemv_items`` fills them), 0 wide where ``inputs`` (``gemv_inputs``) needs none."""
    use_int, use_float = inputs
    nb = k // 32 if use_int else 0
    return (np.empty((m, k // 16 if use_float else 0), np.float32),
            np.zeros((m, 4 * k if use_int else 0), np.int8), np.empty((m, nb), np.float32),
            np.empty((m, nb), np.float32), np.empty((m, 2 * nb), np.float32))


def sums16(x: np.ndarray) -> np.ndarray:
    """float32 [M, K/16]: x's sums over each 16 values (a row's own, in a fixed order), as
    the float dots read them (``_gemv_items`` fills its own; this one is for callers that
    time the dots alone). Plain Python: a kernel nothing in a model calls would never be
    in the disk cache, and ``warmup.needs_compile`` would say "compiling" on every run."""
    xs = np.empty((x.shape[0], x.shape[1] // 16), dtype=np.float32)
    _sums16_into(x, xs)
    return xs


@njit(nogil=True, fastmath=_FAST, cache=True)
def _sums16_into(x, xs):
    m_rows, k = x.shape
    xs[:] = 0.0
    for m in range(m_rows):
        for i in range(k // 16 * 16):
            xs[m, i // 16] += x[m, i]


@njit(fastmath=_FAST, cache=True)
def quantize_rows(x):
    """x [M, K] float32 -> (q [M, 4K] int8, d [M, K/32], s [M, K/32], s16 [M, K/16]): each
    32 values as codes c = round(x / d) with d = max |x| / 16256, stored twice: in q's
    first 2K bytes as two int8 planes of 32 (c // 128 in [-127, 127], then c % 128 in
    [0, 127]; c = 128 * high + low), in the next 2K as int16, the 32's even-indexed codes
    then its odd-indexed ones (the order the "words" dots read their codes in); s =
    d * (the sum of the codes), s16 the same per 16 values (q6_K's scales are per 16), so
    an offset's term sums the same rounded x as the codes' (values past the last whole 32
    are left out: no type with an integer dot has them)."""
    m_rows, k = x.shape
    q = np.zeros((m_rows, 4 * k), dtype=np.int8)
    d = np.zeros((m_rows, k // 32), dtype=np.float32)
    s = np.zeros((m_rows, k // 32), dtype=np.float32)
    s16 = np.zeros((m_rows, k // 32 * 2), dtype=np.float32)
    _quantize_into(x, q, d, s, s16)
    return q, d, s, s16


@njit(nogil=True, fastmath=_FAST, cache=True)
def _quantize_into(x, q, d, s, s16):
    """quantize_rows into given arrays (q's values past the last whole 32 left as they are)."""
    m_rows, k = x.shape
    nb = k // 32
    for m in range(m_rows):
        for b in range(nb):
            amax = np.float32(0.0)
            for i in range(32 * b, 32 * b + 32):
                amax = max(amax, abs(x[m, i]))
            inv = np.float32(_X_MAX) / amax if amax > 0 else np.float32(0.0)
            tot0 = tot1 = 0
            for i in range(32):
                c = np.int32(np.rint(x[m, 32 * b + i] * inv))
                q[m, 64 * b + i] = c >> 7  # floor division by 128
                q[m, 64 * b + 32 + i] = c & 127
                w = 64 * (nb + b) + 2 * (i // 2 + 16 * (i % 2))  # int16, little-endian
                q[m, w] = c & 255
                q[m, w + 1] = c >> 8
                if i < 16:
                    tot0 += c
                else:
                    tot1 += c
            d[m, b] = amax / np.float32(_X_MAX)
            s[m, b] = d[m, b] * np.float32(tot0 + tot1)
            s16[m, 2 * b] = d[m, b] * np.float32(tot0)
            s16[m, 2 * b + 1] = d[m, b] * np.float32(tot1)


_X_MAX = 127 * 128  # the largest code of x: its high plane stays within [-127, 127]


def dequantize_rows(data: np.ndarray, parts: np.ndarray, work: np.ndarray,
                    out: np.ndarray) -> None:
    """out[r - r0] = row r of the part, for the rows the work items cover (r0: the first)."""
    counters = np.zeros(2, dtype=np.int64)
    # torch's GEMM multiplies the tile next, on every core: no helper spins meanwhile
    _run(_dequantize_items, (counters, data, parts, work, out), len(work), linger=False)
