"""Cache files and the disk prefix cache of a model with sliding-window layers.

A tiny Gemma 3 (six layers on a window of 5 tokens, one global; pages of 4) saves a
sequence whose window layers released their early pages: the file holds each group's
pages still held, a fresh pool restored from it gives the saving pool's logits bit for
bit, and a prefix of the file that its window layers no longer cover is evaluated
again, never served from the wrong keys.
"""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

import tiny_models
from kvslim import kvfile
from kvslim.attention import Attention, plan_attention
from kvslim.cache import CacheFull, KVCache
from kvslim.engine import Engine, run_step
from kvslim.gguf_loader import ModelConfig, open_gguf
from kvslim.llm import LLM
from kvslim.models import load_model
from kvslim.prefix import DiskPrefixCache, PrefixCache
from kvslim.sampling import SamplingParams
from test_model import IDS

T = tiny_models.TinyGemma3()  # 7 layers (layer 5 global), head_dim 32, window 5
IDS40 = IDS + IDS[::-1]
PAGE = 4
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3kvc") / "tiny.gguf"
    tiny_models.write_gemma3(path, T)
    return path


@pytest.fixture(scope="module")
def gemma(gemma_path):
    reader = open_gguf(gemma_path)
    return load_model(reader, ModelConfig.from_gguf(reader), progress=False)


def _attn(model, cache_type: str) -> Attention:
    plan = plan_attention("cpu", model.config.head_dim, cache_type, cache_type, "auto", warn=False)
    return Attention(dataclasses.replace(plan, backend="cpu"))


def _feed(model, attn, cache, cid, ids, chunk) -> torch.Tensor:
    """Logits [len(ids), V] of ``ids`` fed to ``cid`` in chunks of ``chunk`` rows."""
    out = [run_step(model, attn, cache, [cid], [len(ids[i:i + chunk])], ids[i:i + chunk],
                    torch.arange(len(ids[i:i + chunk])))
           for i in range(0, len(ids), chunk)]
    cache.check()
    return torch.cat(out)


def _saved(gemma, tmp_path, cache_type="q8_0", n=22, chunk=5):
    """(pool, its sequence of IDS40[:n] fed in chunks, the file it was saved to)."""
    cache = gemma.new_cache(40, PAGE, cache_type, cache_type, window_pages=20)
    cid = cache.new_sequence()
    _feed(gemma, _attn(gemma, cache_type), cache, cid, IDS40[:n], chunk)
    path = tmp_path / f"{cache_type}.kvc"
    kvfile.save(path, cache, cid, IDS40[:n], "tiny")
    return cache, cid, path


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
def test_a_windowed_cache_saves_its_held_pages_and_restores_exactly(gemma, tmp_path, cache_type):
    cache, cid, path = _saved(gemma, tmp_path, cache_type)
    saved = kvfile.read(path)
    assert saved.meta["format_version"] == "2" and saved.tokens == IDS40[:22]
    # the last step fed rows 20-21: the window layers keep positions 16.. (whole pages)
    assert [(g.window, g.first) for g in saved.groups] == [(0, 0), (5, 16)]
    assert [g.layers for g in saved.groups] == [[5], [0, 1, 2, 3, 4, 6]]
    per_token = KVCache.bytes_per_token(1, 1, 32, cache_type, cache_type)
    assert saved.nbytes == kvfile.held_bytes(cache, cid) == per_token * (22 + 6 * 6)
    assert saved.nbytes < per_token * 7 * 22  # every layer holding every position
    fresh = gemma.new_cache(40, PAGE, cache_type, cache_type, window_pages=20)
    kvfile.check(saved, fresh, "tiny")
    restored = kvfile.restore(fresh, saved)
    fresh.check()
    for g in range(2):
        assert fresh.held_from(restored, g) == cache.held_from(cid, g)
        assert [p < 0 for p in fresh.pages(restored, g)] == [p < 0 for p in cache.pages(cid, g)]
    attn = _attn(gemma, cache_type)
    want = _feed(gemma, attn, cache, cid, IDS40[22:34], 3)
    got = _feed(gemma, attn, fresh, restored, IDS40[22:34], 3)
    assert torch.equal(got, want)
    fresh.free(restored)
    assert fresh.free_per_group() == fresh.pages_per_group()


