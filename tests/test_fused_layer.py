"""The opt-in fused decode step (``KVSLIM_FUSED_LAYERS=1``): ``fused_layer_cases.py`` in a
child process. Compiling the step job compiles its pieces again inside it, and a process
that has done so was measured to compute the separate calls differently too (a cache
file's continuation in another process no longer matched); the rest of the suite must
not run in such a process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # compiles the step job (~20 s) into its own numba cache entry
def test_fused_layer_cases_in_a_child_process():
    env = {**os.environ, "KVSLIM_FUSED_LAYERS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                          "slow or not slow", str(HERE / "fused_layer_cases.py")],
                         cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
