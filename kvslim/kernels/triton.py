"""Triton kernels over the paged, block-quantized cache (CUDA and ROCm).

* ``attention`` -- one flash-attention kernel for prefill and decode. A program owns one
  query block (rows x the q heads of one kv head, so K/V tiles are read once per GQA
  group) and walks its keys tile by tile through the page table, dequantizing the ggml
  blocks in registers. Long contexts with few query blocks (decode) are split along the
  keys (flash-decoding); ``_merge_kernel`` then combines the partial results by their
  log-sum-exp.
  A sliding window (a row at position p sees keys p - window + 1 .. p) limits the keys
  a block reads to its rows' windows; soft-capping (Gemma 2) maps the scores through
  cap * tanh(s / cap) before the softmax.
* ``quantize_into`` -- the fused quantize-on-write for ``KVCache.write``; bit-identical
  to ``formats.encode`` (see its docstring for the one exception, signed zeros).

Compute runs in the query's dtype (fp16 / bf16, or fp32 with IEEE dots) with fp32
accumulation. Nibble formats are never unpacked into the head order: a byte tile gives
a "low" part (values 0..15 of each block) and a "high" part (16..31), and the query and
output columns are permuted to match, so each part is one ``tl.dot``.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run
on CPU tensors; that is how the tests run without a GPU.
"""
from __future__ import annotations

import functools
import math
import types

import torch

from kvslim import formats, rounding

try:
    import triton
    import triton.language as tl
except ImportError as e:  # CPU-only installs: stay importable so available() can say why
    _IMPORT_ERROR: ImportError | None = e
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)
else:
    _IMPORT_ERROR = None

__all__ = ["Backend", "KERNEL_TYPES", "attention", "available", "native_fp8", "paged_attention",
           "quantize_into"]

# The kernels branch on ``formats.Format.code`` (a constexpr FMT): codes 0-3 (f32, f16,
# bf16, q8_0) and 9-10 (fp8_e4m3, fp8_e5m2) hold 32 values per block row, the nibble
# formats (q4_0 = 4 .. iq4_nl = 8) are read as two 16-column parts. The literal codes in
# the kernels below are these.
KERNEL_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                 "iq4_nl", "fp8_e4m3", "fp8_e5m2")
_NIBBLE_CODES = range(formats.get_format("q4_0").code, formats.get_format("iq4_nl").code + 1)
_ADA = (8, 9)  # the first NVIDIA GPUs with fp8 conversion instructions
assert all(formats.get_format(t).code == i for i, t in enumerate(KERNEL_TYPES)), \
    "the Triton kernels' literal format codes no longer match formats.Format.code"

_LOG2E = 1.4426950408889634
_PASCAL = (6, 0)


# ================================================================ device selection

