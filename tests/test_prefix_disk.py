"""kvslim.prefix.DiskPrefixCache: the prefix cache kept as cache files, found again by a
new pool (a restarted server, KVSLIM_PREFIX_CACHE_DIR), within a disk budget."""
from __future__ import annotations

import httpx

from kvslim import kvfile
from kvslim.engine import Engine
from kvslim.prefix import DiskPrefixCache
from kvslim.sampling import SamplingParams
from kvslim.settings import ServerSettings

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
PROMPT = [1] + [(7 * i) % 250 + 3 for i in range(140)]  # 141 tokens: 2 whole pages of 64


def _engine(parts, folder, budget=2**30, kv="q8_0", model_id="tiny"):
    model, tok = parts
    engine = Engine(model, tok, cache_type_k=kv, cache_type_v=kv, num_ctx=256, page_size=64)
    engine.prefix_cache = DiskPrefixCache(64, folder, budget, model_id, engine.cache)
    return engine


def _run(engine, prompt=PROMPT):
    seq = engine.add_request(prompt, SamplingParams(max_tokens=4, **GREEDY))
    while engine.has_work():
        engine.step()
    return seq.output_ids, seq.stats.prompt_cache_count


def test_a_new_pool_restores_the_files_and_answers_the_same(tiny_parts, tmp_path):
    first = _engine(tiny_parts, tmp_path)
    answer, cached = _run(first)
    files = list(tmp_path.glob("*.kvc"))
    assert cached == 0 and len(files) == 1 and first.prefix_cache.written == 1
    assert kvfile.read(files[0]).tokens == PROMPT[:128]
    again = _engine(tiny_parts, tmp_path)  # a restart: the same model, an empty pool
    assert len(again.prefix_cache) == 0
    assert _run(again) == (answer, 128)
    assert again.prefix_cache.restored == 1 and again.prefix_cache.written == 0
    again.cache.check()
    other = _engine(tiny_parts, tmp_path, kv="f16")  # other types: the file is not used
    assert _run(other)[1] == 0 and other.prefix_cache.restored == 0
    assert len(list(tmp_path.glob("*.kvc"))) == 2  # one per type, side by side
    stranger = _engine(tiny_parts, tmp_path, model_id="another model")
    assert _run(stranger)[1] == 0 and stranger.prefix_cache.restored == 0


def test_a_longer_prompt_replaces_its_prefix_file_and_the_budget_drops_lru_first(tiny_parts, tmp_path):
    engine = _engine(tiny_parts, tmp_path)
    _run(engine, PROMPT[:70])  # one page
    _run(engine, PROMPT)  # two pages extending it: the one-page file is replaced
    files = list(tmp_path.glob("*.kvc"))
    assert [len(kvfile.read(f).tokens) for f in files] == [128]
    size = files[0].stat().st_size
    small = _engine(tiny_parts, tmp_path, budget=size + size // 2)
    other = [1] + [(11 * i) % 250 + 3 for i in range(140)]
    _run(small, other)  # a second file: over budget, the older one goes
    left = list(tmp_path.glob("*.kvc"))
    assert len(left) == 1 and kvfile.read(left[0]).tokens == other[:128]


def test_a_damaged_file_is_skipped_and_the_prompt_evaluated(tiny_parts, tmp_path):
    _run(_engine(tiny_parts, tmp_path))
    f = next(tmp_path.glob("*.kvc"))
    raw = bytearray(f.read_bytes())
    raw[-10] ^= 1
    f.write_bytes(bytes(raw))
    engine = _engine(tiny_parts, tmp_path)
    assert _run(engine)[1] == 0 and engine.prefix_cache.restored == 0
    assert engine.cache.pages_in_use == len(engine.prefix_cache.pages(engine.cache))
    engine.cache.check()


def test_settings_read_the_folder_and_budget(tmp_path):
    s = ServerSettings.from_env({"KVSLIM_PREFIX_CACHE_DIR": str(tmp_path),
                                 "KVSLIM_PREFIX_CACHE_DISK": "1GiB"})
    assert (s.prefix_cache_dir, s.prefix_cache_disk) == (str(tmp_path), 2**30)
    assert ServerSettings.from_env({}).prefix_cache_dir is None


def generate_across_a_restart(model_path, cache_dir) -> tuple[list[dict], dict]:
    """One prompt to a server keeping its prefix cache in ``cache_dir``, then the same
    prompt to a new server on that directory: ([both answers], the second's /api/ps
    kv_cache)."""
    from test_server import running_server

    settings = ServerSettings.from_env({"KVSLIM_PREFIX_CACHE_DIR": str(cache_dir)},
                                       num_parallel=1)
    body = {"model": "tiny", "prompt": "the cab " * 30, "raw": True, "stream": False,
            "options": {"num_predict": 3, "temperature": 0}}
    got = []
    for _ in range(2):
        with running_server(settings, {"tiny": model_path}) as served:
            got.append(httpx.post(served.url + "/api/generate", json=body, timeout=120).json())
            ps = httpx.get(served.url + "/api/ps").json()["models"][0]["kv_cache"]
    return got, ps


def test_server_keeps_its_prefix_cache_across_a_restart(tiny_path, tmp_path):
    got, ps = generate_across_a_restart(tiny_path, tmp_path / "pc")
    assert got[0].get("prompt_cache_count", 0) == 0 and got[1]["prompt_cache_count"] >= 64
    assert got[1]["response"] == got[0]["response"]
    assert ps["prefix_cache_files_restored"] == 1