def test_restore_without_window_pages_changes_nothing(gemma, tmp_path):
    _, _, path = _saved(gemma, tmp_path)
    saved = kvfile.read(path)
    assert saved.pages(PAGE) == [6, 2]  # 22 tokens: 6 pages; the window's from 16: 2
    small = gemma.new_cache(40, PAGE, "q8_0", "q8_0", window_pages=3)
    other = small.new_sequence()
    small.reserve(other, 5)  # two of the three window pages taken
    before = small.free_per_group()
    with pytest.raises(CacheFull, match="window of 5"):
        kvfile.restore(small, saved)
    assert small.free_per_group() == before and small.sequences == [other]
    small.check()
    with pytest.raises(ValueError, match="cannot grow"):
        small.grow(64)


def _pool(window_pages: int = 8) -> KVCache:
    # layers 0 and 2 on a window of 5, layer 1 global
    return KVCache(3, 1, 32, 16, page_size=PAGE, windows=[5, 0, 5], window_pages=window_pages,
                   cache_type_k="q8_0", cache_type_v="q8_0")


def test_new_held_builds_a_sequence_holding_a_window_tail_or_nothing():
    cache = _pool(window_pages=3)
    cid = cache.new_held(14, [0, 8])  # a query at 14 sees 10..13: pages 2 and 3 suffice
    assert cache.pages(cid, 1)[:2] == [-1, -1] and min(cache.pages(cid, 1)[2:]) >= 0
    assert len(cache.pages(cid, 0)) == 4 and cache.held_from(cid, 1) == 8
    cache.check()
    before = cache.free_per_group()
    for first, why in (([0, 6], "position 6"), ([0, 12], "position 12"), ([4, 8], "window of 0"),
                       ([0], "groups")):
        with pytest.raises(ValueError, match=why):
            cache.new_held(14, first)
    with pytest.raises(CacheFull, match="window of 5"):
        cache.new_held(14, [0, 4])  # three window pages, one free
    assert cache.free_per_group() == before and cache.sequences == [cid]
    cache.reserve(cid, 3)  # it grows as any sequence: its window moves on
    cache.check()


def test_unshare_last_copies_a_shared_partial_page_in_every_group():
    cache = _pool()
    a = cache.new_sequence()
    cache.reserve(a, 6)  # pages of 4: the second one partial
    rows = torch.randn(6, 1, 32)
    for layer in range(3):
        cache.write(layer, cache.slots(a, 0, 6, cache.group_index(layer)), rows, rows)
    b = cache.fork(a)
    full = cache.free_per_group()
    cache.unshare_last(b)
    assert cache.free_per_group() == [f - 1 for f in full]
    for g in range(2):
        assert cache.pages(b, g)[:-1] == cache.pages(a, g)[:-1]
        assert cache.pages(b, g)[-1] != cache.pages(a, g)[-1]
    for layer in range(3):
        assert all(torch.equal(x, y) for x, y in zip(cache.read(layer, a), cache.read(layer, b)))
    cache.check()
    tight = _pool(window_pages=2)  # no free window page: nothing changes
    t = tight.new_sequence()
    tight.reserve(t, 6)
    u = tight.fork(t)
    before = (tight.free_per_group(), tight.pages(u, 0), tight.pages(u, 1))
    with pytest.raises(CacheFull):
        tight.unshare_last(u)
    assert (tight.free_per_group(), tight.pages(u, 0), tight.pages(u, 1)) == before


def _with_meta(path, out, **meta):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    head["__metadata__"].update(meta)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return out


