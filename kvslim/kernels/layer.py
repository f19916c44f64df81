"""A llama-style decode layer as one kernel job (CPU float32, GGUF weight blocks).

A decode step of a small model is mostly fixed costs: per layer four matmul jobs, the
attention job and four row ops, each a numba call from Python on a cold cache, and each
job's helper thread joins a few microseconds late. ``step_job`` runs every layer of a
step in one call that every thread enters once; each layer (``_layer``) is phases:

    0  x += y (the previous layer's output; not on the first layer), h = RMSNorm(x)
    1  qkv = h @ Wqkv.T                                 (GEMV items)
    2  RoPE on q, k; write k, v; code q                 (the first thread)
       attention over the cache                         (split-K items)
    3  merge the partials, restore -> o; a = o @ Wo.T   (first thread; GEMV items)
    4  x += a, h = RMSNorm(x); gu = h @ W13.T           (first thread; GEMV items)
    5  s = SiLU(gate) * up; y = s @ W2.T                (first thread; GEMV items)

A phase's preparation is done by the first thread to reach it (``threads.first_in``),
after every item of the phase before it has finished; its items are claimed from an
atomic counter as in every kernel job, so a helper that arrives late finds them taken
and passes through. A thread waiting for a preparation reads the next matmul's first
weight lines meanwhile (``_first_in_reading``), so that the matmul's first items find
them in cache: SmolLM2's step 0.980-0.987x the time, the 1B's 0.989x (a prototype, the
two ways alternated step by step in one process, faster in 62-86 of 100-150 pairs).

Every piece is the function the separate calls run (``rowops``,
``qmatmul._gemv_items``, ``cpu_write.write_rows``, ``cpu._attend_chunk``,
``cpu._merge_group``, the codec's ``_code_q`` / ``_restore``), compiled into the job as
its own copies (``kvslim.jit``): the results equal the separate calls' up to float32
rounding (the fastmath pieces are optimized where they are inlined), and are the same
compiled in the process or loaded from numba's disk cache, whatever the process ran
before. The engine keeps batch invariance by running a step's decode rows as a forward
of their own (``Engine._forward``): a decode row always takes this job.

No fastmath at this level: ``_code_q`` and ``_restore`` are inlined here and round as in
``cpu._attend_items``; the callees keep their own flags.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from kvslim import jit  # noqa: F401 - before any kernel compiles (kvslim.jit)
from kvslim.kernels import cpu, cpu_write, ggml, qmatmul, rowops, threads
from kvslim.kernels.cpu_write import Side
from kvslim.kernels.ggml import Geom, fetch_add, load_acquire

__all__ = ["Mat", "Attn", "step_job", "PHASES", "Q_BAD", "RES", "mat"]

# counter rows of one layer (8 int64 each: one cache line per row)
PHASES = 9
Q_BAD = 1  # res[1]: the queries' non-finite values (res[0]: the write's ggml.precheck code)
SINK = 8  # res[8]: the sum of the weight bytes read ahead (kept, so the reads are made)
RES = 16  # res's length: SINK on another cache line than the flags every thread reads


class Mat(NamedTuple):
    """One matmul of the job: ``qmatmul._gemv_items``' arguments besides x and the flags."""

    parts: np.ndarray  # [P, 6] int64 (qmatmul.PART_FIELDS)
    work: np.ndarray  # [W, 3] int64 items
    xs: np.ndarray  # [M, K/16] float32 or [M, 0]: the float dots' sums of 16
    xq: np.ndarray  # [M, 4K] int8 or [M, 0]: the integer dots' codes
    xd: np.ndarray  # [M, K/32] float32 (or 0 wide)
    xs32: np.ndarray  # [M, K/32] float32
    xs16: np.ndarray  # [M, K/16] float32
    out: np.ndarray  # [M, N] float32
    ints: np.ndarray  # int8 [type codes]: 1 where the integer dot runs (QLinear.ints)


class Attn(NamedTuple):
    """The attention phase's arguments (``cpu._attend_items`` and ``cpu._finish``')."""

    qc: np.ndarray  # [M, Hq, D] float32: the coded queries
    wk: np.ndarray  # [M, Hkv, D] float32: the rows written (rotated k)
    wv: np.ndarray  # [M, Hkv, Dv]
    slots: np.ndarray  # [M] int64
    o: np.ndarray  # [M, Hq, Dv] float32: the output, restored
    scale: np.float32
    cap: np.float32


