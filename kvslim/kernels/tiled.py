"""Flash-style attention over decoded tiles, in plain torch: any device, any type pair.

For each sequence, K/V are decoded ``TILE`` tokens at a time (``formats.decode`` on the
tile's pages: a cache-sized scratch, never a float copy of the sequence) and attended
with a kernel that also returns the log-sum-exp of each query row, so the tiles merge
exactly:  out = sum_t exp(lse_t - lse) out_t,  lse = log sum_t exp(lse_t).

Causal masking without masks: the new rows of a step sit at positions P .. P+n-1 after
a prefix of P tokens. Every prefix tile is fully visible to every row. The new region
is cut into tiles that start at P, and the tile of keys P+a .. P+b is attended by rows
a.. only, with torch's top-left ``is_causal``: row a+i sees keys P+a .. P+a+i, which is
the causal rule on the diagonal and the whole tile for rows past it.

On CPU the tile kernel is ``aten._scaled_dot_product_flash_attention_for_cpu`` (which
handles GQA itself); elsewhere, and for V rows of another width than K's, a plain
matmul/logsumexp version over bounded blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvslim import formats
from kvslim.kernels import reference

if TYPE_CHECKING:
    from kvslim.attention import Step
    from kvslim.cache import KVCache

TILE = 1024  # keys per tile: the decoded K+V tile of an 8B layer is 8 MiB
BAND_ROWS = 256  # query rows per block on a window: each block decodes its own key range
MATH_SCORES = 1 << 24  # scores per block in the generic path (64 MiB of float32)


def _tile_attn(q, k, v, causal: bool, scale: float):
    """q [1, Hq, n, D], k/v [1, Hkv, T, D] -> out [1, Hq, n, Dv], lse [1, Hq, n]."""
    if q.device.type == "cpu" and k.shape[-1] == v.shape[-1]:  # its one head size
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
    """Fold a tile's (out [1, H, n, Dv], lse [1, H, n]) into the running pair, in place.

    One pass over the big tensor (lerp): elementwise ops on it are what a prefill pays
    per tile beyond the flash kernel itself.
    """
    top = torch.maximum(acc_lse, lse)
    wa, wb = torch.exp(acc_lse - top), torch.exp(lse - top)
    acc.lerp_(out, (wb / (wa + wb)).unsqueeze(-1))
    acc_lse.copy_(top + torch.log(wa + wb))


def attend_sequence(q: torch.Tensor, cache, layer: int, pages: torch.Tensor, kv_len: int,
                    scale: float) -> torch.Tensor:
    """The last n = q.shape[0] rows of one sequence: q [n, Hq, D] -> [n, Hq, Dv] float32."""
    n = q.shape[0]
    if not bool(torch.isfinite(q).all()):
        raise ValueError("query holds non-finite values (NaN or inf)")
    kp, vp = cache.layer_planes(layer)
    prefix = kv_len - n
    q4 = q.to(torch.float32).transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    acc = acc_lse = None
    # (first key, last key, first query row, causal): prefix tiles are seen by every row;
    # a tile of new keys starting at row a is seen by rows a.. under top-left causal
    # masking, which also leaves rows past the tile unmasked.
    tiles = [(a, min(prefix, a + TILE), 0, False) for a in range(0, prefix, TILE)]
    tiles += [(prefix + a, prefix + min(n, a + TILE), a, True) for a in range(0, n, TILE)]
    for k0, k1, row, causal in tiles:
        k = _decode_range(kp, cache.fmt_k, pages, cache.page_size, k0, k1)
        v = _decode_range(vp, cache.fmt_v, pages, cache.page_size, k0, k1)
        out, lse = _tile_attn(q4[:, :, row:], k, v, causal, scale)
        if acc is None:  # the first tile covers every row
            acc, acc_lse = out, lse
        else:
            _merge(acc[:, :, row:], acc_lse[:, :, row:], out, lse)
    return acc[0].transpose(0, 1)  # [n, Hq, Dv]


def attend_banded(q: torch.Tensor, cache, layer: int, pages: torch.Tensor, kv_len: int,
                  scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """``attend_sequence`` with a sliding window and/or soft-capped scores.

    Query rows go in blocks of ``BAND_ROWS``; each block decodes only the keys its rows
    can see (the last ``window`` before each row, or all before it) and attends them with
    an explicit mask, so a block needs no merging and a windowed decode step reads at
    most ``window`` keys whatever the sequence's length.
    """
    n = q.shape[0]
    if not bool(torch.isfinite(q).all()):
        raise ValueError("query holds non-finite values (NaN or inf)")
    kp, vp = cache.layer_planes(layer)
    first = kv_len - n  # position of query row 0
    out = torch.empty(n, q.shape[1], cache.v_head_dim, dtype=torch.float32, device=q.device)
    for a in range(0, n, BAND_ROWS):
        b = min(n, a + BAND_ROWS)
        k0 = max(0, first + a - window + 1) if window else 0
        k = _decode_range(kp, cache.fmt_k, pages, cache.page_size, k0, first + b)[0]
        v = _decode_range(vp, cache.fmt_v, pages, cache.page_size, k0, first + b)[0]
        pos_q = torch.arange(first + a, first + b, device=q.device)[:, None]
        pos_k = torch.arange(k0, first + b, device=q.device)[None, :]
        allowed = pos_k <= pos_q
        if window:
            allowed &= pos_k > pos_q - window
        g = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)  # [Hq, T, D]
        s = torch.matmul(q[a:b].float().transpose(0, 1), k.transpose(1, 2)) * scale  # [Hq, r, T]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        out[a:b] = torch.matmul(p, v).transpose(0, 1)  # [r, Hq, Dv]
    return out


def attention(q: torch.Tensor, cache: "KVCache", layer: int, step: "Step",
              scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [N, Hq, D] packed by sequence (step.q_offsets) -> [N, Hq, Dv] float32.

    window: a windowed layer's keys per query (0: causal over the whole sequence);
    softcap: soft-capping of the scores (0: none)."""
    out = torch.empty(q.shape[0], q.shape[1], cache.v_head_dim, dtype=torch.float32,
                      device=q.device)
    for b in range(len(step.cache_ids)):
        lo, hi = step.q_offsets[b], step.q_offsets[b + 1]
        pages, kv_len = step.layer_table(layer).pages[b], step.kv_lens[b]
        # a window layer's pages before its window are released (-1): the banded path reads
        # only each block's window, and a sequence within its window has released none
        if (window and kv_len > window) or softcap:
            out[lo:hi] = attend_banded(q[lo:hi], cache, layer, pages, kv_len, scale, window,
                                       softcap)
        else:  # a window longer than the sequence is plain causal attention
            out[lo:hi] = attend_sequence(q[lo:hi], cache, layer, pages, kv_len, scale)
    return out


class Backend:
    """Flash attention over decoded tiles; plain-torch writes (``reference.write``)."""

    name = "tiled"

    def prepare(self, step: "Step") -> None:
        """Nothing to build: tiles are decoded per call."""

    write = staticmethod(reference.write)
    attend = staticmethod(attention)


def available(device, type_k: str, type_v: str) -> str | None:
    """Pure torch: runs wherever torch does, for every registered type."""
    for t in (type_k, type_v):
        if t not in formats.FORMATS:
            return f"no format {t!r}"
    return None
