"""--kv-cache-type auto: the choice from a quality table (a fake one makes it predictable),
the table measured once per model and kept beside the store, and the choice through LLM,
the server (settings, request options, /api/ps, a memory budget), `kvslim plan` and the
CLI; on SmolLM2 (slow) the real table at the default budget."""
from __future__ import annotations

import httpx
import pytest
import torch

from kvslim import calibration
from kvslim.autotype import DEFAULT_MAX_KLD, NothingFits, choose_auto, parse_max_kld
from kvslim.settings import ServerSettings, resolve_cache_types, resolve_max_kld

# bytes per 32 values; a fake model of one value per token per type keeps sums readable
BLOCK = {"f16": 64, "q8_0": 34, "fp8_e4m3": 32, "q5_0": 22, "q4_0": 18}
FAKE = {"q8_0/q8_0": 0.0004, "fp8_e4m3/fp8_e4m3": 0.0020, "q8_0/q4_0": 0.0040,
        "q5_0/q5_0": 0.0060, "q4_0/q4_0": 0.0200}


def per_token(k, v):
    return BLOCK[k] + BLOCK[v]


def test_fewest_bytes_within_the_budget():
    assert (c := choose_auto(FAKE, 0.005, per_token)).type_k == "q8_0" and c.type_v == "q4_0"
    assert (c.kld, c.bytes_per_token, c.candidates) == (0.0040, 52, 6)
    assert choose_auto(FAKE, 0.003, per_token).type_k == "fp8_e4m3"
    c = choose_auto(FAKE, 0.1, per_token)
    assert (c.type_k, c.type_v) == ("q4_0", "q4_0")
    c = choose_auto(FAKE, 0.0, per_token)  # nothing quantized is within 0: f16 always is
    assert (c.type_k, c.type_v, c.kld) == ("f16", "f16", 0.0)


def test_equal_bytes_take_the_lower_kld():
    table = {"q4_0/q4_0": 0.003, "iq4_nl/iq4_nl": 0.002}
    assert choose_auto(table, 0.01, lambda k, v: 128 if k == "f16" else 36).type_k == "iq4_nl"


def test_a_memory_budget_takes_the_best_quality_that_fits_or_says_none_does():
    c = choose_auto(FAKE, 0.005, per_token, max_bytes_per_token=66)
    assert (c.type_k, c.type_v) == ("fp8_e4m3", "fp8_e4m3")  # q8_0/q8_0 (68) does not fit
    c = choose_auto(FAKE, 0.005, per_token, max_bytes_per_token=1000)
    assert (c.type_k, c.type_v) == ("f16", "f16")  # room for the best: f16 itself
    with pytest.raises(NothingFits, match=r"K q8_0 / V q4_0 .*needs 52 bytes per token.*allows 40"):
        choose_auto(FAKE, 0.005, per_token, max_bytes_per_token=40)


@pytest.mark.parametrize("bad", ["x", "-1", "inf", "nan", None])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="kv_max_kld"):
        parse_max_kld(bad)


def test_settings(monkeypatch):
    assert resolve_cache_types("auto") == ("auto", "auto")
    assert resolve_cache_types(None, env={"KVSLIM_KV_CACHE_TYPE": "AUTO"}) == ("auto", "auto")
    with pytest.raises(ValueError, match="auto chooses K and V together"):
        resolve_cache_types("auto", cache_type_v="q4_0")
    assert resolve_max_kld(None, env={}) == DEFAULT_MAX_KLD
    assert resolve_max_kld(None, env={"KVSLIM_KV_MAX_KLD": "0.01"}) == 0.01
    assert resolve_max_kld(0.02, env={"KVSLIM_KV_MAX_KLD": "0.01"}) == 0.02
    with pytest.raises(ValueError, match="kv_max_kld"):
        ServerSettings.from_env({"KVSLIM_KV_MAX_KLD": "lots"})
    s = ServerSettings.from_env({"KVSLIM_KV_CACHE_TYPE": "auto"}, kv_max_kld="0.003")
    assert (s.cache_type_k, s.kv_max_kld) == ("auto", 0.003)


# ---------------------------------------------------------------- through the model

@pytest.fixture
def fake_table(monkeypatch):
    """quality_table answers FAKE (the pairs of the real candidate list) and counts calls."""
    calls = []

    def fake(model, tokenizer, settings, flash_attn="auto", pairs=None, progress=True):
        calls.append(settings)
        return dict(FAKE)
    monkeypatch.setattr(calibration, "quality_table", fake)
    return calls