def mat(parts: np.ndarray, work: np.ndarray, ints: np.ndarray, inputs: tuple[bool, bool],
        m: int, k: int, out: np.ndarray) -> Mat:
    """A ``Mat`` for M = m input rows of K = k values (``inputs``: ``qmatmul.gemv_inputs``;
    x's forms from ``qmatmul.x_forms``, filled in the job)."""
    return Mat(parts, work, *qmatmul.x_forms(m, k, inputs), out, ints)


@njit(inline="always")
def _first_in_reading(counters, data, parts, res):
    """``threads.first_in``; a thread that waits reads one byte a cache line of the
    matrix ``parts`` (the next matmul's, in file order from its first row) until the
    first thread's preparation is done, and adds them to res[SINK]."""
    if threads.claims_first(counters):
        return True
    acc = 0
    for p in range(parts.shape[0]):
        i, end = parts[p, 0], parts[p, 0] + parts[p, 1] * parts[p, 3]
        while i < end and not threads.prepared(counters):
            for _ in range(16):  # lines between looks at the flag
                if i < end:
                    acc += data[i]
                    i += 64
    while not threads.prepared(counters):
        pass
    res[SINK] += acc
    return False


@njit(inline="always")
def _wait_items(counters, n):
    """Every item of a phase finished (the items other threads still run: one each)."""
    while load_acquire(counters, 1) < n:
        pass


@njit(inline="always")
def _gemv(flag, counters, d, x, m):
    """One matmul's items (qmatmul._gemv_items fills x's forms first), then the barrier."""
    qmatmul._gemv_items(flag, 0, 0, counters, d, m.parts, m.work, x, m.xs, m.xq, m.xd,
                        m.xs32, m.xs16, m.ints, m.out, True)
    _wait_items(counters, m.work.shape[0])


@njit(nogil=True)
def _layer(flag, ctr, res, d, eps, x, add, h, attn_norm, ffn_norm, qkv, wo, w13, s, w2, qkv3,
           rot_heads, cos, sin, at, kplanes, vplanes, geom, job, side_k, side_v, shrinks,
           qsigns, qpre, qpost, qsize, osigns, omul, oshift, osize):
    """One decode layer on this thread (any number run it at once). x [M, d] the residual
    stream (updated in place); ``w2.out`` [M, d] holds the previous layer's output, added
    to x first (``add``; 0 on the first layer), and gets this layer's; h [M, d] and s [M, F]
    scratch. qkv3 [M, Hq+2Hkv, D]: ``qkv.out`` as heads, the first ``rot_heads`` rotated
    by cos / sin [M, R].
    ctr [PHASES, 8] zeros; res [RES] zeros: res[0] / res[Q_BAD] nonzero when the write was
    refused, and then nothing past the write ran."""
    hq, hkv = at.qc.shape[1], at.wk.shape[1]
    # 0: the residual and the norm
    if _first_in_reading(ctr[0], d, qkv.parts, res):
        if add:
            rowops._add_norm_rows(x, w2.out, attn_norm, eps, h)
        else:
            rowops._norm_rows(x, attn_norm, eps, h)
        threads.first_done(ctr[0])
    # 1: q, k, v
    _gemv(flag, ctr[1], d, h, qkv)
    # 2: the write, the queries' coding, attention
    if _first_in_reading(ctr[2], d, wo.parts, res):
        rowops._rope_rows(qkv3, rot_heads, cos, sin)
        q = qkv3[:, :hq]
        res[Q_BAD] = ggml.count_bad(q)
        if res[Q_BAD] == 0:
            at.wk[:] = qkv3[:, hq:hq + hkv]
            at.wv[:] = qkv3[:, hq + hkv:]
            res[0] = ggml.precheck(at.wk, at.wv, at.slots, geom)
            if res[0] == 0:
                cpu_write.write_rows(at.wk, at.wv, at.slots, kplanes, vplanes, geom, side_k,
                                     side_v, shrinks)
                cpu._code_q(q, at.qc, qsigns, qpre, qpost, qsize)
        threads.first_done(ctr[2])
    if res[0] != 0 or res[Q_BAD] != 0:
        return
    n_att = job.work.shape[0]
    while True:
        w = fetch_add(ctr[2], 0)
        if w >= n_att:
            break
        cpu._attend_chunk(w, at.qc, at.scale, at.cap, kplanes, vplanes, geom, job)
        fetch_add(ctr[2], 1)
    _wait_items(ctr[2], n_att)
    # 3: merge, restore, the output projection
    if _first_in_reading(ctr[3], d, wo.parts, res):
        for gi in range(job.groups.shape[0] - 1):
            cpu._merge_group(gi, at.o, geom.n_kv, job)
        cpu._restore(at.o, osigns, omul, oshift, osize)
        threads.first_done(ctr[3])
    _gemv(flag, ctr[4], d, at.o.reshape((at.o.shape[0], -1)), wo)
    # 4: the residual, the norm, gate and up
    if _first_in_reading(ctr[5], d, w13.parts, res):
        rowops._add_norm_rows(x, wo.out, ffn_norm, eps, h)
        threads.first_done(ctr[5])
    _gemv(flag, ctr[6], d, h, w13)
    # 5: SiLU(gate) * up, down
    if _first_in_reading(ctr[7], d, w2.parts, res):
        rowops._silu_mul_rows(w13.out, s)
        threads.first_done(ctr[7])
    _gemv(flag, ctr[8], d, s, w2)


