"""Fused CPU (numba) and tiled (torch) attention against float64 attention over the
same stored values, and the CPU writer (``kernels.cpu_write``) against formats.encode
byte for byte.

Tolerances (relative Frobenius norm per sequence): float caches (f32/f16/bf16) 1e-5,
float32 rounding over a few thousand terms; quantized caches 1e-4, the issue's budget
(observed errors are ~1e-6 for every type: the kernels dequantize exactly, in float32).
"""
import os
import random
import threading

import numpy as np
import pytest
import torch
from test_attention_reference import float64_attention

from kvslim import formats
from kvslim.attention import Step
from kvslim.cache import KVCache
from kvslim.kernels import cpu, cpu_write, tiled

TYPES = formats.TYPES
# every type once as K and once as V, K != V; plus the plain float caches
PAIRS = [(t, TYPES[(i + 1) % len(TYPES)]) for i, t in enumerate(TYPES)] + \
    [("f32", "f32"), ("f16", "f16")]
BACKENDS = {"cpu": cpu.Backend(), "tiled": tiled.Backend()}


def tolerance(kt: str, vt: str) -> float:
    return 1e-4 if formats.is_quantized(kt) or formats.is_quantized(vt) else 1e-5


def build(kt, vt, *, hq, hkv, d, prefix, q_lens, page_size=16, seed, q_scale=1.0, dv=None):
    """A cache holding ``prefix`` tokens per sequence, then one step of ``q_lens`` new rows
    (prepared for the cpu backend; the tiled one needs nothing)."""
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    need = sum(-(-(p + n) // page_size) for p, n in zip(prefix, q_lens)) + 1
    cache = KVCache(2, hkv, d, need, page_size=page_size, cache_type_k=kt, cache_type_v=vt,
                    v_head_dim=dv)
    seqs = [cache.new_sequence() for _ in prefix]
    for s, n in zip(seqs, prefix):
        if n:
            m = Step.reserve(cache, [s], [n])
            cpu_write.write(cache, 1, m.slots, torch.randn(n, hkv, d, generator=gen),
                            torch.randn(n, hkv, dv, generator=gen))
    meta = Step.reserve(cache, seqs, q_lens)
    BACKENDS["cpu"].prepare(meta)
    n = meta.n_rows
    cpu_write.write(cache, 1, meta.slots, torch.randn(n, hkv, d, generator=gen),
                    torch.randn(n, hkv, dv, generator=gen))
    q = torch.randn(n, hq, d, generator=gen) * q_scale
    return cache, meta, q


def check(backend, cache, meta, q, seed, tol):
    scale = cache.head_dim ** -0.5
    out = BACKENDS[backend].attend(q, cache, 1, meta, scale)
    assert out.shape == (q.shape[0], q.shape[1], cache.v_head_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output from {backend}"
    for b, s in enumerate(meta.cache_ids):
        k, v = cache.read(1, s)  # the stored values, dequantized
        lo, hi = meta.q_offsets[b], meta.q_offsets[b + 1]
        ref = float64_attention(q[lo:hi].double(), k.double(), v.double(), scale)
        err = ((out[lo:hi].double() - ref).norm() / ref.norm()).item()
        assert err < tol, (f"seed {seed}: {backend} {cache.cache_type_k}/{cache.cache_type_v} "
                           f"seq {b} (kv {meta.kv_lens[b]}, q {meta.q_lens[b]}): rel err {err:.2e}")


GEOMS = [(1, 64), (3, 128), (4, 256), (8, 64)]  # (GQA ratio, head dim), cycled over the pairs


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_mixed_batch_every_type(backend, i):
    """Decode, short chunks and a long prefill (tiled routing) in one call; a length-1
    sequence; prefixes that are not multiples of the page or tile size."""
    kt, vt = PAIRS[i]
    g, d = GEOMS[i % len(GEOMS)]
    seed = random.randrange(1 << 30)
    cache, meta, q = build(kt, vt, hq=2 * g, hkv=2, d=d, prefix=[37, 0, 100, 5, 0],
                           q_lens=[1, 1, 1, 3, cpu.NUMBA_MAX_Q + 9], seed=seed)
    check(backend, cache, meta, q, seed, tolerance(kt, vt))


@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_and_head_dims(g, d):
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q8_0", "q4_0", hq=g, hkv=1, d=d, prefix=[70, 1], q_lens=[1, 2],
                           seed=seed)
    for backend in BACKENDS:
        check(backend, cache, meta, q, seed, 1e-4)


@pytest.mark.parametrize("d,dv", [(96, 96), (64, 160), (160, 32)])
def test_odd_head_dims_and_v_dim(d, dv):
    """head_dim 96 (a tile of 40 tokens) and V rows of another width than K's."""
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q8_0", "q4_0", hq=3, hkv=1, d=d, dv=dv, prefix=[150, 0],
                           q_lens=[1, cpu.NUMBA_MAX_Q + 3], page_size=64, seed=seed)
    for backend in BACKENDS:
        check(backend, cache, meta, q, seed, 1e-4)


def test_split_k_and_many_tiles(monkeypatch):
    """Long sequences: several split-K chunks in numba, several key tiles (prefix and
    diagonal) in the tiled path."""
    monkeypatch.setattr(tiled, "TILE", 96)
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q4_1", "q8_0", hq=6, hkv=2, d=64, prefix=[1200, 300, 0],
                           q_lens=[1, 120, 150], page_size=64, seed=seed)
    work, _ = cpu.plan_work(np.asarray(meta.kv_lens), [0], 2, 2)
    assert len(work) > 2  # the 1,201-token sequence is split
    for backend in BACKENDS:
        check(backend, cache, meta, q, seed, 1e-4)


