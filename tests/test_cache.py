"""Paged K/V cache: exact sizes, interleaved sequences, fork/trim/free bookkeeping."""
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslim import formats
from kvslim.cache import CacheFull, KVCache

PAIRS = [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_1", "q5_0"), ("iq4_nl", "q5_1"),
         ("f32", "bf16")]


def make(n_pages=16, page_size=4, k="q8_0", v="q4_0", layers=2, heads=3, dim=64):
    return KVCache(layers, heads, dim, n_pages, page_size=page_size, cache_type_k=k, cache_type_v=v)


@pytest.mark.parametrize("k,v", PAIRS)
@pytest.mark.parametrize("dims", [(64, 64), (128, 64), (32, 96)])
def test_nbytes_formula(k, v, dims):
    d, dv = dims
    c = KVCache(3, 5, d, 7, page_size=16, cache_type_k=k, cache_type_v=v, v_head_dim=dv)
    cap = 7 * 16
    expected = 3 * 5 * cap * (d * formats.bytes_per_element(k) + dv * formats.bytes_per_element(v))
    assert c.nbytes == expected
    assert c.nbytes == cap * KVCache.bytes_per_token(3, 5, d, k, v, dv)


def test_no_hidden_float_copy():
    c = make(k="q4_0", v="q4_0")
    tensors = list(c.k_planes.values()) + list(c.v_planes.values())
    assert sum(t.numel() * t.element_size() for t in tensors) == c.nbytes
    assert all(t.dtype in (torch.float16, torch.uint8, torch.int8) for t in tensors)


@pytest.mark.parametrize("k,v", PAIRS)
def test_interleaved_sequences_read_back(k, v):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c = make(n_pages=40, page_size=5, k=k, v=v)
    written = {c.new_sequence(): ([], []) for _ in range(4)}
    for _ in range(25):  # append chunks of random length to random sequences
        s = rng.choice(list(written))
        n = rng.randint(1, 7)
        slots = c.reserve(s, n)
        for layer in range(c.n_layers):
            kk, vv = torch.randn(n, 3, 64) + layer, torch.randn(n, 3, 64) - layer
            c.write(layer, slots, kk, vv)
            if layer == 1:
                written[s][0].append(kk)
                written[s][1].append(vv)
    for s, (ks, vs) in written.items():
        if not ks:
            continue
        kk, vv = torch.cat(ks), torch.cat(vs)  # [T, H, D]
        got_k, got_v = c.read(1, s)  # [H, T, D]
        ref_k = formats.dequantize(formats.quantize(kk, k), k)
        ref_v = formats.dequantize(formats.quantize(vv, v), v)
        assert torch.equal(got_k.transpose(0, 1), ref_k), f"seed {seed} seq {s}"
        assert torch.equal(got_v.transpose(0, 1), ref_v), f"seed {seed} seq {s}"
        bk, bv = c.export(1, s)
        assert torch.equal(bk.transpose(0, 1), formats.quantize(kk, k))
        assert torch.equal(bv.transpose(0, 1), formats.quantize(vv, v))
    c.check()


def test_partial_read_ranges():
    c = make(page_size=4)
    s = c.new_sequence()
    x = torch.randn(11, 3, 64)
    slots = c.reserve(s, 11)
    c.write(0, slots, x, x)
    full_k, _ = c.read(0, s)
    part_k, _ = c.read(0, s, 3, 9)
    assert torch.equal(part_k, full_k[:, 3:9])
    with pytest.raises(ValueError):
        c.read(0, s, 5, 12)


def test_fork_shares_pages_and_copies_on_write():
    c = make(page_size=4)
    s = c.new_sequence()
    a = torch.randn(6, 3, 64)
    c.write(0, c.reserve(s, 6), a, a)
    f = c.fork(s)
    assert c.pages(f) == c.pages(s) and c.pages_in_use == 2
    b = torch.randn(3, 3, 64)
    c.write(0, c.reserve(f, 3), b, b)  # writes into the shared partial page: copy first
    assert c.pages(f)[0] == c.pages(s)[0] and c.pages(f)[1] != c.pages(s)[1]
    parent_k, _ = c.read(0, s)
    child_k, _ = c.read(0, f)
    assert parent_k.shape[1] == 6 and child_k.shape[1] == 9
    assert torch.equal(child_k[:, :6], parent_k)
    ref = formats.dequantize(formats.quantize(a, "q8_0"), "q8_0").transpose(0, 1)
    assert torch.equal(parent_k, ref)  # the parent never saw the child's rows
    c.check()


def test_fork_at_page_boundary_copies_nothing():
    c = make(page_size=4)
    s = c.new_sequence()
    x = torch.randn(8, 3, 64)
    c.write(0, c.reserve(s, 8), x, x)
    f = c.fork(s)
    used = c.pages_in_use
    c.reserve(f, 1)
    assert c.pages_in_use == used + 1
    assert c.pages(f)[:2] == c.pages(s)
    c.check()


