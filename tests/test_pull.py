"""`kvslim pull` from Hugging Face and the Ollama registry, against local servers speaking
their protocols (tests/fake_hubs.py): success, progress, the card layers, resume after a
cut, bad digests, 404, a full disk, concurrent pulls; and the Go template translation."""
from __future__ import annotations

import errno
import json
import threading

import pytest

from kvslim import download, store
from kvslim.gotemplate import TemplateError, to_jinja
from kvslim.pull import pick_gguf, pull
from kvslim.store import PullError, UnknownModelError
from kvslim.tokenizer import _compile_template

from fake_hubs import FakeHub, FakeRegistry, FakeServer, sha

pytestmark = pytest.mark.usefixtures("clean_env")

LEGACY = ("{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
          "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n")
PARAMS = json.dumps({"temperature": 0.3, "stop": ["<|end|>"], "num_keep": 4})


@pytest.fixture
def served():
    with FakeServer() as s:
        yield s


@pytest.fixture
def data(tiny_gguf) -> bytes:
    return tiny_gguf(ctx=256, tied=False).read_bytes()  # a real GGUF (no chat template)


@pytest.fixture
def hub(served, monkeypatch) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    return FakeHub(served)


@pytest.fixture
def reg(served, monkeypatch) -> FakeRegistry:
    monkeypatch.setenv("KVSLIM_REGISTRY", served.url)
    return FakeRegistry(served)


def store_files() -> list[str]:
    root = store.store_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def nothing_runnable(name: str) -> None:
    """A failed pull: `list` shows nothing and `run` finds nothing."""
    assert store.list_models() == []
    with pytest.raises(UnknownModelError):
        store.resolve(name)


# ---------------------------------------------------------------- Hugging Face