@pytest.mark.parametrize("kt,vt", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"),
                                   ("q8_0", "q4_0")])
def test_batch_does_not_change_a_sequences_output(kt, vt):
    """A decode row attends with the same split-K items and merge order alone as in a
    batch of long sequences, so its output is bit-identical (greedy output must not depend
    on what else the server runs)."""
    seed = random.randrange(1 << 30)
    cache, meta, q = build(kt, vt, hq=6, hkv=3, d=64, prefix=[1500, 900, 2600],
                           q_lens=[1, 1, 1], page_size=64, seed=seed)
    batched = BACKENDS["cpu"].attend(q, cache, 1, meta, 0.125)
    for b, cid in enumerate(meta.cache_ids):
        alone = cache.fork(cid)  # the same pages; re-reserving the last slot copies its page
        cache.trim(alone, meta.kv_lens[b] - 1)
        solo = Step.reserve(cache, [alone], [1])
        BACKENDS["cpu"].prepare(solo)
        out = BACKENDS["cpu"].attend(q[b:b + 1], cache, 1, solo, 0.125)
        assert torch.equal(out, batched[b:b + 1]), f"seed {seed}: sequence {b} differs alone"
        cache.free(alone)
    cache.check()


def test_numba_chunk_rows_are_causal():
    """Rows appended after a prefix, at most NUMBA_MAX_Q of them: the numba path itself,
    with the rows of the long sequence spread over several split-K chunks."""
    seed = random.randrange(1 << 30)
    n = cpu.NUMBA_MAX_Q
    cache, meta, q = build("q5_0", "iq4_nl", hq=4, hkv=2, d=64, prefix=[45, 0, 700],
                           q_lens=[n, 1, 20], page_size=64, seed=seed)
    check("cpu", cache, meta, q, seed, 1e-4)
    st = meta.scratch
    assert not st.tiled  # every sequence ran in numba
    assert sum(st.work[:, 0] == 2) > 2  # the long one in several chunks per head


def test_sharp_softmax_stays_finite():
    """Scores in the thousands: the running max keeps exp in range."""
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q8_0", "f16", hq=4, hkv=1, d=128, prefix=[200, 3],
                           q_lens=[1, 12], seed=seed, q_scale=300.0)
    for backend in BACKENDS:
        check(backend, cache, meta, q, seed, 1e-4)


def test_tiled_device_agnostic_math(monkeypatch):
    """The matmul/logsumexp tile kernel that non-CPU devices use, in query blocks."""
    monkeypatch.setattr(tiled, "_tile_attn", tiled._tile_math)
    monkeypatch.setattr(tiled, "TILE", 64)
    monkeypatch.setattr(tiled, "MATH_SCORES", 4 * 64 * 50)  # several query blocks per tile
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q4_0", "bf16", hq=4, hkv=2, d=64, prefix=[150, 0],
                           q_lens=[130, 1], seed=seed)
    check("tiled", cache, meta, q, seed, 1e-4)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_non_finite_query_raises(backend):
    cache, meta, q = build("q8_0", "q8_0", hq=4, hkv=2, d=64, prefix=[3, 40], q_lens=[1, 12],
                           seed=0)
    q[-1, 2, 5] = float("nan")  # in the prefill rows: the tiled route inside cpu too
    with pytest.raises(ValueError, match="non-finite"):
        BACKENDS[backend].attend(q, cache, 1, meta, 0.125)