def test_trim_and_free_release_pages():
    c = make(page_size=4)
    s = c.new_sequence()
    c.reserve(s, 10)
    assert c.pages_in_use == 3
    c.trim(s, 5)
    assert c.pages_in_use == 2 and c.length(s) == 5
    f = c.fork(s)
    c.trim(f, 1)
    c.free(s)
    assert c.pages_in_use == 1
    c.free(f)
    assert c.pages_in_use == 0 and c.free_pages == c.n_pages
    c.check()
    with pytest.raises(ValueError):
        c.trim(c.new_sequence(), 3)


def test_cache_full_is_clear_and_changes_nothing():
    c = make(n_pages=3, page_size=4)
    s = c.new_sequence()
    c.reserve(s, 10)
    with pytest.raises(CacheFull, match="free pages"):
        c.reserve(s, 3)
    assert c.length(s) == 10 and c.pages_in_use == 3
    c.reserve(s, 2)  # the last page still has room
    f = c.fork(s)
    with pytest.raises(CacheFull):
        c.reserve(f, 1)  # needs a page for its own copy of nothing: page is full, new page
    c.check()


def test_cow_when_pool_is_full_raises():
    c = make(n_pages=2, page_size=4)
    s = c.new_sequence()
    c.reserve(s, 6)
    f = c.fork(s)
    with pytest.raises(CacheFull):
        c.reserve(f, 1)  # the copy of the shared last page needs a free page
    assert c.length(f) == 6
    c.check()


def test_bad_construction_and_writes():
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(1, 1, 80, 4, cache_type_k="q8_0")
    with pytest.raises(ValueError, match="valid types"):
        KVCache(1, 1, 64, 4, cache_type_k="q9_9")
    c = make()
    s = c.new_sequence()
    slots = c.reserve(s, 2)
    with pytest.raises(ValueError, match=r"\[2, 3, 64\]"):
        c.write(0, slots, torch.zeros(2, 3, 32), torch.zeros(2, 3, 64))
    before = {n: t.clone() for n, t in c.k_planes.items()}
    bad = torch.zeros(2, 3, 64)
    bad[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        c.write(0, slots, bad, torch.zeros(2, 3, 64))
    assert all(torch.equal(before[n], c.k_planes[n]) for n in before)


def test_page_table():
    c = make(page_size=4)
    a, b = c.new_sequence(), c.new_sequence()
    c.reserve(a, 9)
    c.reserve(b, 2)
    pt = c.page_table([a, b])
    assert pt.lens.tolist() == [9, 2]
    assert pt.pages.tolist() == [c.pages(a), c.pages(b) + [-1, -1]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "reserve", "fork", "trim", "free"]),
                          st.integers(0, 10), st.integers(0, 12)), max_size=40))
def test_random_operations_keep_bookkeeping_consistent(ops):
    c = KVCache(1, 1, 32, 12, page_size=3, cache_type_k="q4_0", cache_type_v="q4_0")
    for op, i, n in ops:
        seqs = c.sequences
        if op == "new" or not seqs:
            c.new_sequence()
            continue
        s = seqs[i % len(seqs)]
        if op == "reserve":
            try:
                c.reserve(s, n)
            except CacheFull:
                pass
        elif op == "fork":
            c.fork(s)
        elif op == "trim":
            c.trim(s, min(n, c.length(s)))
        else:
            c.free(s)
        c.check()
    for s in c.sequences:
        c.free(s)
    c.check()
    assert c.pages_in_use == 0


def test_numba_writes_and_kernel_views_follow_a_grown_pool():
    """The CPU kernels' cached views and geometry of a layer (``ggml.plane_views``,
    ``ggml.geom``) are made again when the pool grows: rows written before and after read
    back through the new planes."""
    from kvslim.kernels import cpu_write, ggml

    c = make(n_pages=2, page_size=4, k="q8_0", v="q4_0")
    s = c.new_sequence()
    rows = [(torch.randn(8, 3, 64), torch.randn(8, 3, 64)) for _ in range(2)]
    views, geom = ggml.plane_views(c, 1), ggml.geom(c, 1)
    for i, (kk, vv) in enumerate(rows):
        if i:
            c.grow(4)
        slots = c.reserve(s, 8)
        for layer in range(c.n_layers):
            cpu_write.write(c, layer, slots, kk, vv)
    assert ggml.geom(c, 1).n_pages == 4 and geom.n_pages == 2
    assert ggml.plane_views(c, 1)[0] is not views[0]
    assert ggml.plane_views(c, 1)[0] is ggml.plane_views(c, 0)[0]  # made once per pool
    got_k, got_v = c.read(1, s)  # [H, T, D]
    kk, vv = (torch.cat(t) for t in zip(*rows))
    assert torch.equal(got_k.transpose(0, 1), formats.dequantize(formats.quantize(kk, "q8_0"), "q8_0"))
    assert torch.equal(got_v.transpose(0, 1), formats.dequantize(formats.quantize(vv, "q4_0"), "q4_0"))