def test_hf_pull_picks_q4_k_m_reports_progress_and_sends_the_token(hub, served, data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.add("user/Tiny-GGUF", {"tiny.Q8_0.gguf": b"GGUF other", "tiny.Q4_K_M.gguf": data,
                               "mmproj-tiny-Q4_K_M.gguf": b"GGUF projector"})
    lines = []
    path = pull("hf.co/user/Tiny-GGUF", lines.append)
    assert path.name == "tiny.Q4_K_M.gguf" and path.read_bytes() == data
    assert [e.name for e in store.list_models()] == ["hf.co/user/Tiny-GGUF"]
    assert store.resolve("huggingface.co/user/Tiny-GGUF:latest") == path
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    bars = [ln for ln in lines if "completed" in ln]
    assert bars[0]["completed"] == 0 and bars[-1] == {
        "status": f"pulling {sha(data)[:12]}", "digest": f"sha256:{sha(data)}",
        "total": len(data), "completed": len(data)}
    downloads = [h for p, h in served.log if "/resolve/" in p]
    assert [h.get("authorization") for h in downloads] == ["Bearer hf_secret"]
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == sha(data) and manifest["source"].startswith("hf:user/Tiny-GGUF@")
    pull("hf.co/user/Tiny-GGUF")  # present and verified by its manifest: no download
    assert len([p for p in served.paths() if "/resolve/" in p]) == 1


def test_hf_quant_is_matched_case_insensitively_or_named_missing(hub, data):
    hub.add("user/repo", {"Repo-Q8_0.gguf": data, "Repo-Q4_K_M.gguf": b"GGUF x"})
    assert pull("hf.co/user/repo:q8_0").name == "Repo-Q8_0.gguf"
    with pytest.raises(PullError, match="no .gguf file for quant 'Q2_K'; its files: Repo-Q4_K_M.gguf, Repo-Q8_0.gguf"):
        pull("hf.co/user/repo:Q2_K")
    assert [e.name for e in store.list_models()] == ["hf.co/user/repo:q8_0"]


def test_pick_gguf_default_order_split_files_and_single_files():
    files = ["a-Q8_0.gguf", "a-Q4_0.gguf", "a-IQ4_NL.gguf"]
    assert pick_gguf(files, None, "u/r") == "a-Q4_0.gguf"  # no Q4_K_M / Q4_K_S: Q4_0 next
    assert pick_gguf(["model.gguf"], None, "u/r") == "model.gguf"
    with pytest.raises(PullError, match="split into several files"):
        pick_gguf(["a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf"], None, "u/r")
    with pytest.raises(PullError, match="no .gguf file"):
        pick_gguf(["README.md"], None, "u/r")
    assert pick_gguf(["x/a-q4_k_m.gguf", "a-Q4_K_M.gguf"], "Q4_K_M", "u/r") == "a-Q4_K_M.gguf"


def test_hf_404_and_bad_digest_leave_nothing(hub, data):
    with pytest.raises(PullError, match="hf.co/user/missing: not found"):
        pull("hf.co/user/missing")
    hub.add("user/bad", {"bad.Q4_K_M.gguf": data}, wrong_sha=True)
    with pytest.raises(PullError, match="sha256"):
        pull("hf.co/user/bad")
    nothing_runnable("hf.co/user/bad")
    assert store_files() == []  # the wrong bytes are not kept for a resume


# ---------------------------------------------------------------- the Ollama registry


def test_registry_pull_with_template_params_system_license(reg, served, data):
    reg.add("library/tiny", "latest", data, template=LEGACY, params=PARAMS, system="Be brief.",
            license="Tiny License")
    lines = []
    path = pull("tiny", lines.append)
    assert path.read_bytes() == data and store.resolve("tiny:latest") == path
    assert any(p.startswith("/cdn/") for p in served.paths())  # blobs followed to the "CDN"
    assert {"status": "parameters kvslim does not use: num_keep"} in lines
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["parameters"] == {"temperature": 0.3, "stop": ["<|end|>"]}
    assert manifest["system"] == "Be brief." and manifest["license"] == "Tiny License"
    assert manifest["template"] == LEGACY and manifest["source"].endswith("/library/tiny:latest")
    # the GGUF has no chat template: the registry's is translated and used, with the system
    from kvslim.llm import LLM

    llm = LLM("tiny", device="cpu", num_ctx=64)
    assert llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert llm.default_options == {"temperature": 0.3, "stop": ["<|end|>"]}


def test_registry_template_that_cannot_be_translated_is_named(reg, data, caplog):
    reg.add("someone/odd", "v1", data, template='{{ template "x" . }}')
    lines = []
    path = pull("someone/odd:v1", lines.append)
    warning = next(ln["status"] for ln in lines if ln["status"].startswith("warning:"))
    assert "'{{ template }}' is not translated" in warning and "ChatML" in warning
    assert "chat_template" not in json.loads((path.parent / "manifest.json").read_text())


def test_registry_404_leaves_nothing(reg):
    with pytest.raises(PullError, match="model 'nosuch' not found in the registry"):
        pull("nosuch")
    nothing_runnable("nosuch")
    assert store_files() == []


def test_resume_after_a_cut_download(reg, served, data):
    reg.add("library/tiny", "latest", data)
    served.cut[f"/cdn/{sha(data)}"] = 3000
    with pytest.raises(PullError, match="pull again to resume"):
        pull("tiny")
    nothing_runnable("tiny")
    kept = [p for p in store.store_dir().rglob(".resume-*")]
    assert [p.stat().st_size for p in kept] == [3000]
    path = pull("tiny")
    assert path.read_bytes() == data
    ranges = [h.get("range") for p, h in served.log if p == f"/cdn/{sha(data)}"]
    assert ranges == [None, "bytes=3000-"]
    assert store_files() == ["tiny", "tiny/manifest.json", "tiny/tiny-latest.gguf"]


def test_bad_digest_is_refused_and_not_kept(reg, data):
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 1
    reg.add("library/tiny", "latest", data, served=bytes(corrupt))
    with pytest.raises(PullError, match=f"differs from the expected {sha(data)}"):
        pull("tiny")
    nothing_runnable("tiny")
    assert store_files() == []


def test_disk_full_is_one_clear_error_and_the_next_pull_resumes(reg, served, data, monkeypatch):
    reg.add("library/tiny", "latest", data)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, chunk):  # what fits is written, as on a real disk
            room = 5000 - self.f.tell()
            self.f.write(chunk[:max(room, 0)])
            if len(chunk) > room:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(PullError, match="no space left on the device"):
        pull("tiny")
    nothing_runnable("tiny")
    monkeypatch.delattr(download, "open")  # space freed
    assert pull("tiny").read_bytes() == data
    ranges = [h.get("range") for p, h in served.log if p == f"/cdn/{sha(data)}"]
    assert ranges == [None, "bytes=5000-"]


