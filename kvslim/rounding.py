"""Least-squares block scales for the K/V cache ("lsq" rounding), same block formats.

ggml's reference quantizers take the block scale from the block's largest value
(q4_0: d = max / -8). That is never the scale of least squared error: the largest value
is rarely worth its own code, and the codes chosen by a scale are best served by the
least-squares scale for those codes, d = sum(x q) / sum(q q). Like llama.cpp's iq4_nl
(``ntry``), this tries a few scales around the max-based one, refits each, and keeps
the one of least error, counting the float16 rounding of the stored d (and m). The
ggml encoding itself is one of the candidates, so a block is never worse than ggml's.

Only d (and m for the _1 types) differ: the output is ordinary ggml blocks, decoded by
every kernel and by llama.cpp unchanged. ``formats.encode`` stays byte-exact with gguf.
This module is the plain-torch reference of the search; ``kernels.cpu_write`` runs the
same search in numba as the CPU cache writes.

Candidates (a few divisors come close to a wide search at a fraction of the work:
benchmarks/README.md): q4_0 / q5_0 divisors lo *
(1.125, 1.0625, ..., 0.75) of the signed max; q8_0 divisors 127 .. 124 of the absolute
max; q4_1 / q5_1 the [min, max] range with each end pulled in by 0, 1/4 or 1/2 of a
step, then (d, m) refitted. Errors are compared in float64 from the block's sums
(sum x^2 - 2 d sum x q + d^2 sum q^2), one pass per candidate, in both versions below.
"""
from __future__ import annotations

import torch

from kvslim import formats

__all__ = ["ROUNDINGS", "LSQ_TYPES", "encode_rounded", "supports_lsq", "symmetric_divisors",
           "affine_shrinks"]

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
        out["qh"] = formats.pack_high_bits(u8)
    out["qs"] = formats.pack_nibbles(u8 & 0x0F)
    return out


def encode_rounded(x: torch.Tensor, type: str, rounding: str = "ggml") -> dict[str, torch.Tensor]:
    """``formats.encode`` with a choice of rounding: [..., n] float -> planes [..., n/32, per].

    "ggml": formats.encode itself (byte-exact with gguf). "lsq": least-squares scales for
    the types in LSQ_TYPES (others are encoded as ggml does).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    name = formats.get_format(type).name
    if rounding == "ggml" or name not in LSQ_TYPES:
        return formats.encode(x, name)
    blocks = formats.as_blocks(x)  # float32 [N, 32]; refuses non-finite input as encode does
    if name in _SYMMETRIC:
        d, q = _symmetric(blocks, name)
        planes = _planes(name, d, q)
    else:
        d, m, q = _affine(blocks, name)
        planes = _planes(name, d, q, m)
    lead, nb = x.shape[:-1], x.shape[-1] // formats.QK
    return {k: v.reshape(*lead, nb, v.shape[-1]) for k, v in planes.items()}

