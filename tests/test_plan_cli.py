"""`kvslim plan` through `cli.main`: the table, the issue's JSON shape, bytes equal to an
allocated cache's nbytes, and one-line errors. The arithmetic itself is tested in
test_planner.py."""
from __future__ import annotations

import json

import pytest

from kvslim import cli
from kvslim.cache import KVCache
from kvslim.gguf_loader import load_config

TYPE_FIELDS = ("kv_bytes_per_token", "max_ctx", "bytes_at_ctx")


pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf(ctx=512, tied=False)


def plan_json(capsys, argv) -> dict:
    assert cli.main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_shape(tiny, capsys):
    p = plan_json(capsys, [str(tiny), "--memory", "1GiB", "--parallel", "2", "--types", "f16,q8_0/q4_0"])
    assert {"model", "weights_bytes", "memory", "parallel", "types"} <= set(p)
    assert p["model"] == str(tiny) and p["memory"] == 2**30 and p["parallel"] == 2
    assert p["weights_bytes"] == load_config(tiny).weights_bytes > 0
    assert list(p["types"]) == ["f16/f16", "q8_0/q4_0"]
    for t in p["types"].values():
        assert all(isinstance(t[f], int) for f in TYPE_FIELDS)
    assert p["types"]["f16/f16"]["max_ctx"] == 512  # 1 GiB holds the tiny model's whole context


@pytest.mark.parametrize("k,v", [("f16", "f16"), ("q8_0", "q4_0"), ("q5_1", "iq4_nl")])
def test_bytes_equal_an_allocated_cache(tiny, capsys, k, v):
    """bytes_at_ctx from the CLI equals the nbytes of a KVCache allocated for it."""
    ctx, parallel = 100, 3
    p = plan_json(capsys, [str(tiny), "--memory", "8MiB", "--ctx", str(ctx), "--parallel", str(parallel),
                           "--types", f"{k}/{v}"])
    c = load_config(tiny)
    n_pages = parallel * -(-ctx // p["page_size"])
    cache = KVCache(c.n_layers, c.n_kv_heads, c.head_dim, n_pages, page_size=p["page_size"],
                    cache_type_k=k, cache_type_v=v)
    t = p["types"][f"{k}/{v}"]
    assert t["bytes_at_ctx"] == cache.nbytes
    assert t["kv_bytes_per_token"] * cache.capacity == cache.nbytes


def test_max_ctx_fits_the_budget(tiny, capsys):
    c = load_config(tiny)
    budget = c.weights_bytes + 150 * 144 * 2  # room for 150 q4_0 tokens per sequence, 2 sequences
    p = plan_json(capsys, [str(tiny), "--memory", str(budget), "--parallel", "2", "--types", "q4_0"])
    t = p["types"]["q4_0/q4_0"]
    assert t["kv_bytes_per_token"] == 144 and t["max_ctx"] == 128  # whole pages of 64
    assert not t["max_ctx_capped"]


def test_replicas_divide_the_budget(tiny, capsys):
    """--replicas N plans each replica with its share: weights and pool each (serve --ray)."""
    c = load_config(tiny)
    share = c.weights_bytes + 150 * 144 * 2  # one replica: 2 sequences of 128 q4_0 tokens
    argv = [str(tiny), "--parallel", "2", "--types", "q4_0"]
    one = plan_json(capsys, [*argv, "--memory", str(share)])
    three = plan_json(capsys, [*argv, "--memory", str(3 * share), "--replicas", "3"])
    assert three["memory"] == one["memory"] == share and three["memory_total"] == 3 * share
    assert three["replicas"] == 3 and "replicas" not in one
    assert three["types"] == one["types"]
    assert cli.main(["plan", str(tiny), "--memory", str(3 * share), "--replicas", "3"]) == 0
    assert "each of 3 replicas" in capsys.readouterr().out


def test_table(tiny, capsys):
    assert cli.main(["plan", str(tiny), "--memory", "8GB", "--parallel", "4", "--ctx", "256"]) == 0
    out = capsys.readouterr().out
    for name in ("f16/f16", "q8_0/q8_0", "q8_0/q4_0", "q4_0/q4_0", "iq4_nl/iq4_nl"):
        assert name in out
    assert "x 4 sequences" in out and "512 (model max)" in out and "KV bytes/token" in out


def test_table_when_weights_do_not_fit(tiny, capsys):
    assert cli.main(["plan", str(tiny), "--memory", "1KiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "the weights alone" in out


@pytest.mark.parametrize("argv,match", [
    (["--memory", "8XB"], "bad memory size '8XB'"),
    (["--memory=-1GiB"], "must be positive"),
    (["--memory", "0"], "must be positive"),
    (["--memory", "1GiB", "--parallel", "0"], "parallel must be positive"),
    (["--memory", "1GiB", "--replicas", "0"], "replicas must be positive"),
    (["--memory", "1GiB", "--ctx", "100000"], "ctx must be between 1"),
    (["--memory", "1GiB", "--types", "q3_0"], "q3_0"),
])
def test_errors(tiny, capsys, argv, match):
    assert cli.main(["plan", str(tiny), *argv]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], err


def test_unpulled_builtin_is_not_downloaded(capsys):
    assert cli.main(["plan", "smollm2", "--memory", "8GiB"]) == 1
    assert "kvslim pull smollm2" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2(smollm2_gguf, capsys):
    p = plan_json(capsys, [str(smollm2_gguf), "--memory", "1GiB", "--ctx", "8192", "--types", "q8_0,q4_0"])
    # 30 layers x 3 KV heads x 64 values x 2 (K and V) at 34 and 18 bytes per 32 values
    assert p["types"]["q8_0/q8_0"]["kv_bytes_per_token"] == 30 * 3 * 2 * 2 * 34 == 12_240
    assert p["types"]["q4_0/q4_0"]["bytes_at_ctx"] == 8192 * 30 * 3 * 2 * 2 * 18