def test_concurrent_pulls_of_one_model_download_it_once(reg, served, data):
    reg.add("library/tiny", "latest", data)
    paths, errors = [], []

    def one():
        try:
            paths.append(pull("tiny"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(paths)) == 1 and paths[0].read_bytes() == data
    assert served.paths().count(f"/cdn/{sha(data)}") == 1
    assert store_files() == ["tiny", "tiny/manifest.json", "tiny/tiny-latest.gguf"]


def test_registry_names():
    from kvslim.registry import parse

    r = parse("llama3.2")
    assert (r.base, r.namespace, r.model, r.tag) == ("http://127.0.0.1:9", "library", "llama3.2", "latest")
    r = parse("registry.example.org/team/m:q4")
    assert (r.base, r.namespace, r.model, r.tag) == ("https://registry.example.org", "team", "m", "q4")
    with pytest.raises(ValueError, match="invalid model name"):
        parse("bad name")


# ---------------------------------------------------------------- Go templates


MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
LLAMA = ('{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>\n'
         '{{- if .System }}\n\n{{ .System }}\n{{- end }}\n{{- end }}<|eot_id|>\n'
         '{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n'
         '{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
         '{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n'
         '{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
         '{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}\n{{- end }}\n{{- end }}')


def render(go: str, messages=MESSAGES) -> str:
    return _compile_template(to_jinja(go)).render(messages=messages)


def test_messages_template_renders_as_ollama_would():
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert render(LLAMA) == (h.format("system") + "S<|eot_id|>" + h.format("user") + "hi<|eot_id|>" +
                             h.format("assistant") + "yo<|eot_id|>" + h.format("user") +
                             "again<|eot_id|>" + h.format("assistant"))


def test_legacy_template_runs_per_turn_and_stops_after_the_response():
    assert render(LEGACY) == ("<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n"
                              "<|user|>\nagain<|end|>\n<|assistant|>\n")


def test_template_braces_and_trimming_are_kept_literally():
    go = '{"a": {{ .Prompt }}}  \n  {{- if .Prompt -}}  \n  [{% raw %}]{{ end }}{{ .Response }}'
    assert render(go, [{"role": "user", "content": "1"}]) == '{"a": 1}[{% raw %}]'


@pytest.mark.parametrize("go, what", [
    ('{{ template "x" }}', "template"), ("{{ .Prompt | html }}", "pipelines"),
    ("{{ printf \"%s\" .Prompt }}", "printf"), ("{{ if .Prompt }}", "without its {{ end }}"),
    ("{{ .Unknown }}", ".Unknown"), ("{{ $x := 1 }}{{ $x = 2 }}", "assignment"),
])
def test_untranslatable_templates_are_named(go, what):
    with pytest.raises(TemplateError, match=what if what[0] != "{" else "end"):
        to_jinja(go)


def test_hf_without_huggingface_hub_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(PullError, match=r"pip install 'kvslim\[hf\]'"):
        pull("hf.co/user/repo")


def test_ctrl_c_mid_download_keeps_nothing_runnable_and_the_next_pull_resumes(reg, served, data,
                                                                              monkeypatch):
    reg.add("library/tiny", "latest", data)
    monkeypatch.setattr(download, "REPORT_EVERY_S", 0.0)  # a progress line per chunk received

    def interrupt(line):
        if line.get("completed"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull("tiny", interrupt)
    nothing_runnable("tiny")
    assert pull("tiny").read_bytes() == data
    ranges = [h.get("range") for p, h in served.log if p == f"/cdn/{sha(data)}"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1] != "bytes=0-"


def test_cli_pull_draws_ollama_progress_on_a_terminal(reg, data, monkeypatch, capsys):
    import io
    import sys

    from kvslim import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    reg.add("library/tiny", "latest", data)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert cli.main(["pull", "tiny"]) == 0
    assert capsys.readouterr().out == f"success: {store.resolve('tiny')}\n"
    shown = term.getvalue()
    for status in ("pulling manifest", f"pulling {sha(data)[:12]}", "verifying sha256 digest",
                   "writing manifest"):
        assert status in shown
    assert "100%" in shown and "pip" not in shown


def test_a_digest_that_is_not_a_sha256_never_names_a_file(reg, served, data):
    reg.add("library/tiny", "latest", data)
    manifest = served.json["/v2/library/tiny/manifests/latest"]
    manifest["layers"][0]["digest"] = "sha256:" + "../" * 21 + "x"  # 64 characters
    with pytest.raises(PullError, match="without a valid sha256 digest"):
        pull("tiny")
    assert store_files() == []
    with pytest.raises(PullError, match="no valid sha256"):  # the download's own check
        download.fetch(None, download.Blob("http://x", "../" * 21 + "x", 1), store.store_dir(), print)


def test_resolve_or_pull_pulls_only_what_is_missing(reg, served, data, tmp_path):
    from kvslim.pull import resolve_or_pull

    reg.add("library/tiny", "latest", data)
    path = resolve_or_pull("tiny")
    assert resolve_or_pull("tiny:latest") == path and path.read_bytes() == data
    assert served.paths().count("/v2/library/tiny/manifests/latest") == 1
    with pytest.raises(UnknownModelError, match="no such file"):
        resolve_or_pull(str(tmp_path / "typo.gguf"))
    with pytest.raises(ValueError, match="invalid model name"):
        resolve_or_pull("./not a model")
