"""`kvslim bench`: llama-perplexity's chunking, exact KL / top-1, every JSON field, Ctrl-C, errors.

Fast tests run a tiny random GGUF (tests/tiny_llama.py) at ctx 64; the slow one runs
SmolLM2 on the default text.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from kvslim import bench, cli
from kvslim.llm import LLM


FIELDS = ("k", "v", "effective_k", "effective_v", "bytes_per_token", "ppl", "kld", "top1",
          "prefill_tok_s", "decode_tok_s")
PROSE = ("The quick brown fox jumps over the lazy dog while the hacker reads the jargon file. "
         "A kludge is a clever programming trick intended to solve a particular nasty case. ") * 4


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf(ctx=512, tied=False)


@pytest.fixture(scope="module")
def llm(tiny):
    # batches of 16 tokens: prefill and scoring run in several steps, as long prompts do
    return LLM(str(tiny), num_ctx=64, device="cpu", progress=False, max_batch_tokens=16)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE)
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("KVSLIM_KV_CACHE_TYPE", "KVSLIM_FLASH_ATTENTION", "KVSLIM_CONTEXT_LENGTH", "KVSLIM_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "store"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


# ---------------------------------------------------------------- chunking as llama.cpp


def test_scored_span_is_llama_perplexity_second_half():
    # llama.cpp: first = n_ctx/2; logits rows first .. n_ctx-2 score tokens first+1 .. n_ctx-1
    span = bench.scored_span(8)
    assert (span.start, span.stop) == (4, 7)
    assert bench._targets(list(range(100, 108))).tolist() == [105, 106, 107]
    assert len(range(2048)[bench.scored_span(2048)]) == 2048 - 1 - 1024


def test_chunk_tokens_drops_remainder_and_puts_bos_first():
    ids = list(range(10, 35))  # 25 tokens
    assert bench.chunk_tokens(ids, 8, None, None) == [ids[0:8], ids[8:16], ids[16:24]]
    assert bench.chunk_tokens(ids, 8, 2, None) == [ids[0:8], ids[8:16]]
    with_bos = bench.chunk_tokens(ids, 8, None, 1)
    assert [c[0] for c in with_bos] == [1, 1, 1] and with_bos[1][1:] == ids[9:16]
    assert bench.chunk_tokens(ids, 8, None, None, skip=1) == [ids[8:16], ids[16:24]]  # same boundaries
    assert bench.chunk_tokens(ids, 8, 1, None, skip=2) == [ids[16:24]]
    with pytest.raises(ValueError, match="fewer than 1 chunk"):
        bench.chunk_tokens(ids, 32, None, None)
    with pytest.raises(ValueError, match="fewer than 4 chunk"):
        bench.chunk_tokens(ids, 8, None, None, skip=3)


# ---------------------------------------------------------------- metrics


def test_token_stats_match_hand_computation():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    new = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.3, 0.6]]))
    kld, nll, same = bench.token_stats(ref, new, torch.tensor([1, 2]))
    expect0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    expect1 = 0.2 * math.log(0.2 / 0.3) + 0.7 * math.log(0.7 / 0.6)
    assert kld.tolist() == pytest.approx([expect0, expect1], rel=1e-5)
    assert nll.tolist() == pytest.approx([-math.log(0.5), -math.log(0.6)], rel=1e-6)
    assert same.tolist() == [False, True]


def test_scores_summary():
    s = bench.Scores()
    assert s.summary() == {"ppl": None, "kld": None, "kld_p99": None, "top1": None}
    s.add(torch.tensor([0.0, 0.2]), torch.tensor([1.0, 3.0]), torch.tensor([True, False]))
    out = s.summary()
    assert out["ppl"] == pytest.approx(math.exp(2.0)) and out["kld"] == pytest.approx(0.1)
    assert out["top1"] == 0.5 and s.n == 2


def test_f16_cache_against_itself_is_zero(llm):
    """Two independent f16-cache passes: KL exactly 0 and the same top-1 everywhere."""
    bench.use_types(llm, "f16", "f16")
    chunk = llm.tokenize(PROSE)[:64]
    a, b = bench._score(llm, chunk), bench._score(llm, chunk)
    kld, _, same = bench.token_stats(a, b, bench._targets(chunk))
    assert len(kld) == 31 and kld.abs().max().item() == 0.0 and bool(same.all())


# ---------------------------------------------------------------- the run


def test_bench_reports_every_field_for_every_type(llm):
    r = bench.bench(llm, PROSE, "f16,q8_0,q4_0,q8_0/q4_0", ctx=64, chunks=2, decode_tokens=4,
                    progress=False, model="tiny")
    assert r["model"] == "tiny" and r["n_tokens"] == 2 * 31 and r["chunks"] == 2
    assert not r["partial"] and list(r["types"]) == ["f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q8_0/q4_0"]
    for name, t in r["types"].items():
        assert all(t[f] is not None for f in FIELDS), (name, t)
        assert (t["effective_k"], t["effective_v"]) == (t["k"], t["v"]) and t["n_scored"] == 62
    f16, q8, q4 = (r["types"][n] for n in ("f16/f16", "q8_0/q8_0", "q4_0/q4_0"))
    assert f16["kld"] == 0 and f16["top1"] == 1
    assert 0 < q8["kld"] < q4["kld"]
    # the bytes are the allocated cache's: 2 layers x 2 heads x 32 values x (K + V)
    assert [f16["bytes_per_token"], q8["bytes_per_token"], q4["bytes_per_token"]] == [512, 272, 144]
    assert q8["bits_per_element"] == 8.5 and f16["bytes_at_ctx"] == 64 * 512
    assert r["threads"]["torch"] == torch.get_num_threads()


def test_fallback_types_are_reported(tiny):
    llm = LLM(str(tiny), num_ctx=64, device="cpu", progress=False, flash_attn="off")
    r = bench.bench(llm, PROSE, "q8_0/q4_0", ctx=64, chunks=1, decode_tokens=0, progress=False)
    t = r["types"]["q8_0/q4_0"]
    assert (t["effective_k"], t["effective_v"]) == ("q8_0", "f16") and t["fallback"]
    assert t["prefill_tok_s"] is None and t["decode_tok_s"] is None  # --decode-tokens 0


def test_ctrl_c_keeps_completed_chunks(llm, monkeypatch, capsys):
    calls = {"n": 0}
    real = bench._score

    def interrupted(llm_, chunk):
        calls["n"] += 1
        if calls["n"] == 4:  # chunk 2's reference pass (chunk 1 took 3: f16, q8_0, q4_0)
            raise KeyboardInterrupt
        return real(llm_, chunk)

    monkeypatch.setattr(bench, "_score", interrupted)
    r = bench.bench(llm, PROSE, "f16,q8_0,q4_0", ctx=64, chunks=3, decode_tokens=4, progress=False)
    assert r["partial"] and r["chunks"] == 1 and r["chunks_planned"] == 3 and r["n_tokens"] == 31
    assert all(t["n_scored"] == 31 and t["kld"] is not None for t in r["types"].values())
    assert all(t["decode_tok_s"] is None for t in r["types"].values())  # speed never ran
    bench.print_table(r)
    assert "PARTIAL" in capsys.readouterr().out


def test_cli_ctrl_c_prints_partial_json(tiny, text_file, monkeypatch, capsys):
    def interrupted(llm_, chunk):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_score", interrupted)
    argv = ["bench", str(tiny), "--text", str(text_file), "--ctx", "32", "--types", "q8_0",
            "--json", "--no-progress"]
    assert cli.main(argv) == 130
    r = json.loads(capsys.readouterr().out)
    assert r["partial"] and r["chunks"] == 0 and r["n_tokens"] == 0
    assert all(r["types"]["q8_0/q8_0"][f] is None for f in ("ppl", "kld", "top1", "decode_tok_s"))


def test_timed_request_splits_prefill_and_decode_steps(llm):
    from kvslim.sampling import SamplingParams

    bench.use_types(llm, "q8_0", "q4_0")
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)
    prefill_s, steps = bench._timed_request(llm.engine, llm.tokenize(PROSE)[:40], params)
    # 40 prompt tokens in 3 steps of <= 16 (the last samples token 1), then 4 one-token steps
    assert prefill_s > 0 and len(steps) == 4 and all(s > 0 for s in steps)


def test_speed_rounds_keep_the_fastest(llm, monkeypatch):
    rates = iter([(10.0, 3.0), (5.0, 1.0), (20.0, 2.0), (30.0, None)])  # (prefill, decode) per run

    def fake(llm_, run, prompt, n_decode, kv_rotation):
        run.keep_fastest(*next(rates))

    monkeypatch.setattr(bench, "_measure_speed", fake)
    r = bench.bench(llm, PROSE, "q8_0,q4_0", ctx=64, chunks=1, decode_tokens=4, speed_rounds=2,
                    progress=False)
    assert r["speed_rounds"] == 2  # rounds interleave: q8_0, q4_0, q8_0, q4_0
    q8, q4 = r["types"]["q8_0/q8_0"], r["types"]["q4_0/q4_0"]
    assert (q8["prefill_tok_s"], q8["decode_tok_s"]) == (20.0, 3.0)
    assert (q4["prefill_tok_s"], q4["decode_tok_s"]) == (30.0, 1.0)


def test_speed_failure_keeps_quality(llm, monkeypatch, caplog, capsys):
    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(bench, "_measure_speed", broken)
    r = bench.bench(llm, PROSE, "q8_0", ctx=64, chunks=1, decode_tokens=4, progress=False)
    t = r["types"]["q8_0/q8_0"]
    assert not r["partial"] and t["kld"] is not None and t["decode_tok_s"] is None
    assert t["speed_error"] == "RuntimeError: no kernel"
    # a warning: caught by caplog, or on stderr once cli.main has set up the kvslim logger
    assert "speed of q8_0/q8_0 not measured" in caplog.text + capsys.readouterr().err


class FakeLLM:
    """reconfigure / kv_cache_info of an LLM whose cache has a codec (rotation, centering)."""

    name, seen = "fake", {}

    def reconfigure(self, *, cache_type_k=None, cache_type_v=None, kv_rotation=None, kv_centering=None):
        self.seen = dict(k=cache_type_k, v=cache_type_v, kv_rotation=kv_rotation, kv_centering=kv_centering)

    def kv_cache_info(self):
        quantized = self.seen["k"] != "f16"
        rotation = "hadamard-64" if self.seen["kv_rotation"] == "on" or (
            self.seen["kv_rotation"] == "auto" and quantized) else "off"
        return {"type_k": self.seen["k"], "type_v": self.seen["v"], "backend": "cpu",
                "kv_rotation": rotation, "kv_centering": "off", "kv_codec_note": None}


def test_codec_options_pass_through_and_are_reported():
    fake = FakeLLM()
    info = bench.use_types(fake, "q4_0", "q4_0", {"kv_rotation": "on", "kv_centering": "off"})
    assert fake.seen == {"k": "q4_0", "v": "q4_0", "kv_rotation": "on", "kv_centering": "off"}
    assert bench.rotation_state(info) == "hadamard-64"
    assert bench.codec_state(info) == {"kv_rotation": "hadamard-64", "kv_centering": "off", "kv_codec_note": None}
    assert bench._codec_text(bench.codec_state(info)) == "hadamard-64 / off"
    result = {"types": {"f16/f16": {"codec": None}, "q4_0/q4_0": {"codec": bench.codec_state(info)}}}
    assert bench._codec_header(result) == "rotation / centering"
    assert bench.rotation_state({"type_k": "f16"}) is None and bench.codec_state({"type_k": "f16"}) == {}
    with pytest.raises(ValueError, match="--kv-rounding is not supported"):
        bench.use_types(fake, "q4_0", "q4_0", {"kv_rounding": "lsq"})


def test_reference_is_the_plain_f16_cache():
    """With --kv-rotation on for every type, the reference still stores plain f16 rows."""
    fake = FakeLLM()
    assert bench._plain({"kv_rotation": "on"}) == {"kv_rotation": "auto"} and bench._plain(None) == {}
    ref = bench.TypeRun("f16", "f16", bench.use_types(fake, "f16", "f16", bench._plain({"kv_rotation": "on"})))
    f16_rotated = bench.TypeRun("f16", "f16", bench.use_types(fake, "f16", "f16", {"kv_rotation": "on"}))
    assert ref.info["kv_rotation"] == "off" and not f16_rotated.same_cache_as(ref)


def test_cli_kv_rotation(tiny, text_file, capsys):
    """Passed to the LLM where it has the option; a one-line error where it has not."""
    argv = ["bench", str(tiny), "--text", str(text_file), "--ctx", "32", "--chunks", "1", "--types", "q8_0",
            "--decode-tokens", "0", "--json", "--no-progress", "--kv-rotation", "off"]
    if bench._accepts(LLM, "kv_rotation"):
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out)["types"]["q8_0/q8_0"]["rotation"] is not None
    else:
        assert cli.main(argv) == 1
        assert "--kv-rotation is not supported" in one_error_line(capsys)


# ---------------------------------------------------------------- CLI


def test_cli_json_and_plot(tiny, text_file, tmp_path, capsys):
    png = tmp_path / "bench.png"
    argv = ["bench", str(tiny), "--text", str(text_file), "--ctx", "64", "--chunks", "1",
            "--types", "f16,q8_0/q4_0", "--decode-tokens", "4", "--json", "--plot", str(png),
            "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == str(tiny) and r["n_tokens"] == 31 and set(r["types"]) == {"f16/f16", "q8_0/q4_0"}
    assert all(all(t[f] is not None for f in FIELDS) for t in r["types"].values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_table(tiny, text_file, capsys):
    argv = ["bench", str(tiny), "--text", str(text_file), "--ctx", "32", "--chunks", "1",
            "--types", "q8_0", "--decode-tokens", "0", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "q8_0/q8_0" in out and "15 tokens scored" in out and "KLD" in out


def test_skip_chunks(llm):
    r = bench.bench(llm, PROSE, "q8_0", ctx=64, chunks=1, skip_chunks=2, decode_tokens=0, progress=False)
    assert r["skip_chunks"] == 2 and r["chunks"] == 1 and r["n_tokens"] == 31


def test_cli_missing_default_text(tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "DEFAULT_TEXT", str(tmp_path / "jargon.txt.gz"))
    assert cli.main(["bench", str(tiny)]) == 1
    line = one_error_line(capsys)
    assert "apt-get install jargon-text" in line and "--text FILE" in line


@pytest.mark.parametrize("extra,match", [
    (["--text", "/nonexistent/prose.txt"], "not found"),
    (["--types", "q9_0"], "q9_0"),
    (["--ctx", "100000"], "num_ctx 100000"),
    (["--ctx", "-2"], "--ctx must be at least 4"),
    (["--chunks", "-1"], "--chunks must not be negative"),
    (["--speed-rounds", "0"], "--speed-rounds must be at least 1"),
    (["--ctx", "512", "--max-tokens", "500"], "fewer than 1 chunk"),
    (["--ctx", "256", "--skip-chunks", "2"], "fewer than 3 chunk"),
])
def test_cli_errors(tiny, text_file, capsys, extra, match):
    argv = ["bench", str(tiny), "--text", str(text_file), "--no-progress", "--decode-tokens", "0"] + extra
    assert cli.main(argv) == 1
    assert match in one_error_line(capsys)


def test_cli_gzip_text(tiny, tmp_path, capsys):
    import gzip

    path = tmp_path / "prose.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(PROSE)
    assert bench.load_text(path) == PROSE
    argv = ["bench", str(tiny), "--text", str(path), "--ctx", "32", "--chunks", "1", "--types", "f16",
            "--decode-tokens", "0", "--json", "--no-progress"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["types"]["f16/f16"]["kld"] == 0


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_q8_0_keeps_more_than_q4_0(smollm2_gguf):
    llm = LLM(str(smollm2_gguf), num_ctx=256, device="cpu", progress=False)
    r = bench.bench(llm, bench.load_text(), "f16,q8_0,q4_0", ctx=256, chunks=2, decode_tokens=0,
                    progress=False)
    t = r["types"]
    assert r["n_tokens"] == 2 * 127
    assert t["f16/f16"]["kld"] == 0 and t["f16/f16"]["top1"] == 1
    assert 0 < t["q8_0/q8_0"]["kld"] < t["q4_0/q4_0"]["kld"]
    assert t["q8_0/q8_0"]["top1"] >= t["q4_0/q4_0"]["top1"]


def test_plot_without_matplotlib_is_one_clear_error(tiny, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    assert cli.main(["bench", str(tiny), "--text", str(text_file), "--plot", str(tmp_path / "k.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["Error: --plot needs matplotlib, which is not installed: pip install "
                   "'kvslim[plot]' (or pip install matplotlib)"]
    assert not (tmp_path / "k.png").exists()
