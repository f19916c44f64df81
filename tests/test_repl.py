"""`kvslim run`'s interactive chat (kvslim.repl): Ollama's commands, Ctrl-C and Ctrl-D,
word wrapping, and the --verbose figures (the kernel compile on its own line).

The commands are driven through ``Repl.run`` with a scripted line reader; a recording
backend shows what reaches the model (never a command). Cancelling an answer is checked
on a real ``LLM`` too: its pages return to the pool.
"""
from __future__ import annotations

import io
import json

import pytest

from kvslim import repl
from kvslim.repl import Repl, Stats, WordWrap


class Recorder:
    """A backend that answers "ok" and records each request (messages, options)."""

    model = "fake"

    def __init__(self, pieces=("o", "k"), interrupt_at: int | None = None):
        self.requests, self.loaded, self.closed = [], [], 0
        self.pieces, self.interrupt_at = pieces, interrupt_at

    def chat(self, messages, options):
        self.requests.append(([dict(m) for m in messages], dict(options)))

        def gen():
            try:
                for i, p in enumerate(self.pieces):
                    if i == self.interrupt_at:
                        raise KeyboardInterrupt
                    yield p
            finally:
                self.closed += 1
            return Stats(3, 0.5, 2, 0.25, 9.0, 0.5, 8.0)

        return repl.Reply(gen())

    def cache_info(self):
        return {"type_k": "q8_0", "type_v": "q4_0", "requested_k": "q8_0", "requested_v": "q4_0",
                "fallback": False, "reason": None, "bytes": 1000, "bytes_per_token": 10,
                "capacity_tokens": 100, "fused": True, "backend": "cpu", "device": "cpu",
                "flash_attn": "auto", "kv_rotation": "off", "kv_centering": "off",
                "kv_rounding": "ggml"}

    def info(self):
        return [("architecture", "llama"), ("context length", "512")]

    def template(self):
        return "{{ messages }}"

    def load(self, name):
        self.loaded.append(name)
        self.model = name


def script(*lines):
    """A line reader that returns ``lines`` in turn; an exception instance is raised."""
    it = iter(lines)

    def read(prompt):
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def chat(backend, *lines, **kw):
    out, err = io.StringIO(), io.StringIO()
    r = Repl(backend, out=out, err=err, **kw)
    assert r.run(script(*lines)) == 0
    return r, out.getvalue(), err.getvalue()


def test_commands_are_never_sent_to_the_model():
    b = Recorder()
    lines = ["/set parameter temperature 0.25", "/set parameter stop END STOP", "/set system Be terse.",
             "/show parameters", "/show system", "/show info", "/show template", "/?", "/? shortcuts",
             "/show", "/set", "/whatever", "/clear", "hello", "/bye", "never read"]
    r, out, err = chat(b, *lines)
    assert len(b.requests) == 1
    messages, options = b.requests[0]
    assert messages == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}]
    assert options == {"temperature": 0.25, "stop": ["END", "STOP"]}
    assert "Set parameter 'temperature' to '0.25'" in out and "Set system message." in out
    assert "temperature                   0.25" in out and "stop                          END" in out
    assert "Be terse." in out and "architecture        llama" in out and "{{ messages }}" in out
    assert "/set parameter ..." in out and "Ctrl + d" in out and "/show info" in out
    assert "Unknown command '/whatever'. Type /? for help" in out
    assert "Cleared session context" in out and "ok" in out and not err


def test_bad_parameter_is_an_error_line_and_changes_nothing():
    b = Recorder()
    r, out, err = chat(b, "/set parameter bogus 3", "/set parameter top_k many", "/set parameter seed",
                       "hi", "/bye")
    assert err.splitlines() == [
        "Error: unknown parameter 'bogus'; kvslim knows " + ", ".join(repl.PARAMETERS),
        "Error: parameter 'top_k' takes an integer, got 'many'",
        "Error: no value for parameter 'seed'"]
    assert b.requests[0][1] == {}