def test_other_windows_page_sizes_and_damaged_files_are_refused(gemma, tmp_path):
    _, _, path = _saved(gemma, tmp_path)
    saved = kvfile.read(path)

    def refused(cache, *words, file=None):
        before = cache.free_per_group()
        with pytest.raises(kvfile.KVFileError) as err:
            got = kvfile.read(file) if file is not None else saved
            kvfile.check(got, cache, "tiny")
            kvfile.restore(cache, got)
        assert all(w in str(err.value) for w in words), str(err.value)
        assert cache.free_per_group() == before and not cache.sequences

    full = KVCache(7, 1, 32, 40, page_size=PAGE, cache_type_k="q8_0", cache_type_v="q8_0")
    refused(full, "window of 5", "every position")
    moved = KVCache(7, 1, 32, 40, page_size=PAGE, cache_type_k="q8_0", cache_type_v="q8_0",
                    windows=[5, 5, 5, 5, 5, 5, 0])
    refused(moved, "layers [5] every position", "layers [6] every position")
    wider = KVCache(7, 1, 32, 40, page_size=PAGE, cache_type_k="q8_0", cache_type_v="q8_0",
                    windows=[6, 6, 6, 6, 6, 0, 6])
    refused(wider, "a window of 5", "a window of 6")
    # pages of 12: the window's rows from 16 start a page at 24, past what position 22 sees
    coarse = gemma.new_cache(10, 12, "q8_0", "q8_0", window_pages=10)
    refused(coarse, "pages of 12")
    regrouped = json.dumps([{"window": 0, "layers": [5], "first": 0},
                            {"window": 5, "layers": [0, 1, 2, 3, 4, 6], "first": 0}])
    refused(gemma.new_cache(40, PAGE, "q8_0", "q8_0"), "has shape",
            file=_with_meta(path, tmp_path / "first.kvc", groups=regrouped))
    refused(gemma.new_cache(40, PAGE, "q8_0", "q8_0"), "damaged header",
            file=_with_meta(path, tmp_path / "nogroups.kvc", groups="[]"))
    (tmp_path / "cut.kvc").write_bytes(path.read_bytes()[:-300])
    refused(gemma.new_cache(40, PAGE, "q8_0", "q8_0"), "not a readable",
            file=tmp_path / "cut.kvc")


def test_a_file_serves_only_the_prefixes_its_window_still_holds(gemma, tmp_path):
    _, _, path = _saved(gemma, tmp_path, n=30, chunk=8)  # last step from 24: window from 20
    saved = kvfile.read(path)
    assert saved.groups[1].first == 20
    # a query at M sees positions M-4..M-1: held from 20 on means M >= 24 (or all 30)
    assert [m for m in range(1, 31) if saved.can_serve(m, PAGE)] == list(range(24, 31))
    assert [m for m in range(1, 31) if saved.can_serve(m, 8)] == list(range(28, 31))


# ---------------------------------------------------------------- the engine's prefix caches


def _engine(model, folder=None, num_parallel=1) -> Engine:
    engine = Engine(model, None, num_ctx=64, num_parallel=num_parallel, page_size=PAGE,
                    max_batch_tokens=8, prefix_cache=PrefixCache(PAGE), cache_type_k="q8_0",
                    cache_type_v="q8_0")
    if folder is not None:
        engine.prefix_cache = DiskPrefixCache(PAGE, folder, 2**30, "tiny", engine.cache)
    return engine


def _run(engine, prompt, n=6):
    seq = engine.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    for _ in range(200):  # bounded: a request that is never admitted fails here
        if not engine.has_work():
            break
        engine.step()
    assert seq.finish_reason == "length"
    engine.cache.check()
    return seq.output_ids, seq.stats.prompt_cache_count