def available(device, type_k: str, type_v: str) -> str | None:
    """None when these kernels can run ``type_k``/``type_v`` on ``device``, else the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the triton kernels run on CUDA and ROCm GPUs, not on {device.type}"
    try:
        import triton as _triton  # noqa: F401  (the boundary the tests mock)
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA or ROCm GPU"
    if not torch.version.hip:  # ROCm GPUs that torch runs on are all supported by triton
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < _PASCAL:
            return f"GPU sm_{major}{minor} is older than Pascal (sm_60), triton's minimum"
    missing = [t for t in (type_k, type_v) if formats.get_format(t).name not in KERNEL_TYPES]
    if missing:
        return f"no triton kernel for cache type {', '.join(missing)}"
    return None


# ================================================================ dequantize in registers

@triton.jit
def _fp8_to_float(b, FMT: tl.constexpr, FP8N: tl.constexpr):
    """uint8 fp8 bits -> float32: the GPU's own conversion (FP8N), else through float16 as
    kernels.ggml.fp8_to_half (e5m2 is an f16's top byte; e4m3 scaled by 2^8)."""
    if FP8N:
        if FMT == 9:
            return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            return b.to(tl.float8e5, bitcast=True).to(tl.float32)
    else:
        h = b.to(tl.uint16)
        if FMT == 9:
            h = ((h & 0x80) << 8) | ((h & 0x7F) << 7)
            return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
        else:
            return (h << 8).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_rows(d_ptr, m_ptr, qh_ptr, qs_ptr, lut_ptr, row, rmask,
               FMT: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
               BLOCK_N: tl.constexpr, DT: tl.constexpr, FP8N: tl.constexpr):
    """Dequantize plane rows ``row`` [BLOCK_N] (int64) -> (part0, part1), each
    [BLOCK_N, NBP*W] in DT. W = 32 (one part, head order) or 16 for nibble formats
    (part0: values 0..15 of every block, part1: values 16..31). Masked rows are 0."""
    blk = tl.arange(0, NBP)[None, :, None]
    mask = rmask[:, None, None] & (blk < NB)  # [N, NBP, 1]; NBP pads NB to a power of 2
    rb = row[:, None, None] * NB + blk  # block index in the plane, [N, NBP, 1]
    if FMT >= 9:  # fp8: 32 stored bytes per block, no block scale
        i = tl.arange(0, 32)[None, None, :]
        x = _fp8_to_float(tl.load(qs_ptr + rb * 32 + i, mask=mask, other=0), FMT, FP8N)
        a0 = tl.reshape(x, (BLOCK_N, NBP * 32)).to(DT)
        a1 = a0
    elif FMT < 4:  # f32 / f16 / bf16 / q8_0: 32 stored values per block
        i = tl.arange(0, 32)[None, None, :]
        x = tl.load(qs_ptr + rb * 32 + i, mask=mask, other=0).to(tl.float32)
        if FMT == 3:
            x = x * tl.load(d_ptr + rb, mask=mask, other=0).to(tl.float32)
        a0 = tl.reshape(x, (BLOCK_N, NBP * 32)).to(DT)
        a1 = a0
    else:
        i = tl.arange(0, 16)[None, None, :]
        byte = tl.load(qs_ptr + rb * 16 + i, mask=mask, other=0).to(tl.int32)
        lo = byte & 15
        hi = byte >> 4
        if FMT == 6 or FMT == 7:  # q5: bit j of the block's little-endian u32 = bit 4 of value j
            qh = tl.load(qh_ptr + rb, mask=mask, other=0)
            lo = lo | (((qh >> i) & 1) << 4)
            hi = hi | (((qh >> (i + 16)) & 1) << 4)
        d = tl.load(d_ptr + rb, mask=mask, other=0).to(tl.float32)
        if FMT == 8:  # iq4_nl: codebook
            xl = tl.load(lut_ptr + lo) * d
            xh = tl.load(lut_ptr + hi) * d
        elif FMT == 4:
            xl = (lo - 8).to(tl.float32) * d
            xh = (hi - 8).to(tl.float32) * d
        elif FMT == 6:
            xl = (lo - 16).to(tl.float32) * d
            xh = (hi - 16).to(tl.float32) * d
        else:  # q4_1 / q5_1: d * q + m
            m = tl.load(m_ptr + rb, mask=mask, other=0).to(tl.float32)
            xl = lo.to(tl.float32) * d + m
            xh = hi.to(tl.float32) * d + m
        a0 = tl.reshape(xl, (BLOCK_N, NBP * 16)).to(DT)
        a1 = tl.reshape(xh, (BLOCK_N, NBP * 16)).to(DT)
    return a0, a1


@triton.jit
def _head_cols(PART: tl.constexpr, W: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr):
    """Columns of a part tile -> (head-dim index, valid) [NBP*W]."""
    c = tl.arange(0, NBP * W)
    return (c // W) * 32 + PART * 16 + c % W, (c // W) < NB


# ================================================================ attention

@triton.jit
def _attn_kernel(q_ptr, sq_n, sq_h, out_ptr, so_n, so_h, part_ptr, lse_ptr,
                 kd, km, kqh, kqs, vd, vm, vqh, vqs, lut_ptr,
                 pages_ptr, s_pages, work_ptr, qk_scale, chunk, n_splits, window, cap2,
                 H_KV: tl.constexpr, G: tl.constexpr, PAGE: tl.constexpr,
                 KFMT: tl.constexpr, NBK: tl.constexpr, NBKP: tl.constexpr, KW: tl.constexpr,
                 VFMT: tl.constexpr, NBV: tl.constexpr, NBVP: tl.constexpr, VW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PARTIAL: tl.constexpr,
                 DT: tl.constexpr, PREC: tl.constexpr, FP8N: tl.constexpr,
                 SOFTCAP: tl.constexpr):
    # grid: (work items, kv heads, key splits). work row: (batch row, first packed q row,
    # rows, position of the first row, kv_len). window: keys per row (0: every key before
    # it); cap2: the soft-cap in the log2 domain (softcap * log2 e), used when SOFTCAP.
    wk = work_ptr + tl.program_id(0) * 5
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(wk)
    row0 = tl.load(wk + 1)
    nrows = tl.load(wk + 2)
    pos0 = tl.load(wk + 3)
    kvlen = tl.load(wk + 4)

    # query slot m = (row m // G, q head kvh*G + m % G)
    m = tl.arange(0, BLOCK_M)
    r = m // G
    mvalid = r < nrows
    qrow = (row0 + r).to(tl.int64)
    qhead = kvh * G + m % G
    pos = pos0 + r  # causal: row sees keys 0..pos
    qbase = q_ptr + qrow * sq_n + qhead * sq_h

    kc0, kv0 = _head_cols(0, KW, NBK, NBKP)
    q0 = tl.load(qbase[:, None] + kc0[None, :], mask=mvalid[:, None] & kv0[None, :], other=0)
    q1 = q0
    if KW == 16:
        kc1, kv1 = _head_cols(1, KW, NBK, NBKP)
        q1 = tl.load(qbase[:, None] + kc1[None, :], mask=mvalid[:, None] & kv1[None, :], other=0)
    q0 = q0.to(DT)
    q1 = q1.to(DT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, NBVP * VW], tl.float32)
    acc1 = tl.zeros([BLOCK_M, NBVP * VW], tl.float32)

    end = tl.minimum(pos0 + nrows, kvlen)  # no row of this block sees a key past end
    # nor one before the first row's window (a window group holds none there): the
    # splits divide the keys from there on
    kstart = tl.where(window > 0, tl.maximum(pos0 - window + 1, 0), 0)
    lo = kstart + split * chunk
    hi = tl.minimum(end, lo + chunk)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        page = tl.load(pages_ptr + b * s_pages + n // PAGE, mask=nmask, other=0)
        row = (page.to(tl.int64) * H_KV + kvh) * PAGE + n % PAGE  # [BLOCK_N] plane rows

        k0, k1 = _load_rows(kd, km, kqh, kqs, lut_ptr, row, nmask, KFMT, NBK, NBKP, BLOCK_N, DT, FP8N)
        s = tl.dot(q0, tl.trans(k0), input_precision=PREC)
        if KW == 16:
            s += tl.dot(q1, tl.trans(k1), input_precision=PREC)
        s = s * qk_scale  # log2 domain
        if SOFTCAP:  # cap * tanh(s / cap) on the natural scores, in the log2 domain
            s = cap2 * _tanh(s / cap2)
        ok = (n[None, :] <= pos[:, None]) & nmask[None, :]
        ok = ok & ((n[None, :] > pos[:, None] - window) | (window == 0))
        s = tl.where(ok, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v0, v1 = _load_rows(vd, vm, vqh, vqs, lut_ptr, row, nmask, VFMT, NBV, NBVP, BLOCK_N, DT, FP8N)
        pd = p.to(DT)
        acc0 = acc0 * alpha[:, None] + tl.dot(pd, v0, input_precision=PREC)
        if VW == 16:
            acc1 = acc1 * alpha[:, None] + tl.dot(pd, v1, input_precision=PREC)
        m_i = m_new

    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    if PARTIAL:  # part [N, Hq, n_splits, Dv] fp32 normalized per split, lse [N, Hq, n_splits]
        pidx = (qrow * (H_KV * G) + qhead) * n_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
        tl.store(lse_ptr + pidx, lse, mask=mvalid)
        obase = part_ptr + pidx * (NBV * 32)
    else:
        obase = out_ptr + qrow * so_n + qhead * so_h
    vc0, vv0 = _head_cols(0, VW, NBV, NBVP)
    omask = mvalid[:, None] & vv0[None, :]
    tl.store(obase[:, None] + vc0[None, :], (acc0 * inv[:, None]).to(obase.dtype.element_ty),
             mask=omask)
    if VW == 16:
        vc1, _ = _head_cols(1, VW, NBV, NBVP)  # same validity as part 0
        tl.store(obase[:, None] + vc1[None, :], (acc1 * inv[:, None]).to(obase.dtype.element_ty),
                 mask=omask)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, so_n, so_h, n_splits, HQ,
                  DV: tl.constexpr, DVP: tl.constexpr, BLOCK_S: tl.constexpr):
    """Combine split-K partials of one (row, head): out = sum_s w_s part_s / sum_s w_s."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    base = (row * HQ + h) * n_splits
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + base + s, mask=s < n_splits, other=float("-inf"))
    mx = tl.max(lse, 0)  # finite: every row sees at least one key
    total = tl.sum(tl.exp2(lse - mx), 0)
    c = tl.arange(0, DVP)
    acc = tl.zeros([DVP], tl.float32)
    for i in range(n_splits):
        w = tl.exp2(tl.load(lse_ptr + base + i) - mx)
        acc += w * tl.load(part_ptr + (base + i) * DV + c, mask=c < DV, other=0)
    dst = out_ptr + row * so_n + h * so_h + c
    tl.store(dst, (acc / total).to(out_ptr.dtype.element_ty), mask=c < DV)


@triton.jit
def _tanh(x):
    """tanh in float32 (Cephes tanhf, as kernels.cpu._tanh): an odd polynomial below
    0.625, where 1 - exp(-2|x|) would cancel, (1 - e) / (1 + e) with e = exp(-2|x|) above."""
    a = tl.abs(x)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.625, small, big)


# ---------------------------------------------------------------- launch helpers

_TL_DTYPES = {}
if _IMPORT_ERROR is None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


@functools.cache
def _lut(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """iq4_nl codebook [16] and doubled midpoints [15], float32 on ``device``."""
    v = torch.tensor(formats.IQ4NL_VALUES, dtype=torch.float32)
    return v.to(device), (v[:-1] + v[1:]).to(device)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter on CPU: a couple of splits still exercise the merge


def native_fp8(device: torch.device) -> bool:
    """True on NVIDIA GPUs with fp8 conversion instructions (sm_89 and later). ROCm's
    fp8 types differ from these (fnuz), and the interpreter has none: both take the
    float16 route, which gives the same values."""
    return (device.type == "cuda" and not torch.version.hip
            and torch.cuda.get_device_capability(device) >= _ADA)


def _plane_args(planes: dict[str, torch.Tensor], type: str) -> tuple[torch.Tensor, ...]:
    """(d, m, qh, qs) pointers for a format; absent planes repeat one that is never read."""
    for name, t in planes.items():
        if not t.is_contiguous():
            raise ValueError(f"plane {name} must be contiguous")
    qs = planes["x"] if "x" in planes else planes["qs"]
    qh = planes["qh"].view(torch.int32) if "qh" in planes else qs  # 4 bytes -> one u32 per block
    return planes.get("d", qs), planes.get("m", qs), qh, qs


def _work(step, rows_per_item: int, device: torch.device) -> torch.Tensor:
    """[W, 5] int32 work items (batch row, first packed row, rows, first position, kv_len),
    built once per step and shared by all layers through the step's scratch."""
    key = ("work", rows_per_item)
    if key not in step.scratch:
        items = []
        for b, (ql, kl, off) in enumerate(zip(step.q_lens, step.kv_lens, step.q_offsets)):
            for r0 in range(0, ql, rows_per_item):
                items.append((b, off + r0, min(rows_per_item, ql - r0), kl - ql + r0, kl))
        step.scratch[key] = torch.tensor(items, dtype=torch.int32).reshape(-1, 5).to(device)
    return step.scratch[key]


def _splits(n_programs: int, max_len: int, block_n: int, min_chunk: int,
            device: torch.device, want: int | None = None) -> tuple[int, int]:
    """(n_splits, chunk): split the keys until there are about 4 programs per SM, each
    with at least ``min_chunk`` keys, so that long single sequences still fill the GPU."""
    if want is None:
        want = min(_cdiv(4 * _num_sms(device), n_programs), _cdiv(max_len, min_chunk))
    n = max(1, want)
    chunk = _cdiv(_cdiv(max_len, n), block_n) * block_n
    return _cdiv(max_len, chunk), chunk


def _default_blocks(decode: bool, head_dim: int, group: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): decode packs only the GQA group; prefill tiles 64 x 64."""
    block_n = 32 if head_dim > 128 else 64
    if decode:
        return max(16, _pow2(group)), block_n
    return max(64, _pow2(group)), block_n


def paged_attention(q: torch.Tensor, k_planes: dict, v_planes: dict, type_k: str,
                    type_v: str, step, scale: float, *, block_m: int | None = None,
                    block_n: int | None = None, min_chunk: int = 256,
                    splits: int | None = None, num_warps: int = 4,
                    num_stages: int = 2, pages: torch.Tensor | None = None,
                    window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [N, Hq, D] packed as ``step`` says (prepared by ``Backend.prepare``); planes {name: [P, Hkv, S, nb, per]}
    -> [N, Hq, Dv] in q's dtype (fp32 for other float dtypes). ``pages``: the planes'
    page table [B, max_pages] (default ``step.page_table.pages``, the first group's).
    window: keys per query row on a sliding window (0: every key before it), the only
    ones read; softcap: scores s -> softcap * tanh(s / softcap) before the softmax (0: none).

    Block sizes, the shortest key chunk per split and the number of splits have
    defaults (not yet tuned on hardware); tests set them to reach every path on tiny
    shapes, benchmarks to compare choices."""
    fk, fv = formats.get_format(type_k).name, formats.get_format(type_v).name
    _, h_kv, page, nbk = k_planes[formats.get_format(fk).planes[0][0]].shape[:4]
    nbv = v_planes[formats.get_format(fv).planes[0][0]].shape[3]
    n_rows, hq, d = q.shape
    if d != nbk * formats.QK or hq % h_kv:
        raise ValueError(f"q {list(q.shape)} does not fit K planes of {h_kv} heads x {nbk * 32}")
    if q.dtype not in _TL_DTYPES:
        q = q.float()
    q = q.contiguous()
    out = q.new_empty(n_rows, hq, nbv * formats.QK)
    if n_rows == 0:
        return out
    group = hq // h_kv
    bm, bn = _default_blocks(step.is_decode, d, group)
    bm = max(block_m or bm, _pow2(group))
    bn = block_n or bn
    work = _work(step, bm // group, q.device)
    span = max(step.kv_lens)  # the most keys one item reads
    if window:
        span = min(span, window + bm // group - 1)
    n_splits, chunk = _splits(work.shape[0] * h_kv, span, bn, min_chunk, q.device, splits)
    partial = n_splits > 1
    if partial:
        part = q.new_empty(n_rows, hq, n_splits, nbv * formats.QK, dtype=torch.float32)
        lse = q.new_empty(n_rows, hq, n_splits, dtype=torch.float32)
    else:
        part = lse = out  # never touched
    pages = step.page_table.pages if pages is None else pages
    lut, _ = _lut(q.device)
    kw = 16 if formats.get_format(fk).code in _NIBBLE_CODES else 32
    vw = 16 if formats.get_format(fv).code in _NIBBLE_CODES else 32
    _attn_kernel[(work.shape[0], h_kv, n_splits)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1), part, lse,
        *_plane_args(k_planes, fk), *_plane_args(v_planes, fv), lut,
        pages, pages.stride(0), work, scale * _LOG2E, chunk, n_splits, window,
        softcap * _LOG2E,
        H_KV=h_kv, G=group, PAGE=page,
        KFMT=formats.get_format(fk).code, NBK=nbk, NBKP=_pow2(nbk), KW=kw,
        VFMT=formats.get_format(fv).code, NBV=nbv, NBVP=_pow2(nbv), VW=vw,
        BLOCK_M=bm, BLOCK_N=bn, PARTIAL=partial, DT=_TL_DTYPES[q.dtype],
        PREC="ieee" if q.dtype == torch.float32 else None, FP8N=native_fp8(q.device),
        SOFTCAP=softcap > 0, num_warps=num_warps, num_stages=num_stages)
    if partial:
        dv = nbv * formats.QK
        _merge_kernel[(n_rows, hq)](part, lse, out, out.stride(0), out.stride(1), n_splits, hq,
                                    DV=dv, DVP=_pow2(dv), BLOCK_S=_pow2(n_splits), num_warps=4)
    return out


def attention(q: torch.Tensor, cache, layer: int, step, scale: float, window: int = 0,
              softcap: float = 0.0) -> torch.Tensor:
    """The backend's read: q [N, Hq, D] -> [N, Hq, Dv] in q's compute dtype; on a window
    layer only its group's live pages (the rows' windows) are read."""
    k_planes, v_planes = cache.layer_planes(layer)
    return paged_attention(q, k_planes, v_planes, cache.cache_type_k, cache.cache_type_v,
                           step, scale, pages=step.layer_table(layer).pages, window=window,
                           softcap=softcap)


def write(cache, layer: int, step, k: torch.Tensor, v: torch.Tensor) -> None:
    """The backend's write: k, v coded by the cache's codec, then quantized on the device
    (both sides checked before either is written); lsq rounding is the torch
    reference's (``cache.write``), there being no Triton version of its search."""
    slots = step.layer_slots(layer)
    cache.check_rows(slots, k, v)
    codec = cache.codec
    if codec is not None:
        k, v = codec.transform_kv(layer, k, v)
        if any(r == "lsq" and rounding.supports_lsq(t) for r, t in (
                (codec.rounding_k, cache.cache_type_k), (codec.rounding_v, cache.cache_type_v))):
            cache.write(layer, slots, k, v)
            return
    if not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
        raise ValueError("K/V rows hold non-finite values (NaN or inf); "
                         "the K/V cache refuses them")
    kp, vp = cache.layer_planes(layer)
    slots = slots.to(cache.device)
    quantize_into(kp, slots, k, cache.cache_type_k, check_finite=False)
    quantize_into(vp, slots, v, cache.cache_type_v, check_finite=False)


class Backend:
    """Triton decode/prefill over the pages and quantize-on-write (CUDA, ROCm)."""

    name = "triton"

    def prepare(self, step) -> None:
        step.scratch = {}  # work lists, one per rows-per-item, made at first use

    write = staticmethod(write)
    attend = staticmethod(attention)


# ================================================================ quantize on write
#
# Mirrors formats.py operation by operation in float32: correctly rounded division
# (div_rn; triton's "/" is approximate on NVIDIA), and the launch turns off FMA
# contraction so x*id + 8.5 rounds twice, as in torch.

@triton.jit
def _trunc(x):
    return tl.where(x < 0, tl.math.ceil(x), tl.math.floor(x))


@triton.jit
def _inv(d):
    """d ? 1/d : 0."""
    return tl.where(d == 0, 0.0, tl.math.div_rn(1.0, tl.where(d == 0, 1.0, d)))


@triton.jit
def _finite(x):
    return tl.abs(x) < float("inf")  # False for NaN too


@triton.jit
def _code(t, HI: tl.constexpr):
    """formats._code: clamp to HI, non-finite codes to 0 (as an int32)."""
    return tl.where(_finite(t), tl.minimum(t, HI), 0.0).to(tl.int32)


@triton.jit
def _signed_absmax(xl, xh, j):
    """The value of largest magnitude over both halves [R, 16], first one on ties
    (torch.argmax), with its sign bit even for -0.0."""
    al = tl.abs(xl)
    ah = tl.abs(xh)
    amax = tl.maximum(tl.max(al, 1), tl.max(ah, 1))
    first = tl.minimum(tl.min(tl.where(al == amax[:, None], j[None, :], 32), 1),
                       tl.min(tl.where(ah == amax[:, None], j[None, :] + 16, 32), 1))
    neg_l = (xl.to(tl.int32, bitcast=True) < 0) & (j[None, :] == first[:, None])
    neg_h = (xh.to(tl.int32, bitcast=True) < 0) & (j[None, :] + 16 == first[:, None])
    neg = (tl.max(neg_l.to(tl.int32), 1) + tl.max(neg_h.to(tl.int32), 1)) > 0
    return tl.where(neg, -amax, amax)


@triton.jit
def _iq4_index(al, mid_ptr):
    """ggml's best_index_int8 over the codebook midpoints (a branchless binary search)."""
    x2 = al + al
    idx = tl.zeros(al.shape, tl.int32)
    for step in tl.static_range(4):
        jn = idx + (8 >> step)
        idx = tl.where(x2 >= tl.load(mid_ptr + jn - 1), jn, idx)
    return idx


@triton.jit
def _fp8_from_float(x, FMT: tl.constexpr, FP8N: tl.constexpr):
    """float32 (finite) -> uint8 fp8 bits, clamped to the largest finite value and rounded
    to nearest even: the GPU's conversion (FP8N), else kernels.ggml.fp8_from_float's
    integer rounding (normal range) and float addition (subnormal range)."""
    top = 448.0 if FMT == 9 else 57344.0
    x = tl.minimum(tl.maximum(x, -top), top)
    if FP8N:
        if FMT == 9:
            return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:
            return x.to(tl.float8e5).to(tl.uint8, bitcast=True)
    else:
        u = x.to(tl.uint32, bitcast=True)
        sign = (u >> 24) & 0x80
        a = u & 0x7FFFFFFF
        if FMT == 9:
            small, magic, shift, rebias = 121 << 23, 141 << 23, 20, 120 << 23
        else:
            small, magic, shift, rebias = 113 << 23, 134 << 23, 21, 112 << 23
        magic_f = tl.full(x.shape, magic, tl.uint32).to(tl.float32, bitcast=True)
        sub = (a.to(tl.float32, bitcast=True) + magic_f).to(tl.uint32, bitcast=True) - magic
        odd = (a >> shift) & 1
        nrm = (a - rebias + ((1 << (shift - 1)) - 1) + odd) >> shift
        r = tl.where(a < small, sub, nrm)
        return (r | sign).to(tl.uint8)


@triton.jit
def _load_x(ptrs, mask, X_BF16: tl.constexpr):
    """Rows as float32. bf16 rows arrive as int16 and widen on the bits (exact for
    subnormals too, which triton's interpreter gets wrong in its own conversion)."""
    if X_BF16:
        u = tl.load(ptrs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (u << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _quant_kernel(x_ptr, slots_ptr, d_ptr, m_ptr, qh_ptr, qs_ptr, lut_ptr, mid_ptr, n_blocks,
                  H: tl.constexpr, NB: tl.constexpr, PAGE: tl.constexpr, FMT: tl.constexpr,
                  BLOCK_R: tl.constexpr, X_BF16: tl.constexpr, FP8N: tl.constexpr):
    # t: source blocks [R] of x [n, H, NB*32]; dst: the same block in the plane layout
    t = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    tmask = t < n_blocks
    h = (t // NB) % H
    slot = tl.load(slots_ptr + t // (H * NB), mask=tmask, other=0)
    dst = ((slot // PAGE * H + h) * PAGE + slot % PAGE) * NB + t % NB
    if FMT >= 9:  # fp8, saturating as formats._FP8
        j = tl.arange(0, 32)
        x = _load_x(x_ptr + t[:, None] * 32 + j[None, :], tmask[:, None], X_BF16)
        q = _fp8_from_float(x, FMT, FP8N)
        tl.store(qs_ptr + dst[:, None] * 32 + j[None, :], q, mask=tmask[:, None])
    elif FMT < 4:
        j = tl.arange(0, 32)
        x = _load_x(x_ptr + t[:, None] * 32 + j[None, :], tmask[:, None], X_BF16)
        out = qs_ptr + dst[:, None] * 32 + j[None, :]
        if FMT == 0:
            tl.store(out, x, mask=tmask[:, None])
        elif FMT == 1:
            tl.store(out, x.to(tl.float16), mask=tmask[:, None])
        elif FMT == 2:  # round to nearest even on the bits (finite input); plane viewed as int16
            n = x.to(tl.uint32, bitcast=True)
            n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
            tl.store(out, n.to(tl.int16), mask=tmask[:, None])
        else:  # q8_0
            d = tl.math.div_rn(tl.max(tl.abs(x), 1), 127.0)
            v = x * _inv(d)[:, None]
            a = tl.abs(v)
            fl = tl.math.floor(a)
            sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
            q = _code(sign * (fl + tl.math.floor(2 * (a - fl))), 127)  # C roundf
            tl.store(d_ptr + dst, d.to(tl.float16), mask=tmask)
            tl.store(out, q.to(tl.int8), mask=tmask[:, None])
    else:
        j = tl.arange(0, 16)
        src = x_ptr + t[:, None] * 32 + j[None, :]
        xl = _load_x(src, tmask[:, None], X_BF16)  # values 0..15
        xh = _load_x(src + 16, tmask[:, None], X_BF16)  # 16..31
        if FMT == 4:  # q4_0
            d = tl.math.div_rn(_signed_absmax(xl, xh, j), -8.0)
            idd = _inv(d)[:, None]
            ql = _code(_trunc(xl * idd + 8.5), 15)
            qh = _code(_trunc(xh * idd + 8.5), 15)
        elif FMT == 6:  # q5_0
            d = tl.math.div_rn(_signed_absmax(xl, xh, j), -16.0)
            idd = _inv(d)[:, None]
            ql = _code(_trunc(xl * idd + 16.5), 31)
            qh = _code(_trunc(xh * idd + 16.5), 31)
        elif FMT == 5 or FMT == 7:  # q4_1 / q5_1
            mn = tl.minimum(tl.min(xl, 1), tl.min(xh, 1))
            rng = tl.maximum(tl.max(xl, 1), tl.max(xh, 1)) - mn
            d = tl.math.div_rn(rng, 15.0) if FMT == 5 else tl.math.div_rn(rng, 31.0)
            idd = _inv(d)[:, None]
            ql = _code(_trunc((xl - mn[:, None]) * idd + 0.5), 15 if FMT == 5 else 31)
            qh = _code(_trunc((xh - mn[:, None]) * idd + 0.5), 15 if FMT == 5 else 31)
            tl.store(m_ptr + dst, mn.to(tl.float16), mask=tmask)
        else:  # iq4_nl: codes at scale max/-127, then the weighted least-squares scale
            mx = _signed_absmax(xl, xh, j)
            tiny = tl.abs(mx) < 1e-15
            id0 = tl.math.div_rn(1.0, tl.where(tiny, 1.0, tl.math.div_rn(mx, -127.0)))
            ql = tl.where(tiny[:, None], 0, _iq4_index(id0[:, None] * xl, mid_ptr))
            qh = tl.where(tiny[:, None], 0, _iq4_index(id0[:, None] * xh, mid_ptr))
            sumqx = tl.zeros([BLOCK_R], tl.float32)
            sumq2 = tl.zeros([BLOCK_R], tl.float32)
            for jj in range(32):  # sequential sums, as the C loop
                xj = _load_x(x_ptr + t * 32 + jj, tmask, X_BF16)
                qj = tl.load(lut_ptr + tl.where(tiny, 0, _iq4_index(id0 * xj, mid_ptr)))
                wqj = xj * xj * qj
                sumqx = sumqx + wqj * xj
                sumq2 = sumq2 + wqj * qj
            pos = sumq2 > 0
            d = tl.where(pos, tl.math.div_rn(sumqx, tl.where(pos, sumq2, 1.0)), 0.0)
            d = tl.where(tiny, 0.0, d)
        tl.store(d_ptr + dst, d.to(tl.float16), mask=tmask)
        if FMT == 6 or FMT == 7:  # bit 4 of value j -> bit j of the block's u32
            bits = ((ql >> 4) & 1).to(tl.uint32) << j[None, :].to(tl.uint32)
            bits += ((qh >> 4) & 1).to(tl.uint32) << (j[None, :] + 16).to(tl.uint32)
            tl.store(qh_ptr + dst, tl.sum(bits, 1).to(tl.int32, bitcast=True), mask=tmask)
        byte = (ql & 15) | ((qh & 15) << 4)
        tl.store(qs_ptr + dst[:, None] * 16 + j[None, :], byte.to(tl.uint8), mask=tmask[:, None])


def quantize_into(planes: dict[str, torch.Tensor], slots: torch.Tensor, rows: torch.Tensor,
                  type: str, *, check_finite: bool = True, block_r: int = 64) -> None:
    """Quantize rows [n, H, D] into one layer's planes {name: [P, H, S, nb, per]} at
    slots [n] (page * S + offset); the bytes equal ``formats.encode(rows, type)``.

    One exception: a q4_1/q5_1 block whose min or max is a zero of both signs may store
    the other zero's sign in ``m``/``d`` than torch's reduction picks (same values).
    Raises ValueError (planes unchanged) on non-finite rows unless ``check_finite`` is
    False, which saves one device sync per call.
    """
    fmt = formats.get_format(type)
    first = planes[fmt.planes[0][0]]
    _, h, page, nb = first.shape[:4]
    if rows.dim() != 3 or tuple(rows.shape[1:]) != (h, nb * formats.QK):
        raise ValueError(f"rows must be [n, {h}, {nb * formats.QK}], got {list(rows.shape)}")
    rows = rows.to(first.device)
    if rows.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        rows = rows.to(torch.float32)  # float64 rounds once here, as formats.encode does
    if check_finite and not bool(torch.isfinite(rows).all()):
        raise ValueError("input holds non-finite values (NaN or inf); the K/V cache refuses them")
    n_blocks = rows.shape[0] * h * nb
    if n_blocks == 0:
        return
    d, m, qh, qs = _plane_args(planes, fmt.name)
    if fmt.name == "bf16":
        qs = qs.view(torch.int16)  # the kernel rounds on the bits
    lut, mid = _lut(rows.device)
    x_bf16 = rows.dtype == torch.bfloat16
    rows = rows.contiguous()
    _quant_kernel[(triton.cdiv(n_blocks, block_r),)](
        rows.view(torch.int16) if x_bf16 else rows,
        slots.to(device=rows.device, dtype=torch.int64).contiguous(),
        d, m, qh, qs, lut, mid, n_blocks,
        H=h, NB=nb, PAGE=page, FMT=fmt.code, BLOCK_R=block_r, X_BF16=x_bf16,
        FP8N=native_fp8(rows.device), num_warps=4, enable_fp_fusion=False)
