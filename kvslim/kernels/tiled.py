"""Flash-style attention over decoded tiles, in plain torch: any device, any type pair.

For each sequence, K/V are decoded ``TILE`` tokens at a time (``formats.decode`` on the
tile's pages: a cache-sized scratch, never a float copy of the sequence) and attended
with a kernel that also returns the log-sum-exp of each query row, so the tiles merge
exactly:  out = sum_t exp(lse_t - lse) out_t,  lse = log sum_t exp(lse_t).

Causal masking without masks: the new rows of a step sit at positions P .. P+n-1 after
a prefix of P tokens. Every prefix tile is fully visible to every row. The new region
is cut into tiles that start at P, aligned with blocks of query rows, so a tile is
either fully visible (rows after it), invisible (rows before it), or on the diagonal,
where torch's top-left ``is_causal`` is exactly right because rows and keys start at
the same position.

On CPU the tile kernel is ``aten._scaled_dot_product_flash_attention_for_cpu`` (which
handles GQA itself); elsewhere a plain matmul/logsumexp version over bounded blocks.
"""
from __future__ import annotations

import torch

from kvslim import formats

TILE = 1024  # keys per tile: the decoded K+V tile of an 8B layer is 8 MiB
MATH_SCORES = 1 << 24  # scores per block in the generic path (64 MiB of float32)


def _tile_attn(q, k, v, causal: bool, scale: float):
    """q [1, Hq, n, D], k/v [1, Hkv, T, D] -> out [1, Hq, n, Dv], lse [1, Hq, n]."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    return _tile_math(q, k, v, causal, scale)


def _tile_math(q, k, v, causal: bool, scale: float):
    """Device-agnostic _tile_attn: explicit scores, in query blocks of bounded size."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    n, T = q.shape[2], k.shape[2]
    step = max(1, MATH_SCORES // (q.shape[1] * T))
    outs, lses = [], []
    for a in range(0, n, step):
        s = torch.matmul(q[:, :, a:a + step], k.transpose(-1, -2)) * scale  # [1, Hq, rows, T]
        if causal:  # top-left: row a+i sees keys <= a+i
            rows = torch.arange(a, min(n, a + step), device=q.device)[:, None]
            s = s.masked_fill(torch.arange(T, device=q.device)[None, :] > rows, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _decode_range(planes: dict, fmt: formats.Format, pages: torch.Tensor, page_size: int,
                  start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of one sequence from one layer's planes -> [1, Hkv, T, D] float32."""
    first, last = start // page_size, -(-end // page_size)
    idx = pages[first:last].to(torch.int64)
    tile = formats.decode({n: t[idx] for n, t in planes.items()}, fmt.name)  # [np, Hkv, S, D]
    tile = tile.transpose(0, 1).reshape(tile.shape[1], -1, tile.shape[-1])
    lo = start - first * page_size
    return tile[None, :, lo:lo + end - start]


def _merge(acc, acc_lse, out, lse) -> None:
    """Fold a tile's (out [1, H, n, Dv], lse [1, H, n]) into the running pair, in place."""
    top = torch.maximum(acc_lse, lse)
    wa, wb = torch.exp(acc_lse - top), torch.exp(lse - top)
    tot = wa + wb
    acc.mul_((wa / tot)[..., None]).add_(out * (wb / tot)[..., None])
    acc_lse.copy_(top + torch.log(tot))


def attend_sequence(q: torch.Tensor, cache, layer: int, pages: torch.Tensor, kv_len: int,
                    scale: float) -> torch.Tensor:
    """The last n = q.shape[0] rows of one sequence: q [n, Hq, D] -> [n, Hq, Dv] float32."""
    n, hq, _ = q.shape
    kp, vp = cache.layer_planes(layer)
    prefix = kv_len - n
    q4 = q.to(torch.float32).transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    acc = torch.zeros(1, hq, n, cache.v_head_dim, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((1, hq, n), float("-inf"), dtype=torch.float32, device=q.device)

    def tile(a: int, b: int):
        return (_decode_range(kp, cache.fmt_k, pages, cache.page_size, a, b),
                _decode_range(vp, cache.fmt_v, pages, cache.page_size, a, b))

    for a in range(0, prefix, TILE):  # the prefix: visible to every row
        k, v = tile(a, min(prefix, a + TILE))
        _merge(acc, acc_lse, *_tile_attn(q4, k, v, False, scale))
    for a in range(0, n, TILE):  # new keys a..b: diagonal for rows a..b, visible after
        b = min(n, a + TILE)
        k, v = tile(prefix + a, prefix + b)
        blocks = [(a, b, True)] + ([(b, n, False)] if b < n else [])
        for lo, hi, causal in blocks:
            o, lse = _tile_attn(q4[:, :, lo:hi], k, v, causal, scale)
            _merge(acc[:, :, lo:hi], acc_lse[:, :, lo:hi], o, lse)
    return acc[0].transpose(0, 1)  # [n, Hq, Dv]


def attention(q: torch.Tensor, cache, layer: int, meta, scale: float) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence (meta.q_offsets) -> [N, Hq, Dv] float32."""
    out = torch.empty(q.shape[0], q.shape[1], cache.v_head_dim, dtype=torch.float32,
                      device=q.device)
    for b in range(len(meta.seqs)):
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        out[lo:hi] = attend_sequence(q[lo:hi], cache, layer, meta.page_table.pages[b],
                                     meta.kv_lens[b], scale)
    return out


def available(device, type_k: str, type_v: str) -> str | None:
    """Pure torch: runs wherever torch does, for every registered type."""
    for t in (type_k, type_v):
        if t not in formats.FORMATS:
            return f"no format {t!r}"
    return None
