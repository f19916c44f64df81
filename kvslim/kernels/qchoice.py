"""Which dot the decode GEMV runs per weight type: chosen by a measurement on this machine.

``kernels.qmatmul`` has two fused dots for the hot types: the float one (codes widened to
float32, exact in x) and the integer one (x rounded to 15-bit integers per 32 values, integer
SIMD multiply-adds). Which is faster depends on the CPU (its integer and float SIMD, its
memory bandwidth against its cores), so it is measured, not assumed: both timed in turn
on the same random matrix per type, the integer dot taken where it is at least
``MARGIN`` faster (the float dot has no rounding of x to give up). The choice is kept on
disk, keyed by the CPU model, numba's target CPU and features, and the kernels' source,
in ``$XDG_CACHE_HOME/kvslim/kernels`` (default ``~/.cache/kvslim/kernels``): a machine
measures once (about a second), a new CPU, release or edit of the dots measures again.

``KVSLIM_QDOT`` forces it: ``int`` (the integer dot wherever there is one), ``float``,
or ``auto`` (the default: the measured choice).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from kvslim import atomic
from kvslim.kernels import qmatmul as qm

__all__ = ["ENV", "MODES", "gemv_ints", "measure", "cache_path"]

log = logging.getLogger("kvslim")

ENV = "KVSLIM_QDOT"
MODES = ("auto", "int", "float")
MARGIN = 0.97  # the integer dot must take at most this fraction of the float dot's time
_MEASURED: dict[str, np.ndarray] = {}  # key -> ints, for this process


def gemv_ints(mode: str | None = None) -> np.ndarray:
    """int8 [type codes] for ``qmatmul.gemv(ints=...)``: 1 where the integer dot runs.
    ``mode`` (default ``KVSLIM_QDOT``, else auto): int, float or auto."""
    mode = (mode or os.environ.get(ENV) or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: choose from {', '.join(MODES)}")
    if mode == "int":
        return qm.INT_DOTS
    if mode == "float":
        return qm.FLOAT_DOTS
    key = machine_key()
    got = _MEASURED.get(key)
    if got is None:
        got = _load(cache_path(key), key)
        if got is None:
            names = measure()
            got = _ints(n for n, pick in names.items() if pick == "int")
            _save(cache_path(key), key, names)
        _MEASURED[key] = got
    return got


def machine_key() -> str:
    """What the choice depends on: the CPU model, the code numba generates for it, and the
    kernels' own source (any release or edit that changes a dot measures again)."""
    from numba.core.registry import cpu_target

    codegen = cpu_target.target_context.codegen()
    try:
        target = f"{codegen._get_host_cpu_name()} {codegen._tm_features}"
    except AttributeError:  # numba internals moved: the CPU model alone
        target = ""
    source = hashlib.sha256(Path(qm.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    return f"{_cpu_model()}|{target}|kernels {source}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path(key: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kvslim" / "kernels" / f"qdot-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measure(rows: int = 2048, cols: int = 4096, repeat: int = 12) -> dict[str, str]:
    """{type name: "int" or "float"} for every type with an integer dot: both GEMVs of one
    input row on the same random [rows, cols] matrix, timed in turn, best of ``repeat``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    y = np.empty((1, rows), np.float32)
    out = {}
    for code in np.flatnonzero(qm.INT_DOTS):
        qt = qm.TYPES[code]
        data, parts, work = _random_matrix(qt, int(code), rows, cols, rng)
        ints = np.zeros_like(qm.INT_DOTS)
        ints[code] = 1
        t_int, t_float = _best_of_pair(lambda: qm.gemv(data, parts, work, x, y, ints=ints),
                                       lambda: qm.gemv(data, parts, work, x, y), repeat)
        out[qt.name] = "int" if t_int <= MARGIN * t_float else "float"
        log.debug("qdot %s: integer %.3f ms, float %.3f ms", qt.name, t_int * 1e3, t_float * 1e3)
    return out


def _random_matrix(qt, code: int, rows: int, cols: int, rng):
    """Random bytes as [rows, cols] blocks of qt (the time does not depend on the values;
    an f16 scale may be anything, even inf or NaN, at no cost to the SIMD)."""
    from gguf import GGML_QUANT_SIZES

    n, size = GGML_QUANT_SIZES[qt]
    row_bytes = cols // n * size
    data = rng.integers(0, 256, rows * row_bytes, dtype=np.uint8)
    data.flags.writeable = False  # as the mapped file
    parts = np.array([[0, row_bytes, code, rows, 0, 0]], dtype=np.int64)
    return data, parts, qm.plan_work(parts, 64)


def _best_of_pair(fa, fb, repeat: int) -> tuple[float, float]:
    fa(), fb()  # compile, warm the caches
    ta, tb = [], []
    for _ in range(repeat):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def _ints(names) -> np.ndarray:
    ints = np.zeros_like(qm.INT_DOTS)
    for name in names:
        code = [t.name for t in qm.TYPES].index(name)
        ints[code] = qm.INT_DOTS[code]
    return ints


def _load(path: Path, key: str) -> np.ndarray | None:
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return None
        return _ints(name for name, pick in data["dots"].items() if pick == "int")
    except Exception:  # absent, cut short, or not ours: measure again
        return None


def _save(path: Path, key: str, names: dict[str, str]) -> None:
    text = json.dumps({"key": key, "dots": names}, indent=1)
    atomic.save(path, lambda tmp: tmp.write_text(text), "qdot choice")