"""kvslim.kvfile and LLM.save_cache / load_cache: a sequence's K/V blocks saved to disk
and restored in another LLM give bit-identical logits; a damaged, cut, foreign or
mismatched file is refused with a message naming what differs, and nothing leaks."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvslim import kvfile
from kvslim.cache import KVCache
from kvslim.engine import run_step
from kvslim.llm import LLM

P = [1] + [(7 * i) % 250 + 3 for i in range(99)]  # 100 tokens: one whole page of 64 + 36
Q = [(5 * i) % 250 + 3 for i in range(20)]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}

# (K, V, tiny model fields): no coding; rotation (head_dim 64) + centering + lsq;
# centering + lsq without rotation (head_dim 32); fp8 sides with their scales
CASES = [("f16", "f16", {}), ("q8_0", "q4_0", {"d_model": 256}), ("q4_0", "q4_0", {}),
         ("fp8_e4m3", "fp8_e5m2", {})]


def _llm(path, k, v, **kw) -> LLM:
    return LLM(path, num_ctx=256, progress=False, cache_type_k=k, cache_type_v=v, **kw)


def _continue(llm: LLM, prefix: list[int], rest: list[int]) -> torch.Tensor:
    """Logits of ``rest`` evaluated on top of the cached ``prefix`` (which must be reused
    whole), the pool left as it was."""
    e = llm.engine
    before = e.cache.pages_in_use
    cid, reused = e.prefix_cache.attach(e.cache, prefix + rest)
    assert reused == len(prefix)
    out = run_step(e.model, e.attn, e.cache, [cid], [len(rest)], rest)
    e.cache.free(cid)
    assert e.cache.pages_in_use == before
    e.cache.check()
    return out


@pytest.fixture(scope="module")
def saved(tiny_gguf, tmp_path_factory):
    """{case: (model path, file, logits of Q after P in the saving LLM, its greedy answer)}."""
    out = {}
    for k, v, fields in CASES:
        path = tiny_gguf(ctx=256, tied=False, **fields)
        llm = _llm(path, k, v)
        file = tmp_path_factory.mktemp("kvc") / f"{k}_{v}.kvc"
        info = llm.save_cache(file, P)
        assert info["tokens"] == info["evaluated"] == len(P) and file.stat().st_size == info["bytes"]
        answer = llm.generate(P + Q, max_tokens=6, **GREEDY)
        assert answer.prompt_cache_count == len(P)  # the saving LLM kept it too
        out[(k, v)] = (path, file, _continue(llm, P, Q), answer.token_ids, llm)
    return out


@pytest.mark.parametrize("k,v", [(k, v) for k, v, _ in CASES])
def test_restored_cache_gives_the_saved_sessions_logits_exactly(saved, k, v):
    path, file, logits, answer, _ = saved[(k, v)]
    llm = _llm(path, k, v, prompt_cache=file)
    e = llm.engine
    assert e.cache.pages_in_use == 2 and len(e.prefix_cache) == 1  # 100 tokens: 2 pages
    assert torch.equal(_continue(llm, P, Q), logits)
    got = llm.generate(P + Q, max_tokens=6, **GREEDY)
    assert got.prompt_cache_count == len(P) and got.token_ids == answer
    e.prefix_cache.clear(e.cache)
    assert e.cache.pages_in_use == 0
    e.cache.check()


def test_file_holds_the_cache_bytes_a_q4_0_one_about_a_quarter_of_f16(saved):
    sizes = {}
    for (k, v), (_, file, _, _, llm) in saved.items():
        got = kvfile.read(file)
        per_token = KVCache.bytes_per_token(2, 2, got.meta["layout"]["head_dim"], k, v)
        assert got.nbytes == per_token * len(P)
        assert got.tokens == P and got.meta["type_k"] == k and got.extra["num_ctx"] == 256
        sizes[k, v] = got.nbytes
    # both tiny models have head_dim 32 or 64 and 2 layers x 2 kv heads: compare per value
    assert sizes["q4_0", "q4_0"] / sizes["f16", "f16"] == pytest.approx(18 / 64)


def _refused(llm: LLM, file: Path, *words: str) -> None:
    e = llm.engine
    before, entries = e.cache.pages_in_use, len(e.prefix_cache)
    with pytest.raises(kvfile.KVFileError) as err:
        llm.load_cache(file)
    msg = str(err.value)
    assert all(w in msg for w in words), msg
    assert e.cache.pages_in_use == before and len(e.prefix_cache) == entries
    e.cache.check()


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _with_header(file: Path, out: Path, **meta) -> Path:
    head, body = _header(file)
    head["__metadata__"].update(meta)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return out


def test_damaged_cut_and_foreign_files_are_refused(saved, tmp_path):
    path, file, _, _, llm = saved[("q4_0", "q4_0")]
    raw = file.read_bytes()
    flipped = bytearray(raw)
    flipped[-100] ^= 0x10  # one bit of the last tensor's data
    (tmp_path / "flip.kvc").write_bytes(bytes(flipped))
    _refused(llm, tmp_path / "flip.kvc", "damaged", "checksum")
    (tmp_path / "cut.kvc").write_bytes(raw[:len(raw) * 2 // 3])
    _refused(llm, tmp_path / "cut.kvc", "not a readable K/V cache file")
    (tmp_path / "junk.kvc").write_bytes(b"\x00" * 100)
    _refused(llm, tmp_path / "junk.kvc", "not a readable")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    _refused(llm, tmp_path / "other.safetensors", "not a kvslim K/V cache file")
    _refused(llm, _with_header(file, tmp_path / "v9.kvc", format_version="9"), "version 9")
    # a header edited to claim other tokens no longer matches the data's checksum
    _refused(llm, _with_header(file, tmp_path / "n.kvc", n_tokens="99"), "")
    with pytest.raises(FileNotFoundError):
        llm.load_cache(tmp_path / "absent.kvc")


def test_mismatched_model_types_and_coding_are_refused(saved, tiny_gguf, tmp_path):
    path, file, _, _, llm = saved[("q4_0", "q4_0")]
    _refused(saved[("f16", "f16")][4], file, "K q4_0 / V q4_0", "K f16 / V f16")
    other = tiny_gguf(ctx=256, tied=False, rope_base=5000.0)  # same layout, other model
    _refused(_llm(other, "q4_0", "q4_0"), file, "another model")
    _refused(_llm(path, "q4_0", "q4_0", kv_rounding="ggml"), file, "rounding_k ggml")
    _refused(_llm(path, "q4_0", "q4_0", kv_centering="off"), file, "centered on K",
             "on nothing")
    shorter = LLM(path, num_ctx=192, progress=False, kv_cache_type="q4_0")
    _refused(shorter, file, "shift_k", "num_ctx 256", "num_ctx 192")


def test_fp8_scales_are_part_of_the_coding(saved):
    """An fp8 file records its scales; a cache whose scales differ refuses it."""
    path, file, _, _, llm = saved[("fp8_e4m3", "fp8_e5m2")]
    got = kvfile.read(file)
    codec = llm.engine.cache.codec
    assert torch.equal(got.coding["codec.scale_k"], codec.scale_k.cpu().float())
    assert torch.equal(got.coding["codec.scale_v"], codec.scale_v.cpu().float())
    other = _llm(path, "fp8_e4m3", "fp8_e5m2")
    other.engine.cache.codec.scale_k = codec.scale_k * 2  # only read by the check here
    _refused(other, file, "scale_k", "fp8 scales")


def test_key_scaling_is_part_of_the_coding(saved):
    """A block-quantized K's file records the key scaling factors; a cache whose factors
    differ refuses it."""
    path, file, _, _, llm = saved[("q4_0", "q4_0")]
    got = kvfile.read(file)
    codec = llm.engine.cache.codec
    assert codec.smooth_k is not None
    assert torch.equal(got.coding["codec.keyscale_k"], codec.smooth_k.cpu().float())
    other = _llm(path, "q4_0", "q4_0")
    other.engine.cache.codec.smooth_k = codec.smooth_k * 2  # only read by the check here
    _refused(other, file, "keyscale_k", "key and fp8 scales")


def test_restore_without_room_fails_whole_and_prefix_cache_off_is_refused(saved):
    path, file, _, _, _ = saved[("f16", "f16")]
    llm = LLM(path, num_ctx=128, progress=False, kv_cache_type="f16")  # 2 pages of 64
    e = llm.engine
    seq = e.cache.new_sequence()
    e.cache.reserve(seq, 65)  # both pages taken by a "running" sequence outside the engine
    with pytest.raises(ValueError, match="num_ctx=128|no room"):
        llm.load_cache(file)
    e.cache.free(seq)
    assert e.cache.pages_in_use == 0
    with pytest.raises(ValueError, match="prefix cache"):
        LLM(path, num_ctx=256, progress=False, prefix_cache=False, prompt_cache=file)


def test_save_cache_of_a_system_message_starts_every_chat_with_it(saved, tmp_path):
    path = saved[("f16", "f16")][0]
    llm = _llm(path, "f16", "f16")
    info = llm.save_cache(tmp_path / "sys.kvc", system="the cab " * 20)
    fresh = _llm(path, "f16", "f16", prompt_cache=tmp_path / "sys.kvc")
    assert fresh.load_cache(tmp_path / "sys.kvc").extra["system"] == "the cab " * 20
    chat = [{"role": "system", "content": "the cab " * 20}, {"role": "user", "content": "a b"}]
    assert fresh.chat_prompt(chat)[:info["tokens"]] == fresh.system_prompt("the cab " * 20)
    got = fresh.chat(chat, max_tokens=3, **GREEDY)
    assert got.prompt_cache_count == info["tokens"]
    assert got.token_ids == llm.chat(chat, max_tokens=3, **GREEDY).token_ids
    with pytest.raises(ValueError, match="one of them"):
        llm.save_cache(tmp_path / "x.kvc", "a", system="b")


@pytest.mark.slow
def test_smollm2_cache_saved_in_one_process_restores_exactly_in_another(smollm2_gguf, tmp_path):
    """The real model, q8_0 K / q4_0 V with the default coding: a child process saves a
    prompt's cache and the logits of a continuation; this process restores the file and
    gets the same logits bit for bit."""
    script = textwrap.dedent(f"""
        import torch
        from kvslim.engine import run_step
        from kvslim.llm import LLM
        llm = LLM({str(smollm2_gguf)!r}, num_ctx=512, progress=False, cache_type_k="q8_0",
                  cache_type_v="q4_0")
        ids = llm.tokenize("The history of the town, as the speaker told it: " * 8)
        llm.save_cache({str(tmp_path / 's.kvc')!r}, ids[:-9])
        e = llm.engine
        cid, reused = e.prefix_cache.attach(e.cache, ids)
        assert reused == len(ids) - 9
        out = run_step(e.model, e.attn, e.cache, [cid], [9], ids[-9:])
        torch.save((ids, out), {str(tmp_path / 'logits.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    ids, logits = torch.load(tmp_path / "logits.pt")
    llm = LLM(smollm2_gguf, num_ctx=512, progress=False, cache_type_k="q8_0", cache_type_v="q4_0",
              prompt_cache=tmp_path / "s.kvc")
    assert torch.equal(_continue(llm, ids[:-9], ids[-9:]), logits)


def test_cli_cache_prompt_then_run_reuses_it(capsys, clean_env, tiny_gguf, tmp_path):
    from kvslim import cli

    model = str(tiny_gguf(ctx=256, tied=False))
    doc = tmp_path / "doc.txt"
    doc.write_text("the cab " * 12)
    flags = ["--kv-cache-type", "q8_0", "--num-ctx", "256"]
    assert cli.main(["cache-prompt", model, "-f", str(doc), *flags]) == 0
    err = capsys.readouterr().err
    assert f"to {doc}.kvc" in err and "K q8_0 / V q8_0" in err
    run = ["run", model, "a b", "--prompt-cache", f"{doc}.kvc", "--temperature", "0", "-n", "4",
           "--verbose", *flags]
    assert cli.main(run) == 0
    cached = capsys.readouterr()
    n = int(err.split("saved ")[1].split(" tokens")[0])
    assert f"prompt cache count:   {n} token(s)" in cached.err
    assert cli.main(["run", model, "a b", "--system", "the cab " * 12, "--temperature", "0",
                     "-n", "4", *flags]) == 0
    assert capsys.readouterr().out == cached.out  # the same answer as with the system message
    assert cli.main(["cache-prompt", model, "-f", str(doc), "-o", str(tmp_path / "raw.kvc"),
                     "--raw", *flags]) == 0
    assert cli.main(["run", model, "a b", "--prompt-cache", str(tmp_path / "raw.kvc"),
                     "--temperature", "0", "-n", "4", *flags]) == 0
    capsys.readouterr()
    for argv, match in ((run[:-2] + ["--num-ctx", "200"], "num_ctx 256"),
                        (run[:-3] + ["q4_0", "--num-ctx", "256"], "K q8_0 / V q8_0"),
                        (["cache-prompt", model, "-f", str(tmp_path / "absent.txt")], "absent.txt")):
        assert cli.main(argv) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], lines