def test_llm_auto_reports_its_choice_and_keeps_it_on_reconfigure(tiny_path, clean_env, fake_table):
    from kvslim import LLM

    llm = LLM(str(tiny_path), kv_cache_type="auto", num_ctx=128, progress=False, pull=False)
    i = llm.kv_cache_info()
    assert (i["type_k"], i["type_v"], i["kv_auto"], i["kv_max_kld"], i["kv_measured_kld"]) == \
        ("q8_0", "q4_0", True, DEFAULT_MAX_KLD, 0.0040)
    llm.reconfigure(kv_max_kld=0.001)  # still auto, tighter
    i = llm.kv_cache_info()
    assert (i["type_k"], i["type_v"], i["kv_max_kld"]) == ("q8_0", "q8_0", 0.001)
    llm.reconfigure(num_ctx=64)  # other changes keep auto and its budget
    assert llm.kv_cache_info()["kv_max_kld"] == 0.001
    llm.reconfigure(kv_cache_type="q4_0")
    assert "kv_auto" not in llm.kv_cache_info()
    assert llm.generate("the cab", max_tokens=2, temperature=0).text is not None


def test_quality_table_is_measured_once_and_kept_beside_the_store(tiny_path, clean_env, tmp_path):
    """A real (tiny) measurement: every candidate the CPU runs, KLD >= 0, read back from the
    store on the next load; a damaged file is measured again."""
    import tiny_llama

    from kvslim.codec import CodecSettings

    model, tok = tiny_llama.load(tiny_path)
    pairs = (("q8_0", "q8_0"), ("fp8_e5m2", "fp8_e5m2"), ("q4_0", "q4_0"))
    first = calibration.quality_table(model, tok, CodecSettings(), pairs=pairs, progress=False)
    assert set(first) == {"q8_0/q8_0", "fp8_e5m2/fp8_e5m2", "q4_0/q4_0"}
    assert all(v >= 0 for v in first.values()) and first["q4_0/q4_0"] > first["q8_0/q8_0"]
    files = list((tmp_path / "store" / ".calibration").glob("*-kld.json"))
    assert len(files) == 1
    model2, tok2 = tiny_llama.load(tiny_path)  # a new load: read back, not measured
    measured = []
    real = calibration._measure_table
    calibration._measure_table = lambda *a: measured.append(1) or real(*a)
    try:
        assert calibration.quality_table(model2, tok2, CodecSettings(), pairs=pairs) == first
        assert not measured
        files[0].write_text("{not json")
        model3, tok3 = tiny_llama.load(tiny_path)
        assert calibration.quality_table(model3, tok3, CodecSettings(), pairs=pairs) == first
        assert measured == [1]
        # another coding is another table
        calibration.quality_table(model3, tok3, CodecSettings(rotation="off"), pairs=pairs)
        assert measured == [1, 1]
    finally:
        calibration._measure_table = real


def test_server_auto_default_option_and_memory_budget(tiny_path, clean_env, fake_table):
    import ollama
    from test_server import ps_model, running_server

    settings = ServerSettings.from_env({"KVSLIM_KV_CACHE_TYPE": "auto"}, num_parallel=2)
    with running_server(settings, {"tiny": tiny_path}) as server:
        client = ollama.Client(host=server.url)
        client.generate(model="tiny", prompt="the cab", options={"num_predict": 1})
        kv = ps_model(server.url, "tiny")["kv_cache"]
        assert (kv["type_k"], kv["type_v"]) == ("q8_0", "q4_0")
        ps = ps_model(server.url, "tiny")
        assert (ps["kv_auto"], ps["kv_max_kld"], ps["kv_measured_kld"]) == (True, DEFAULT_MAX_KLD, 0.004)
        client.generate(model="tiny", prompt="the cab", options={"num_predict": 1, "kv_max_kld": 0.1})
        assert ps_model(server.url, "tiny")["kv_cache"]["type_k"] == "q4_0"
        r = httpx.post(f"{server.url}/api/generate", json={
            "model": "tiny", "prompt": "hi", "options": {"kv_max_kld": -1}})
        assert r.status_code == 400 and "kv_max_kld" in r.text
        r = httpx.post(f"{server.url}/api/generate", json={
            "model": "tiny", "prompt": "hi", "options": {"cache_type_k": "auto", "cache_type_v": "q8_0"}})
        assert r.status_code == 400 and "auto" in r.json()["error"]
    # a memory budget: 2 x 256 tokens; the tiny model's q8_0/q4_0 would need more than it has
    from kvslim.cache import KVCache

    per = KVCache.bytes_per_token(2, 2, 32, "q8_0", "q4_0")
    settings = ServerSettings.from_env({"KVSLIM_KV_CACHE_TYPE": "auto"}, num_parallel=2,
                                       kv_memory=int(per * 512) - 1, kv_max_kld=0.1)
    with running_server(settings, {"tiny": tiny_path}) as server:
        r = httpx.post(f"{server.url}/api/generate", json={
            "model": "tiny", "prompt": "hi", "options": {"num_predict": 1}})
        assert r.status_code == 200, r.text
        assert ps_model(server.url, "tiny")["kv_cache"]["type_k"] == "q5_0"  # the best that fits
        r = httpx.post(f"{server.url}/api/generate", json={
            "model": "tiny", "prompt": "hi", "options": {"kv_max_kld": 0.005}})
        assert r.status_code == 400 and "no K/V cache within a KLD of 0.005 fits" in r.text


