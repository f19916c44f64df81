"""`kvslim run`, `ps` and `stop` as clients of a real `kvslim serve` (the server's app on a
loopback port, tiny random model): the model stays loaded between runs, answers stream,
errors are one line, Ctrl-C cancels the request on the server, `stop` unloads.
"""
from __future__ import annotations

import io
import socketserver
import threading
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from kvslim import cli, repl
from kvslim.client import Client
from kvslim.settings import ServerSettings
from test_server import running_server, settled, wait_until

pytestmark = pytest.mark.usefixtures("clean_env")

RUN = ["--temperature", "0", "--repeat-penalty", "1", "-n", "5"]


@pytest.fixture(scope="module")
def served(tiny_path):
    settings = ServerSettings.from_env({}, num_parallel=2)
    with running_server(settings, {"tiny": tiny_path}) as s:
        yield s


@pytest.fixture
def at_server(served, monkeypatch):
    monkeypatch.setenv("KVSLIM_HOST", served.url)
    return served


def one_error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_run_answers_through_the_server_and_the_model_stays_loaded(capsys, at_server):
    direct = httpx.post(f"{at_server.url}/api/chat", timeout=60, json={
        "model": "tiny", "stream": False, "messages": [{"role": "user", "content": "the cat"}],
        "options": {"temperature": 0, "repeat_penalty": 1, "num_predict": 5}}).json()
    runner = at_server.runner("tiny")
    assert cli.main(["run", "tiny", "the cat", *RUN]) == 0
    out, err = capsys.readouterr()
    assert out == direct["message"]["content"] + "\n" and "compiling" not in err
    assert at_server.runner("tiny") is runner  # the same loaded model answered
    assert cli.main(["run", "tiny", "the cat", *RUN, "--verbose", "--kv-cache-type", "q8_0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # a q8_0 pool (rebuilt by the server) may change the answer
    for field in ("total duration:", "load duration:", "prompt eval rate:",
                  "eval count:           5 token(s)", "K q8_0 / V q8_0 (asked for q8_0 / q8_0)",
                  "attention:            cpu (fused) on cpu"):
        assert field in err, (field, err)
    assert at_server.runner("tiny") is runner  # the weights stayed; only the pool changed


def test_errors_from_the_server_are_one_line(capsys, at_server):
    line = one_error(capsys, ["run", "nope", "hi"])
    assert "nope" in line and "cannot be pulled" in line
    assert one_error(capsys, ["run", "tiny", "hi", "--think"]) == 'Error: "tiny" does not support thinking'
    assert one_error(capsys, ["run", "tiny", "--think", "hi"]) == 'Error: "tiny" does not support thinking'
    assert cli.main(["run", "tiny", "the cat", "--think=false", *RUN]) == 0
    line = one_error(capsys, ["run", "tiny", "the cat " * 400, "-n", "2"])  # context 256, no --truncate
    assert "context" in line, line
    assert "--keepalive" in one_error(capsys, ["run", "tiny", "hi", "--keepalive", "soon"])


def test_server_only_flags_are_ignored_with_a_warning(capsys, at_server):
    assert cli.main(["run", "tiny", "the cat", *RUN, "--flash-attn", "off"]) == 0
    assert "--flash-attn is a setting of the server" in capsys.readouterr().err


def test_ps_and_stop(capsys, at_server):
    assert cli.main(["run", "tiny", "the cat", *RUN, "--keepalive", "1h"]) == 0
    capsys.readouterr()
    assert cli.main(["ps"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("tiny:latest"))
    assert "100% CPU" in row and "f16/f16" in row and "pages)" in row
    assert "59 minutes from now" in row or "1 hour from now" in row
    assert cli.main(["stop", "tiny"]) == 0
    wait_until(lambda: not httpx.get(f"{at_server.url}/api/ps").json()["models"], what="unload")
    assert cli.main(["ps"]) == 0
    assert "tiny" not in capsys.readouterr().out
    assert one_error(capsys, ["stop", "tiny"]) == 'Error: couldn\'t find model "tiny" to stop'


def test_ps_and_stop_without_a_server(capsys):
    assert "could not connect to a kvslim server" in one_error(capsys, ["ps"])
    assert "could not connect to a kvslim server" in one_error(capsys, ["stop", "tiny"])


def test_ctrl_c_cancels_the_request_on_the_server(at_server):
    client = Client.from_env()
    backend = repl.Remote(client, "tiny")
    backend.preload()

    class Breaking(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return super().write(s)

    chat = repl.Repl(backend, {"num_predict": 200, "temperature": 0}, out=Breaking(),
                     err=io.StringIO(), wrap=False)
    chat.handle("the cat")
    assert chat.messages == []
    wait_until(lambda: settled(at_server.url, "tiny"), what="the request's pages to return")
    chat.out = io.StringIO()
    chat.handle("/set parameter num_predict 3")
    chat.handle("the cat")
    assert len(chat.messages) == 2 and chat.messages[1]["content"]


def test_interactive_chat_through_the_server(capsys, monkeypatch, at_server):
    import sys
    import types

    lines = iter(["/set parameter num_predict 3", "/set parameter temperature 0", "the cat",
                  "/show info", "/show template", "/bye"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True))
    assert cli.main(["run", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "architecture        llama" in out and f"server              {at_server.url}" in out
    assert "Set parameter 'num_predict' to '3'" in out


class NotKvslim(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"Ollama is running")

    def log_message(self, *args):
        pass


def test_another_server_at_the_address_is_not_used(capsys, monkeypatch, tiny_path):
    with socketserver.TCPServer(("127.0.0.1", 0), NotKvslim) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        monkeypatch.setenv("KVSLIM_HOST", f"127.0.0.1:{httpd.server_address[1]}")
        assert Client.find() is None
        assert cli.main(["run", str(tiny_path), "the cat", *RUN]) == 0  # in-process
        assert capsys.readouterr().out.strip()
        httpd.shutdown()


def test_the_server_compiles_at_load_and_says_so(monkeypatch, caplog, tiny_path):
    from kvslim import warmup
    from kvslim.server.models import Runner

    calls = []
    monkeypatch.setattr(warmup, "needs_compile", lambda: True)
    real = warmup.warmup
    monkeypatch.setattr(warmup, "warmup", lambda types: calls.append(list(types)) or real(types))
    runner = Runner("tiny", tiny_path, ServerSettings.from_env({}, kv_cache_type="q8_0", num_parallel=1))
    try:
        assert calls == [["q8_0"]]
        assert "tiny: compiling CPU kernels (once per machine, about 1.5 min on 2 cores)" in caplog.text
    finally:
        runner.close()
