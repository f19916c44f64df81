import os

import pytest

# Keep numba/torch from fighting over the two cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2 GGUF, pulled once into the default store (~/.cache/kvslim/models)."""
    from kvslim import store

    return store.resolve("smollm2", pull_missing=True)


GEMMA3_ELSEWHERE = "/work/models/gemma/gemma-3-270m-q4_k_m.gguf"  # this project's machines


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the real Gemma 3 270M GGUF: the store's copy (`kvslim pull gemma3:270m`),
    else the project machines' copy; never pulled here (four wheels, 253 MB), so tests
    that need it are skipped where neither exists."""
    from pathlib import Path

    from kvslim import store

    for path in (store.model_path(store.lookup("gemma3:270m")), Path(GEMMA3_ELSEWHERE)):
        if path.is_file():
            return path
    pytest.skip("Gemma 3 270M GGUF not found: `python -m kvslim.cli pull gemma3:270m` puts it "
                f"in the store (or place it at {GEMMA3_ELSEWHERE})")


JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


@pytest.fixture(scope="session")
def jargon_text():
    """The Jargon File (English prose, Debian package jargon-text, as `kvslim bench` reads
    by default); tests that need it are skipped where it is not installed."""
    import gzip
    from pathlib import Path

    if not Path(JARGON).exists():
        pytest.skip(f"{JARGON} is missing: install the Debian package jargon-text")
    with gzip.open(JARGON, "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """``make(**fields)``: the path of a tiny random GGUF (tests/tiny_llama.py) with those
    ``Tiny`` fields, written once per session and shared by the modules that ask for it."""
    import tiny_llama

    made = {}

    def make(**fields):
        key = tuple(sorted(fields.items()))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
            tiny_llama.write(made[key], tiny_llama.Tiny(**fields))
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny_path(tiny_gguf):
    """The tiny model the engine, server and prefix tests run (context 256, untied
    embeddings so greedy text varies); a module may override it."""
    return tiny_gguf(ctx=256, tied=False)


@pytest.fixture(scope="module")
def tiny_parts(tiny_path):
    """(model, tokenizer) of ``tiny_path``."""
    import tiny_llama

    return tiny_llama.load(tiny_path)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No KVSLIM_* setting from the caller's environment, and an empty model store."""
    for name in ("KVSLIM_KV_CACHE_TYPE", "KVSLIM_FLASH_ATTENTION", "KVSLIM_CONTEXT_LENGTH", "KVSLIM_DEBUG",
                 "KVSLIM_KV_ROTATION", "KVSLIM_KV_CENTERING", "KVSLIM_KV_ROUNDING", "KVSLIM_PREFIX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("OLLAMA_KV_CACHE_TYPE", "OLLAMA_FLASH_ATTENTION", "OLLAMA_CONTEXT_LENGTH", "OLLAMA_MODELS"):
        monkeypatch.delenv(name, raising=False)  # read when the KVSLIM_* name is unset
    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "store"))
    # pulls never reach the network: nothing listens on the discard port (tests that pull
    # point these at a local fake registry / Hub)
    monkeypatch.setenv("KVSLIM_REGISTRY", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # `kvslim run` is the client of a server running at KVSLIM_HOST / OLLAMA_HOST: point
    # them at a closed port, so a server someone runs on this machine is never used
    for name in ("OLLAMA_HOST", "KVSLIM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KVSLIM_HOST", f"127.0.0.1:{closed_port()}")


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(server):
    """The official ollama client of the module's ``server`` fixture (a running kvslim
    server: ``test_server.running_server``)."""
    import ollama

    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture
def oai(server):
    """The official openai client of the module's ``server`` fixture."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