def test_plan_auto_with_a_measured_table(tiny_path):
    from kvslim import planner

    p = planner.plan(tiny_path, "1GiB", parallel=4, ctx=256, quality=FAKE, max_kld=0.005)
    a = p["auto"]
    assert (a["fits"], a["k"], a["v"], a["kld"]) == (True, "f16", "f16", 0.0)  # room for the best
    held = p["weights_bytes"]
    tight = held + 4 * 256 * planner.kv_bytes_per_token(planner.load_plan_config(tiny_path)[0],
                                                         "q8_0", "q4_0")
    a = planner.plan(tiny_path, tight, parallel=4, ctx=256, quality=FAKE, max_kld=0.005)["auto"]
    assert (a["k"], a["v"]) == ("q8_0", "q4_0") and a["total_bytes_at_ctx"] == tight
    a = planner.plan(tiny_path, tight - 1, parallel=4, ctx=256, quality=FAKE, max_kld=0.005)["auto"]
    assert a["fits"] is False and "no K/V cache within a KLD of 0.005 fits" in a["answer"]


def test_cli_refuses_a_bad_budget_in_one_line(tiny_path, clean_env, capsys):
    from kvslim.cli import main

    assert main(["run", str(tiny_path), "hi", "--kv-cache-type", "auto", "--kv-max-kld", "much"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "kv_max_kld" in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_at_the_default_budget_is_q8_0_q4_0_class(smollm2_gguf, clean_env):
    """The real table: at 0.005 auto lands between q8_0/q8_0 and q4_0/q4_0 in bytes (q8_0/q4_0
    or q5_0/q5_0 class), with a measured KLD inside the budget; 4-bit pairs are outside it.
    (How long measuring takes: benchmarks/auto_table.py.)"""
    from kvslim import LLM
    from kvslim.cache import KVCache

    llm = LLM(str(smollm2_gguf), kv_cache_type="auto", num_ctx=512, progress=False, pull=False)
    i = llm.kv_cache_info()
    per = lambda k, v: KVCache.bytes_per_token(30, 3, 64, k, v)  # noqa: E731
    assert per("q4_0", "q4_0") < i["bytes_per_token"] < per("q8_0", "q8_0"), i
    assert 0 < i["kv_measured_kld"] <= DEFAULT_MAX_KLD
    table = calibration._TABLES[llm.model]
    (kld,) = table.values()
    assert kld["q4_0/q4_0"] > DEFAULT_MAX_KLD and kld["q8_0/q8_0"] < DEFAULT_MAX_KLD / 10


def test_each_request_budget_runs_in_the_pool_of_its_own_pair(tiny_path, clean_env, fake_table,
                                                              monkeypatch):
    """Per-request ``kv_max_kld`` under KVSLIM_KV_CACHE_TYPE=auto: each request's sequence
    runs in an engine of the pair its own budget picks (requests with other budgets, in
    flight at the same time, in pools of their own pairs); a budget that picks the
    default's pair shares the default pool (the budget is not part of a pool's identity)."""
    import concurrent.futures

    from kvslim.engine import Engine
    from test_server import running_server

    ran = []  # (K, V, the engine's auto budget) per request admitted
    add = Engine.add_request

    def recording(self, prompt_ids, *a, **kw):
        ran.append((self.cache.cache_type_k, self.cache.cache_type_v,
                    self.auto.max_kld if self.auto else None))
        return add(self, prompt_ids, *a, **kw)
    monkeypatch.setattr(Engine, "add_request", recording)

    settings = ServerSettings.from_env({"KVSLIM_KV_CACHE_TYPE": "auto"}, num_parallel=2)
    with running_server(settings, {"tiny": tiny_path}) as server:
        def ask(options: dict) -> tuple:
            r = httpx.post(f"{server.url}/api/generate", timeout=120, json={
                "model": "tiny", "prompt": "the cab", "stream": False,
                "options": {"num_predict": 2, **options}})
            assert r.status_code == 200, r.text
            return ran[-1]

        assert ask({}) == ("q8_0", "q4_0", DEFAULT_MAX_KLD)
        runner = server.runner("tiny")
        assert ask({"kv_max_kld": 0.0045})[:2] == ("q8_0", "q4_0")  # the default's pair:
        assert len(runner.pools) == 1  # its pool, not a second one of the same types
        assert ask({"kv_max_kld": 0.003})[:2] == ("fp8_e4m3", "fp8_e4m3")
        assert ask({"kv_max_kld": 0.1})[:2] == ("q4_0", "q4_0")
        assert ask({"kv_cache_type": "auto", "kv_max_kld": 0.1})[:2] == ("q4_0", "q4_0")
        assert ask({"kv_cache_type": "q5_0"})[:2] == ("q5_0", "q5_0")
        pairs = [(c.type_k, c.type_v) for c in runner.pools]
        assert len(pairs) == len(set(pairs))  # one pool per pair
        # two budgets at once: each request in its own pair's pool
        ran.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(ask, [{"kv_max_kld": 0.003}, {"kv_max_kld": 0.1}]))
        assert sorted(r[:2] for r in ran) == [("fp8_e4m3", "fp8_e4m3"), ("q4_0", "q4_0")]