def test_history_multiline_and_clear():
    b = Recorder()
    chat(b, "one", "", '"""two', 'lines"""', "/clear", "three", "/exit")
    contents = [[m["content"] for m in msgs] for msgs, _ in b.requests]
    assert contents == [["one"], ["one", "ok", "two\nlines"], ["three"]]


def test_ctrl_c_cancels_the_answer_and_keeps_the_session():
    b = Recorder(pieces=("a", "b", "c"), interrupt_at=1)
    r, out, err = chat(b, "first", KeyboardInterrupt(), "/bye")
    assert b.closed == 1 and r.messages == []  # the cancelled turn is not in the history
    assert "Use Ctrl + d or /bye to exit." in out  # Ctrl-C at the prompt does not exit
    b.interrupt_at = None
    r.handle("second")
    assert [m["content"] for m in b.requests[-1][0]] == ["second"]


def test_ctrl_d_exits():
    r, out, err = chat(Recorder(), "hi", EOFError())
    assert out.endswith("\n") and len(r.messages) == 2


def test_save_and_load_a_session(tmp_path):
    b = Recorder()
    path = tmp_path / "s.json"
    r, out, err = chat(b, "/set system Short.", "/set parameter num_predict 7", "hello", f"/save {path}",
                       "/bye")
    saved = json.loads(path.read_text())
    assert saved["messages"][0] == {"role": "user", "content": "hello"} and saved["model"] == "fake"
    b2 = Recorder()
    b2.model = "other"
    r2, out2, _ = chat(b2, f"/load {path}", "again", "/bye")
    assert b2.loaded == ["fake"]  # the session's model
    messages, options = b2.requests[0]
    assert [m["content"] for m in messages] == ["Short.", "hello", "ok", "again"]
    assert options == {"num_predict": 7} and "Loaded session" in out2


def test_load_a_model_clears_the_conversation():
    b = Recorder()
    r, out, err = chat(b, "hi", "/load smollm2", "/bye")
    assert b.loaded == ["smollm2"] and r.messages == [] and "Loading model 'smollm2'" in out


def test_verbose_prints_the_compile_on_its_own_line():
    b = Recorder()
    r, out, err = chat(b, "/set verbose", "hi", "/set quiet", "hi", "/bye")
    assert sum(ln.startswith("eval rate:") for ln in err.splitlines()) == 1  # quiet after the first
    assert "kernel compile:       8s (once per machine; not in the rates)" in err
    assert "eval rate:            8.00 tokens/s" in err  # 2 tokens / 0.25 s: the compile is not in it
    assert "prompt eval rate:     6.00 tokens/s" in err and "K q8_0 / V q4_0" in err


def test_word_wrap_breaks_between_words():
    out = io.StringIO()
    w = WordWrap(out, 12)
    for piece in ["The sky is bl", "ue because air scatters", " blue light.\nNew line here"]:
        w.write(piece)
    w.close()
    lines = out.getvalue().split("\n")
    assert lines == ["The sky is", "blue because", "air scatters", "blue light.", "New line", "here"]
    assert all(len(ln) <= 12 for ln in lines)
    plain = io.StringIO()
    WordWrap(plain, None).write("The sky is blue because air scatters")
    assert plain.getvalue() == "The sky is blue because air scatters"


def test_wrap_only_on_a_terminal():
    assert repl.wrap_width(io.StringIO(), True) is None
    tty = io.StringIO()
    tty.isatty = lambda: True
    assert repl.wrap_width(tty, True) >= 20 and repl.wrap_width(tty, False) is None


# ---------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    from kvslim.llm import LLM

    return LLM(tiny_gguf(ctx=512, tied=False), progress=False)