def test_rejects_mismatched_queries():
    cache, meta, q = build("q8_0", "q8_0", hq=4, hkv=2, d=64, prefix=[3], q_lens=[1], seed=0)
    with pytest.raises(ValueError, match="head_dim"):
        cpu.attention(q[:, :3], cache, 1, meta, 0.125)
    with pytest.raises(ValueError, match="rows"):
        cpu.attention(torch.cat([q, q]), cache, 1, meta, 0.125)


def test_warmup_compiles_both_kernels():
    cpu.warmup()
    assert cpu._attend_items.signatures and cpu._finish.signatures and cpu_write._write.signatures


def test_concurrent_callers_get_their_own_results():
    """Two Python threads calling at once (a server's engines) queue on the helpers."""
    jobs = [build(kt, "q8_0", hq=4, hkv=2, d=64, prefix=[500], q_lens=[1], seed=i)
            for i, kt in enumerate(("q4_0", "f16"))]
    want = [cpu.attention(q, cache, 1, meta, 0.125) for cache, meta, q in jobs]
    errors = []

    def loop(i):
        cache, meta, q = jobs[i]
        for _ in range(30):
            if not torch.equal(cpu.attention(q, cache, 1, meta, 0.125), want[i]):
                errors.append(i)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_forked_child_runs_attention():
    """The child of a fork has no helper threads (and maybe a held lock): it starts its own."""
    cache, meta, q = build("q8_0", "q4_0", hq=4, hkv=2, d=64, prefix=[300], q_lens=[1], seed=0)
    want = cpu.attention(q, cache, 1, meta, 0.125)  # helpers exist in this process now
    pid = os.fork()
    if pid == 0:  # child: exit code 0 only if the same result comes back
        ok = torch.equal(cpu.attention(q, cache, 1, meta, 0.125), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_available():
    assert cpu.available(torch.device("cpu"), "q8_0", "iq4_nl") is None
    assert "CPU only" in cpu.available(torch.device("meta"), "q8_0", "q8_0")
    assert tiled.available(torch.device("cpu"), "q4_0", "bf16") is None


# ---------------------------------------------------------------- quantize on write

def write_inputs(gen, n, h, d):
    """Random, zero, tiny, subnormal, huge, beyond-f16, ties and integer rows."""
    x = torch.randn(n, h, d, generator=gen)
    ties = x.clone()
    ties[..., ::7] = 0
    ties[..., 3] = -ties[..., 5]
    return {"random": x, "zero": torch.zeros(n, h, d), "tiny": x * 1e-30,
            "subnormal": x * 1e-41, "huge": x * 1e37, "f16 overflow": x * 7e4, "ties": ties,
            "integers": torch.randint(-20, 20, (n, h, d), generator=gen).float(),
            "mixed scales": x * torch.logspace(-20, 20, n)[:, None, None]}


@pytest.mark.parametrize("t", TYPES)
def test_write_is_byte_identical_to_encode(t):
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    for name, x in write_inputs(gen, 40, 3, 64).items():
        cache = KVCache(2, 3, 64, 4, page_size=16, cache_type_k=t, cache_type_v="q4_0")
        s = cache.new_sequence()
        slots = cache.reserve(s, 40)
        v = x.flip(0).to(torch.bfloat16)  # any floating dtype is accepted, as encode does
        cpu_write.write(cache, 1, slots, x, v)
        got_k, got_v = cache.export(1, s)  # [H, T, bytes]
        want_k = formats.quantize(x, t).transpose(0, 1)
        want_v = formats.quantize(v, "q4_0").transpose(0, 1)
        assert torch.equal(got_k, want_k), f"seed {seed}: {t} K bytes differ on {name} rows"
        assert torch.equal(got_v, want_v), f"seed {seed}: q4_0 V bytes differ on {name} rows"
        assert all(not p[0].any() for p in cache.k_planes.values()), "wrote into another layer"


def snapshot(cache):
    return [t.clone() for t in (*cache.k_planes.values(), *cache.v_planes.values())]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("side", ["k", "v"])
def test_non_finite_rows_are_refused_cache_unchanged(bad, side):
    cache = KVCache(1, 2, 64, 4, page_size=8, cache_type_k="q8_0", cache_type_v="q4_0")
    s = cache.new_sequence()
    slots = cache.reserve(s, 5)
    cpu_write.write(cache, 0, slots, torch.randn(5, 2, 64), torch.randn(5, 2, 64))
    before = snapshot(cache)
    k, v = torch.randn(5, 2, 64), torch.randn(5, 2, 64)
    (k if side == "k" else v)[3, 1, 17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        cpu_write.write(cache, 0, slots, k, v)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(cache)))