@njit(nogil=True, cache=True)
def step_job(flag, gen, linger, ctr, res, d, eps, x, h, s, norms, mats, parts, works, qkv3,
             rot_heads, cos, sin, at, kplanes, vplanes, geom, job, side_k, side_v, sides,
             shrinks, coding, qsize, osize):
    """Every layer of a decode step, one after the other (``_layer``), on this thread and
    any that join (``threads.Helpers.run``'s flag, gen, linger): one call a step, so no
    per-layer dispatch (tens of microseconds for these arguments) and no helper re-entering
    from Python between layers.

    Per layer l: norms [L, 2, d] (attention, FFN), the four matmuls' parts[j][l] and
    works[j][l] in ``mats[j]`` (qkv, wo, w13, w2: x's forms and the outputs, shared by the
    layers), l's place in the cache (``geom`` of layer 0, layer l in the same planes), its
    write sides (``side_k``, ``side_v`` with sides = (K signs, K shift, K scales, V signs,
    V shift, V scales) [L, ...]) and its codec terms (coding = (q signs, pre, post, out
    signs, mul, shift) [L, ...]; qsize, osize the rotations' sizes). ctr [L, PHASES, 8]
    zeros; res [RES] zeros: a refused write stops every thread at that layer."""
    threads.job_begins(flag, gen)
    qkv, wo, w13, w2 = mats
    for layer in range(norms.shape[0]):
        g = Geom(layer, geom.n_pages, geom.n_kv, geom.page_size, geom.nb_k, geom.nb_v, geom.qk,
                 geom.tile)
        sk = Side(sides[0][layer], side_k.size, sides[1][layer], side_k.lsq, side_k.divisors,
                  sides[2][layer], side_k.scaled)
        sv = Side(sides[3][layer], side_v.size, sides[4][layer], side_v.lsq, side_v.divisors,
                  sides[5][layer], side_v.scaled)
        _layer(flag, ctr[layer], res, d, eps, x, layer > 0, h, norms[layer, 0], norms[layer, 1],
               _at(qkv, parts[0], works[0], layer), _at(wo, parts[1], works[1], layer),
               _at(w13, parts[2], works[2], layer), s, _at(w2, parts[3], works[3], layer), qkv3,
               rot_heads, cos, sin, at, kplanes, vplanes, g, job, sk, sv, shrinks,
               coding[0][layer], coding[1][layer], coding[2][layer], qsize, coding[3][layer],
               coding[4][layer], coding[5][layer], osize)
        if res[0] != 0 or res[Q_BAD] != 0:
            break
    threads.job_ends(flag, gen, linger)


@njit(inline="always")
def _at(m, parts, works, layer):
    """``m`` with layer ``layer``'s parts and work items."""
    return Mat(parts[layer], works[layer], m.xs, m.xq, m.xd, m.xs32, m.xs16, m.out, m.ints)