def test_disk_prefix_cache_restores_windowed_files_and_recomputes_uncovered_prefixes(gemma, tmp_path):
    """One pool writes a file, a restarted one (one sequence at a time: the restored entry
    and the request share the window pool) reuses it for a prompt that extends it, and
    evaluates a prompt that shares only a prefix its window layers released."""
    first = _engine(gemma, tmp_path)
    _, cached = _run(first, IDS40[:30])
    assert cached == 0 and first.prefix_cache.written == 1
    (file,) = tmp_path.glob("*.kvc")
    saved = kvfile.read(file)
    n = len(saved.tokens)
    assert n == 32 and saved.groups[1].first > 0 and saved.meta["groups"][1]["window"] == 5
    longer = saved.tokens + [5, 6, 7]
    again = _engine(gemma, tmp_path)
    assert _run(again, longer) == (_run(_engine(gemma), longer)[0], n)
    assert again.prefix_cache.restored == 1
    # 20 shared tokens: the file's window layers hold nothing before 28, so none is reused
    shared = IDS40[:20] + [9, 9, 9, 9, 9]
    third = _engine(gemma, tmp_path)
    assert _run(third, shared) == (_run(_engine(gemma), shared)[0], 0)
    assert third.prefix_cache.restored == 0
    # the in-memory prefix cache follows the same rule (a pool for two: nothing evicted)
    memory = _engine(gemma, num_parallel=2)
    _run(memory, IDS40[:30])
    assert _run(memory, shared)[1] == 0 and memory.prefix_cache.evictions == 0
    assert _run(memory, longer)[1] == n


def test_llm_save_and_load_a_windowed_cache_with_coding(gemma_path, tmp_path):
    """``LLM.save_cache`` / ``prompt_cache`` on a windowed model with q8_0 K / q4_0 V and the
    default coding: the restored LLM continues with the saving one's logits and answer."""
    prompt = [1] + [(7 * i) % 250 + 3 for i in range(149)]  # 150 tokens, 2 pages + 22
    rest = [(5 * i) % 250 + 3 for i in range(12)]
    kw = {"num_ctx": 256, "progress": False, "cache_type_k": "q8_0", "cache_type_v": "q4_0",
          "max_batch_tokens": 32, "num_parallel": 2}  # room for the entry and a fork
    llm = LLM(gemma_path, **kw)
    info = llm.save_cache(tmp_path / "p.kvc", prompt)
    saved = kvfile.read(tmp_path / "p.kvc")
    assert info["cache_bytes"] == saved.nbytes and saved.groups[1].first == 64
    want, answer = _continue(llm, prompt, rest), llm.generate(prompt + rest, max_tokens=5, **GREEDY)
    fresh = LLM(gemma_path, prompt_cache=tmp_path / "p.kvc", **kw)
    assert torch.equal(_continue(fresh, prompt, rest), want)
    got = fresh.generate(prompt + rest, max_tokens=5, **GREEDY)
    assert got.prompt_cache_count == len(prompt) and got.token_ids == answer.token_ids
    other = LLM(gemma_path, **(kw | {"cache_type_v": "q8_0"}))
    with pytest.raises(kvfile.KVFileError, match="K q8_0 / V q4_0"):
        other.load_cache(tmp_path / "p.kvc")
    assert other.engine.cache.free_per_group() == other.engine.cache.pages_per_group()


def _continue(llm: LLM, prefix: list[int], rest: list[int]) -> torch.Tensor:
    """Logits of ``rest`` on top of the cached ``prefix`` (reused whole), pool unchanged."""
    e = llm.engine
    before = e.cache.free_per_group()
    cid, reused = e.prefix_cache.attach(e.cache, prefix + rest)
    assert reused == len(prefix)
    out = run_step(e.model, e.attn, e.cache, [cid], [len(rest)], rest)
    e.cache.free(cid)
    assert e.cache.free_per_group() == before
    e.cache.check()
    return out