def test_slot_outside_pool_is_refused_cache_unchanged():
    cache = KVCache(1, 2, 32, 2, page_size=4, cache_type_k="q8_0", cache_type_v="q8_0")
    before = snapshot(cache)
    with pytest.raises(IndexError):
        cpu_write.write(cache, 0, torch.tensor([1, 8]), torch.randn(2, 2, 32),
                        torch.randn(2, 2, 32))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(cache)))


def _decode_step(kt, vt, seed, hkv=2, hq=8, d=64):
    """A cache of three sequences (40, 0 and 17 tokens written) and a step of 1, 3 and 1
    new rows reserved but not written: (cache, step, q, k, v)."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(2, hkv, d, 16, page_size=16, cache_type_k=kt, cache_type_v=vt)
    seqs = [cache.new_sequence() for _ in range(3)]
    for s, n in zip(seqs, [40, 0, 17]):
        if n:
            m = Step.reserve(cache, [s], [n])
            cpu_write.write(cache, 1, m.slots, torch.randn(n, hkv, d, generator=gen),
                            torch.randn(n, hkv, d, generator=gen))
    step = Step.reserve(cache, seqs, [1, 3, 1])
    BACKENDS["cpu"].prepare(step)
    n = step.n_rows
    return (cache, step, torch.randn(n, hq, d, generator=gen),
            torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen))


@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "f16"), ("q5_1", "q4_1")])
def test_write_attend_is_the_write_then_the_attention(kt, vt):
    """The CPU backend's one job (the step's rows written by the first thread in, then
    the items): the same cache bytes and the same output as the two calls."""
    seed = random.randrange(1 << 30)
    got = []
    for fused in (False, True):
        cache, step, q, k, v = _decode_step(kt, vt, seed)
        backend = BACKENDS["cpu"]
        if fused:
            out = backend.write_attend(q, k, v, cache, 1, step, 0.125)
        else:
            backend.write(cache, 1, step, k, v)
            out = backend.attend(q, cache, 1, step, 0.125)
        got.append((out, snapshot(cache)))
    (a, sa), (b, sb) = got
    assert torch.equal(a, b), f"seed {seed}"
    assert all(torch.equal(x, y) for x, y in zip(sa, sb)), f"seed {seed}"


@pytest.mark.parametrize("side", ["k", "v", "q"])
def test_write_attend_refuses_non_finite_rows_cache_unchanged(side):
    cache, step, q, k, v = _decode_step("q8_0", "q4_0", 7)
    before = snapshot(cache)
    {"k": k, "v": v, "q": q}[side][2, 1, 17] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        BACKENDS["cpu"].write_attend(q, k, v, cache, 1, step, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(cache)))
    k[2, 1, 17] = v[2, 1, 17] = q[2, 1, 17] = 0.5  # then the same step goes through
    assert torch.isfinite(BACKENDS["cpu"].write_attend(q, k, v, cache, 1, step, 0.125)).all()


# ---------------------------------------------------------------- exhaustive (slow)

@pytest.mark.slow
@pytest.mark.parametrize("kt", TYPES)
@pytest.mark.parametrize("vt", TYPES)
def test_every_pair_every_geometry(kt, vt):
    for g, d in [(1, 64), (3, 64), (4, 128), (8, 256)]:
        seed = random.randrange(1 << 30)
        cache, meta, q = build(kt, vt, hq=2 * g, hkv=2, d=d, prefix=[300, 0, 64, 1],
                               q_lens=[1, 1, 7, 40], seed=seed)
        for backend in BACKENDS:
            check(backend, cache, meta, q, seed, tolerance(kt, vt))


@pytest.mark.slow
def test_long_prefill_after_prefix():
    seed = random.randrange(1 << 30)
    cache, meta, q = build("q8_0", "q8_0", hq=9, hkv=3, d=64, prefix=[3000, 17],
                           q_lens=[1100, 1], page_size=64, seed=seed)
    for backend in BACKENDS:
        check(backend, cache, meta, q, seed, 1e-4)
