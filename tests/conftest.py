import os

import pytest

# Keep numba/torch from fighting over the two cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2 GGUF, pulled once into the default store (~/.cache/kvslim/models)."""
    from kvslim import store

    return store.resolve("smollm2", pull_missing=True)


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