@pytest.mark.slow
def test_gemma3_cache_saved_in_one_process_restores_exactly_in_another(gemma3_gguf, tmp_path):
    """The real Gemma 3 270M (15 of 18 layers on a window of 512), q8_0 K / q4_0 V with the
    default coding, a prompt of about 700 tokens fed in chunks of 128: one process saves it
    (its window layers hold their last pages only) and the logits of a continuation;
    another restores the file and gets the same logits bit for bit.

    Both run the kernels from numba's disk cache (a first process warms it): code numba
    has just compiled in a process can differ from the same code loaded from its cache in
    the last bit of a float, so this pytest process (which may have compiled them) is not
    one of the two."""
    import subprocess
    import sys
    import textwrap

    kw = dict(num_ctx=1024, progress=False, cache_type_k="q8_0", cache_type_v="q4_0",
              max_batch_tokens=128)
    common = textwrap.dedent(f"""
        import torch
        from kvslim.engine import run_step
        from kvslim.llm import LLM
        def cont(llm, prefix, rest):
            e = llm.engine
            cid, reused = e.prefix_cache.attach(e.cache, prefix + rest)
            assert reused == len(prefix), reused
            return run_step(e.model, e.attn, e.cache, [cid], [len(rest)], rest)
        kw = {kw!r}
    """)
    save = common + textwrap.dedent(f"""
        llm = LLM({str(gemma3_gguf)!r}, **kw)
        ids = llm.tokenize("The history of the town, as the old speaker told it to us: " * 50)[:700]
        llm.save_cache({str(tmp_path / 'g.kvc')!r}, ids[:-9])
        torch.save((ids, cont(llm, ids[:-9], ids[-9:])), {str(tmp_path / 'saved.pt')!r})
    """)
    restore = common + textwrap.dedent(f"""
        ids, _ = torch.load({str(tmp_path / 'saved.pt')!r})
        llm = LLM({str(gemma3_gguf)!r}, prompt_cache={str(tmp_path / 'g.kvc')!r}, **kw)
        out = cont(llm, ids[:-9], ids[-9:])
        torch.save(out, {str(tmp_path / 'restored.pt')!r})
    """)
    warm = "from kvslim import warmup; warmup.warmup(['q8_0', 'q4_0'])"
    for script in (warm, save, restore):
        subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    ids, logits = torch.load(tmp_path / "saved.pt")
    saved = kvfile.read(tmp_path / "g.kvc")
    windowed = [g for g in saved.groups if g.window]
    assert len(ids) == 700 and windowed[0].window == 512 and windowed[0].first == 128
    full = KVCache.bytes_per_token(18, 1, 256, "q8_0", "q4_0") * 691
    assert saved.nbytes < full
    assert logits.shape == (9, 262144)
    assert torch.equal(torch.load(tmp_path / "restored.pt"), logits)
    # and in this process, whose kernels may be freshly compiled: the same to within float
    # rounding (a restore into the wrong pages or coding is off by far more than this)
    llm = LLM(gemma3_gguf, prompt_cache=tmp_path / "g.kvc", **kw)
    here = _continue(llm, ids[:-9], ids[-9:])
    kld = torch.nn.functional.kl_div(here.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1)
    assert kld.max() < 1e-3 and torch.equal(here.argmax(-1), logits.argmax(-1)), kld


def test_the_server_keeps_a_windowed_models_prefix_cache_across_a_restart(tmp_path):
    """KVSLIM_PREFIX_CACHE_DIR with a sliding-window model (it used to be ignored): the
    restarted server restores the file and reuses it for the same prompt. A window of 64,
    one server page: a finished request's whole pages are kept whatever its length (as
    Gemma 3's 512 over pages of 64)."""
    from test_prefix_disk import generate_across_a_restart

    gemma_path = tmp_path / "w64.gguf"
    tiny_models.write_gemma3(gemma_path, dataclasses.replace(T, window=64))

    got, ps = generate_across_a_restart(gemma_path, tmp_path / "pc")
    assert got[0].get("prompt_cache_count", 0) == 0 and got[1]["prompt_cache_count"] >= 64
    assert got[1]["response"] == got[0]["response"]
    assert ps["prefix_cache_files_restored"] == 1 and ps["window"] == 64
    (file,) = (tmp_path / "pc").glob("*.kvc")
    assert kvfile.read(file).meta["format_version"] == "2"