class Breaking(io.StringIO):
    """Output whose second write is interrupted (Ctrl-C while the answer streams)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        if self.writes == 2:
            raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_on_a_real_model_frees_its_pages(llm):
    backend = repl.Local(llm, loader=None)
    out = Breaking()
    r = Repl(backend, {"temperature": 0, "num_predict": 40}, out=out, err=io.StringIO(), wrap=False)
    r.handle("the cat")
    assert r.messages == [] and not llm.engine.has_work()
    info = llm.kv_cache_info()
    assert info["pages_in_use"] == info.get("pages_prefix_cache", 0), info
    r.out = io.StringIO()
    r.handle("the cat")  # the session goes on
    assert len(r.messages) == 2 and r.messages[1]["content"]


def test_set_num_ctx_rebuilds_the_local_cache(llm):
    backend = repl.Local(llm, loader=None)
    r = Repl(backend, out=io.StringIO(), err=io.StringIO(), wrap=False)
    r.handle("/set parameter num_ctx 256")
    r.handle("/set parameter num_predict 2")
    r.handle("the cat")
    assert llm.kv_cache_info()["num_ctx"] == 256 and len(r.messages) == 2


# ---------------------------------------------------------------- on a terminal


@pytest.mark.slow  # a fresh interpreter on a pseudo-terminal
def test_terminal_chat_history_ctrl_c_and_ctrl_d(tiny_gguf, tmp_path):
    """`kvslim run` on a real (pseudo-)terminal: prompt_toolkit's line editing, history
    kept in ~/.kvslim/history (Up recalls the last message), Ctrl-C at the prompt keeps
    the chat, Ctrl-D ends it with status 0."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from conftest import closed_port

    master, slave = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "KVSLIM_HOST": f"127.0.0.1:{closed_port()}",
           "KVSLIM_MODELS": str(tmp_path / "store"), "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "kvslim.cli", "run", str(tiny_gguf(ctx=512, tied=False)),
                             "--temperature", "0", "-n", "3"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, close_fds=True)
    os.close(slave)
    seen = b""

    def expect(text: str, timeout: float = 300) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text.encode() not in seen:
            assert time.monotonic() < deadline, f"no {text!r} in {seen[-400:]!r}"
            if select.select([master], [], [], 0.5)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert text.encode() in seen, seen[-400:]
        seen = seen[seen.index(text.encode()) + len(text):]

    try:
        expect(">>> ")
        os.write(master, b"/set parameter seed 1\r")
        expect("Set parameter 'seed' to '1'")
        expect(">>> ")  # in raw mode again: Ctrl-C is a key, not the tty's SIGINT
        os.write(master, b"\x03")  # Ctrl-C at the prompt
        expect("Use Ctrl + d or /bye to exit.")
        os.write(master, b"the cat\r")
        expect(">>> ")
        os.write(master, b"\x1b[A")  # Up: the last message comes back for editing
        expect("the cat")
        os.write(master, b"\x15")  # Ctrl-U clears it
        os.write(master, b"/clear\r")
        expect("Cleared session context")
        expect(">>> ")
        os.write(master, b"\x04")  # Ctrl-D exits
        try:
            assert proc.wait(60) == 0
        except subprocess.TimeoutExpired:
            time.sleep(1)
            pytest.fail(f"still running after Ctrl-D; the terminal shows {os.read(master, 65536)[-600:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    history = (tmp_path / ".kvslim" / "history").read_text()
    assert "+the cat" in history and "+/set parameter seed 1" in history


def test_local_reports_the_compile_once_and_outside_the_load(llm):
    backend = repl.Local(llm, loader=None, warmup=(7.5, True))
    first = backend.chat([{"role": "user", "content": "the cat"}], {"num_predict": 3})
    list(first)
    s = first.stats
    assert s.compile_duration == 7.5 and s.load_duration == llm.load_duration
    assert s.total_duration >= 7.5 + s.prompt_eval_duration + s.eval_duration
    assert 0 < s.eval_duration < 7.5 and s.eval_count == 3  # the rates' durations hold no compile
    second = backend.chat([{"role": "user", "content": "the cat"}], {"num_predict": 3})
    list(second)
    assert second.stats.compile_duration == second.stats.load_duration == 0
    cached = repl.Local(llm, loader=None, warmup=(0.25, False))  # loading cached code: load time
    reply = cached.chat([{"role": "user", "content": "the cat"}], {"num_predict": 1})
    list(reply)
    assert reply.stats.compile_duration == 0 and reply.stats.load_duration == llm.load_duration + 0.25
