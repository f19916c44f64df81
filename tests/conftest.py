import os

import pytest

# Keep numba/torch from fighting over the two cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2 GGUF, pulled once into the default store (~/.cache/kvslim/models)."""
    from kvslim import store

    return store.resolve("smollm2", pull_missing=True)
