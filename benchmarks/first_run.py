"""A first `kvslim run` on a new machine against a later one: where the kernel compile goes.

Runs `kvslim run MODEL PROMPT --verbose` twice in fresh processes sharing one empty numba
cache directory (a new machine, then every later run) and prints, for each, the wall
time, the compile `--verbose` reports, the time to the first answer byte, and the rates.
A first run should differ from a later one only by its compile, paid before the first
token: equal eval rates, and a time to first token larger by about the compile.

    python benchmarks/first_run.py                       # smollm2, q8_0, 32 tokens
    python benchmarks/first_run.py --model x.gguf --kv-cache-type q4_0 -n 64
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"compile": r"kernel compile:\s+(\S+)", "load": r"load duration:\s+(\S+)",
           "prompt rate": r"prompt eval rate:\s+(\S+)", "eval rate": r"\neval rate:\s+(\S+)"}


def seconds(go: str) -> float:
    """A Go duration as `--verbose` prints it (1.5s, 12ms, 40µs) in seconds."""
    value, unit = re.fullmatch(r"([\d.]+)(s|ms|µs)", go).groups()
    return float(value) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6}[unit]


def run_once(argv: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    p.stdout.read()
    p.wait()
    reader.join()
    wall = time.perf_counter() - t0
    text = err[0].decode()
    if p.returncode or not first:
        sys.exit(f"kvslim run failed ({p.returncode}):\n{text}")
    row = {"wall s": wall, "first token s": t_first}
    for name, pattern in FIGURES.items():
        m = re.search(pattern, text)
        row[name] = (seconds(m.group(1)) if "rate" not in name else float(m.group(1))) if m else 0.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", default="Why is the sky blue?")
    ap.add_argument("--kv-cache-type", default="q8_0")
    ap.add_argument("-n", type=int, default=32, help="tokens to generate")
    args = ap.parse_args()
    argv = [sys.executable, "-m", "kvslim.cli", "run", args.model, args.prompt, "--verbose",
            "--kv-cache-type", args.kv_cache_type, "-n", str(args.n), "--temperature", "0"]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT),
               "KVSLIM_HOST": "127.0.0.1:9"}  # in-process, whatever server runs here
        rows = [("first run", run_once(argv, env)), ("later run", run_once(argv, env))]
    cols = list(rows[0][1])
    print(f"{'':<10}" + "".join(f"{c:>15}" for c in cols))
    for name, row in rows:
        print(f"{name:<10}" + "".join(f"{row[c]:>15.2f}" for c in cols))


if __name__ == "__main__":
    main()
