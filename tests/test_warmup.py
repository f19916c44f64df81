"""The CPU kernels compile before the first token (kvslim.warmup), and `kvslim run` /
`kvslim warmup` say so when they compile."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from kvslim import cli, repl, warmup

pytestmark = pytest.mark.usefixtures("clean_env")


def test_warmup_verb_and_bad_types(capsys):
    assert cli.main(["warmup", "--types", "q8_0,iq4_nl"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("CPU kernels ready (q8_0, iq4_nl; ")
    assert not warmup.needs_compile()  # what it compiled is in numba's disk cache
    assert cli.main(["warmup", "--types", "q9_0"]) == 1
    assert capsys.readouterr().err.startswith("Error: unknown cache type q9_0; valid: f32")


@pytest.mark.slow  # a fresh interpreter importing torch and numba, compiling everything
def test_a_new_machine_needs_a_compile_and_warmup_is_all_of_it(tmp_path):
    """An empty numba cache (a new machine) is seen before anything compiles, and after one
    ``warmup`` every cached kernel is in it: no "compiling" message on the runs after
    (a kernel that only a benchmark called once kept it there on every run)."""
    code = ("from kvslim import warmup; print(warmup.needs_compile()); warmup.warmup(); "
            "print(warmup.needs_compile())")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-2:] == ["True", "False"]


def test_compile_message_and_seconds(monkeypatch):
    monkeypatch.setattr(warmup, "needs_compile", lambda: True)
    err = io.StringIO()
    seconds, compiled = repl.compile_kernels(["q8_0"], err=err)
    lines = err.getvalue().splitlines()
    assert compiled and seconds > 0
    assert lines[0] == "compiling CPU kernels (once per machine, about 1.5 min on 2 cores) ..."
    assert lines[1].startswith("compiled CPU kernels in ") and len(lines) == 2
    monkeypatch.setattr(warmup, "needs_compile", lambda: False)
    err = io.StringIO()
    assert repl.compile_kernels(["q8_0"], err=err)[1] is False and err.getvalue() == ""


NEW_SIGNATURES = """
import sys
import numba
from kvslim import warmup
from kvslim.llm import LLM

def signatures():
    return {(m, k): len(v.signatures) for m, mod in list(sys.modules.items())
            if m.startswith("kvslim") and mod is not None
            for k, v in vars(mod).items() if isinstance(v, numba.core.registry.CPUDispatcher)}

warmup.warmup(sys.argv[2:])
before = signatures()
for t in sys.argv[2:]:
    llm = LLM(sys.argv[1], kv_cache_type=t, progress=False)
    llm.chat([{"role": "user", "content": "Why is the sky blue? Say it in one sentence."}], max_tokens=2)
print(sorted(k for k, n in signatures().items() if n != before.get(k, 0)))
"""


@pytest.mark.slow
def test_nothing_compiles_after_warmup(smollm2_gguf):
    """After warmup, a real model's prompt and tokens (quantized weights, a rotated and centred
    q4_0 cache, f16) run only code compiled already: the first token never waits."""
    out = subprocess.run([sys.executable, "-c", NEW_SIGNATURES, str(smollm2_gguf), "q4_0", "f16"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[]", out.stdout
