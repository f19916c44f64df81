"""Hostile-client benchmark (issue 15): what a careless or malicious client can do to
`kvslim serve` on 127.0.0.1, re-measured in one short run.

    python benchmarks/hostile.py                         # smollm2, about 1-2 minutes
    python benchmarks/hostile.py --fuzz 3000 --pulls 48 --prefill 4096

Phases, each bounded:

1. fuzz: --fuzz requests built from valid bodies of every endpoint by one mutation each
   (a field of the wrong type, NaN/Infinity literals, huge or negative numbers, deep
   nesting, invalid UTF-8, a truncated body, an odd Content-Type, a foreign Host or
   Origin). Counted by status class; a 5xx, a dead server or a K/V page owned by no
   request (``KVCache.check()``, pages held by sequences after the phase) is a failure.
2. poisoned batch: 4 seeded streams alone, then again beside requests with poisonous
   sampling options; the streams must be byte-identical and the poison refused (400).
3. concurrent pulls: --pulls threads pull one fake model (a local wheel, no network)
   into an empty store at once, half of them forcing a new download; then a pull killed
   with SIGKILL mid-copy and one more pull. Failures and leftover files are counted.
4. long prefill: time to first token of a 2-token request alone and while a
   --prefill-token prompt is being evaluated (head-of-line blocking, issue 15 item 4).

The machine is shared: the load average is printed with the table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvslim import store  # noqa: E402
from kvslim.server.app import create_app  # noqa: E402
from kvslim.settings import ServerSettings as Settings  # noqa: E402

JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


# ---------------------------------------------------------------- the server


class Server:
    """uvicorn serving ``create_app`` on a free loopback port, in a thread of this process
    (so the phases can look at the engine's pages)."""

    def __init__(self, settings: Settings, models: dict):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = dataclasses.replace(settings, host="127.0.0.1", port=port)
        self.url, self.app = settings.address, create_app(settings, models)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                     log_level="critical"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + "/api/version", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def leaked_pages(self) -> int:
        """Pages owned by sequences once every request is over (the prefix cache's are fine)."""
        deadline = time.monotonic() + 30
        while True:
            leaked = 0
            for runner in self.app.state.registry.loaded():
                cache = runner.engine.cache
                cache.check()
                prefix = runner.engine.prefix_cache
                leaked += cache.pages_in_use - (len(prefix.pages(cache)) if prefix else 0)
            if leaked == 0 or time.monotonic() > deadline:
                return leaked
            time.sleep(0.1)


# ---------------------------------------------------------------- 1. fuzz


def valid_bodies(model: str) -> list[tuple[str, dict]]:
    opts = {"num_predict": 2, "temperature": 0.5, "top_k": 20, "seed": 1}
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("/api/generate", {"model": model, "prompt": "Why is the sky blue?", "stream": False,
                           "options": opts}),
        ("/api/generate", {"model": model, "prompt": "Tell me a story", "options": opts}),
        ("/api/chat", {"model": model, "messages": msgs, "stream": False, "options": opts}),
        ("/api/chat", {"model": model, "messages": msgs, "options": opts}),
        ("/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": 2,
                                  "temperature": 0.5}),
        ("/v1/completions", {"model": model, "prompt": "Once", "max_tokens": 2, "stream": True}),
        ("/api/show", {"model": model}),
        ("/api/pull", {"model": "not-a-model-" + "x" * 8}),  # never a real download
    ]


WEIRD = [None, True, -1, 0, 2**64, -2**63 - 1, 1e308, -1e308, 1e-40, "", "x" * 1000, [], {},
         [[[]]], "NaN", {"a": {"b": []}}]
LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-0", "18446744073709551616"]


def _paths(value, prefix=()):
    """Every key path of nested dicts (lists are leaves)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


def _set(body: dict, path: tuple, value) -> dict:
    body = json.loads(json.dumps(body))
    target = body
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return body


def mutate(rng: random.Random, path: str, body: dict) -> tuple[str, bytes, dict]:
    """One hostile variant of a valid request: (path, raw body, extra headers)."""
    kind = rng.randrange(9)
    # the length limits stay: a fuzzed request may be refused, never run to the full context
    keys = [k for k in _paths(body) if k not in (("options",), ("options", "num_predict"), ("max_tokens",))]
    headers = {}
    if kind == 0:  # a field of the wrong type or an extreme value
        raw = json.dumps(_set(body, rng.choice(keys), rng.choice(WEIRD))).encode()
    elif kind == 1:  # a JSON literal Python's parser accepts and JSON does not
        key = rng.choice([k for k in keys if k[-1] in ("temperature", "top_p", "num_predict",
                                                         "seed", "max_tokens", "top_k")] or keys)
        raw = json.dumps(_set(body, key, "__LIT__")).replace('"__LIT__"', rng.choice(LITERALS)).encode()
    elif kind == 2:  # deep nesting
        depth = rng.choice([65, 1000, 50_000])
        raw = json.dumps(_set(body, rng.choice(keys), "__D__")).replace(
            '"__D__"', "[" * depth + "]" * depth).encode()
    elif kind == 3:  # invalid UTF-8 (bytes >= 0x80: junk digits could make a valid, long request)
        raw = json.dumps(body).encode()
        cut = rng.randrange(len(raw))
        raw = raw[:cut] + bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 8))) + raw[cut:]
    elif kind == 4:  # truncated
        raw = json.dumps(body).encode()[:rng.randrange(1, 40)]
    elif kind == 5:  # unknown fields
        raw = json.dumps(_set(body, ("keep_alive",), "5m")).encode()[:-1] + b', "bogus": [1]}'
    elif kind == 6:  # odd content types (must not matter)
        raw = json.dumps(body).encode()
        headers["Content-Type"] = rng.choice(["application/x-www-form-urlencoded", "text/plain",
                                              "multipart/form-data; boundary=x", "image/png"])
    elif kind == 7:  # a cross-site page or a rebound name
        raw = json.dumps(body).encode()
        headers[rng.choice(["Origin", "Host"])] = rng.choice(["https://evil.example", "evil.example",
                                                              "null", "http://localhost.evil.example"])
    else:  # not an object at all
        raw = rng.choice([b"[]", b"1", b'"x"', b"null", b"", b" "])
    return path, raw, headers


def fuzz(server: Server, model: str, n: int, seed: int, workers: int = 8) -> dict:
    rng = random.Random(seed)
    bases = valid_bodies(model)
    jobs = [mutate(rng, *rng.choice(bases)) for _ in range(n)]
    counts = {"2xx": 0, "4xx": 0, "5xx": 0, "transport": 0}
    worst: list[str] = []

    def send(job):
        path, raw, headers = job
        try:
            with httpx.stream("POST", server.url + path, content=raw, headers=headers,
                              timeout=120) as r:
                for _ in r.iter_bytes():
                    pass
                return r.status_code, path
        except httpx.TransportError as e:
            return type(e).__name__, path

    logging.getLogger("kvslim.server").setLevel(logging.ERROR)  # 4xx are the expected answers
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for status, path in pool.map(send, jobs):
            if isinstance(status, str):
                counts["transport"] += 1
                worst.append(f"{path}: {status}")
            else:
                counts[f"{status // 100}xx"] += 1
                if status >= 500:
                    worst.append(f"{path}: {status}")
    counts["seconds"] = time.perf_counter() - t0
    counts["alive"] = server.alive()
    counts["leaked_pages"] = server.leaked_pages()
    counts["failures"] = worst[:5]
    return counts


# ---------------------------------------------------------------- 2. poisoned batch

POISON = ['{"temperature": 1e-40}', '{"repeat_penalty": 1e-40}', '{"presence_penalty": NaN}',
          '{"frequency_penalty": -Infinity}', '{"frequency_penalty": -1e308}',
          '{"seed": 18446744073709551616}', '{"top_p": 0}', '{"temperature": -1}']


def _stream(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "raw": True,
            "options": {"num_predict": 16, "seed": 7, "temperature": 0.9}}
    out = []
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=300) as r:
        for line in r.iter_lines():
            msg = json.loads(line)
            if "error" in msg:
                return "ERROR: " + msg["error"]
            out.append(msg.get("response", ""))
    return "".join(out)


def _poison(url: str, model: str, options: str) -> int:
    raw = ('{"model": "%s", "prompt": "x", "stream": false, "options": {"num_predict": 4, '
           % model + options[1:] + "}")
    return httpx.post(url + "/api/generate", content=raw, timeout=300).status_code


def poisoned_batch(server: Server, model: str) -> dict:
    prompts = ["The sky is", "Once upon a time", "A hacker is", "The best editor is"]
    clean = [_stream(server.url, model, p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts) + len(POISON)) as pool:
        healthy = [pool.submit(_stream, server.url, model, p) for p in prompts]
        bad = [pool.submit(_poison, server.url, model, o) for o in POISON]
        together = [f.result() for f in healthy]
        statuses = [f.result() for f in bad]
    return {"identical": together == clean, "streams": len(prompts),
            "poison": len(POISON), "poison_statuses": sorted(set(statuses)),
            "leaked_pages": server.leaked_pages()}


# ---------------------------------------------------------------- 3. concurrent pulls


def _fake_model(root: Path, size: int) -> tuple[store.BuiltinModel, Path]:
    payload = b"GGUF" + os.urandom(size)
    model = store.BuiltinModel(name="hostilefake", aliases=(), description="benchmark fake",
                               package="kvslim-hostile-fake", version="1.0.0",
                               member="kvslim_hostile_fake/Fake.gguf",
                               sha256=hashlib.sha256(payload).hexdigest())
    wheel = root / "kvslim_hostile_fake-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.member, payload)
    return model, wheel


KILLED = """
import sys, time
from pathlib import Path
from kvslim import store
name, package, version, member, sha256 = sys.argv[2:7]
model = store.BuiltinModel(name=name, aliases=(), description="", package=package,
                           version=version, member=member, sha256=sha256)
store.BUILTIN_MODELS[model.name] = model
wheel = Path(sys.argv[1])
def download(model, dest_dir, progress=True):
    (dest_dir / wheel.name).write_bytes(wheel.read_bytes())
    return dest_dir / wheel.name
class Bar:
    def __enter__(self): return self
    def __exit__(self, *e): return False
    def update(self, n):
        print("ready", flush=True); time.sleep(60)
store.download_wheel = download
store._bar = lambda *a, **k: Bar()
store.pull(model.name, progress=False, force=True)  # a new download over the good copy
"""


def pulls(n: int, size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvslim-hostile-") as tmp:
        root = Path(tmp)
        model, wheel = _fake_model(root, size)
        os.environ["KVSLIM_MODELS"] = str(root / "store")
        store.BUILTIN_MODELS[model.name] = model

        def download(m, dest_dir, progress=True):
            (dest_dir / wheel.name).write_bytes(wheel.read_bytes())
            return dest_dir / wheel.name

        real, store.download_wheel = store.download_wheel, download
        try:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda i: _try_pull(model.name, force=i % 2 == 1), range(n)))
            seconds = time.perf_counter() - t0
            failed = sum(r is not None for r in results)
            fields = [model.name, model.package, model.version, model.member, model.sha256]
            proc = subprocess.Popen([sys.executable, "-c", KILLED, str(wheel), *fields],
                                    stdout=subprocess.PIPE, text=True,
                                    env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
            killed_ready = proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            debris = _files(root / "store")
            after = _try_pull(model.name)
            left = _files(root / "store")
        finally:
            store.download_wheel = real
            store.BUILTIN_MODELS.pop(model.name, None)
            os.environ.pop("KVSLIM_MODELS", None)
    good = left == ["hostilefake", "hostilefake/Fake.gguf", "hostilefake/manifest.json"]
    return {"pulls": n, "failed": failed, "seconds": seconds, "errors": [r for r in results if r][:3],
            "killed_mid_copy": killed_ready, "debris_after_kill": len([f for f in debris if "/." in f]),
            "next_pull_ok": after is None, "store_clean": good}


def _try_pull(name: str, force: bool = False) -> str | None:
    try:
        store.pull(name, progress=False, force=force)
        return None
    except Exception as e:  # noqa: BLE001 - counted and reported
        return f"{type(e).__name__}: {e}"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------- 4. long prefill


def _ttft(url: str, model: str, prompt: str, n: int) -> float:
    t0 = time.perf_counter()
    body = {"model": model, "prompt": prompt, "raw": True, "options": {"num_predict": n, "temperature": 0}}
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if json.loads(line).get("response"):
                return time.perf_counter() - t0
    return time.perf_counter() - t0


def long_prefill(server: Server, model: str, tokens: int) -> dict:
    runner = server.app.state.registry.get(model)[0]
    text = gzip.open(JARGON, "rt").read() if Path(JARGON).exists() else "The quick brown fox. " * 5000
    ids = runner.tokenizer.encode(text)[:tokens]
    long_prompt = runner.tokenizer.decode(ids)
    alone = _ttft(server.url, model, "Hi", 2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(_ttft, server.url, model, long_prompt, 1)
        time.sleep(0.3)  # the long prompt is admitted first
        during = _ttft(server.url, model, "Hi", 2)
        big_ttft = big.result()
    return {"short_alone_s": alone, "short_during_s": during, "long_ttft_s": big_ttft,
            "prefill_tokens": len(ids)}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="built-in name or .gguf path (smollm2)")
    ap.add_argument("--fuzz", type=int, default=300, help="fuzzed requests (300)")
    ap.add_argument("--pulls", type=int, default=32, help="concurrent pulls (32)")
    ap.add_argument("--pull-mib", type=int, default=8, help="size of the fake model (8 MiB)")
    ap.add_argument("--prefill", type=int, default=2048, help="tokens of the long prompt (2048)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    path = store.resolve(args.model, pull_missing=True)
    name = Path(path).stem if not store.lookup(args.model) else args.model
    models = {} if store.lookup(args.model) else {name: Path(path)}
    server = Server(Settings.from_env({}, num_parallel=8, num_ctx=max(4096, args.prefill + 64)), models)
    load0 = os.getloadavg()[0]
    try:
        httpx.post(server.url + "/api/generate", json={"model": name}, timeout=600)  # load
        results = {"fuzz": fuzz(server, name, args.fuzz, args.seed),
                   "poisoned": poisoned_batch(server, name),
                   "pulls": pulls(args.pulls, args.pull_mib << 20),
                   "prefill": long_prefill(server, name, args.prefill)}
    finally:
        server.close()
    report(results, load0, os.getloadavg()[0], os.cpu_count())


def report(r: dict, load0: float, load1: float, cpus: int | None) -> None:
    f, p, q, lp = r["fuzz"], r["poisoned"], r["pulls"], r["prefill"]
    rows = [
        ("fuzz", f"{f['2xx'] + f['4xx'] + f['5xx'] + f['transport']} requests in {f['seconds']:.1f} s: "
                 f"{f['2xx']} 2xx, {f['4xx']} 4xx, {f['5xx']} 5xx, {f['transport']} transport errors; "
                 f"server alive: {f['alive']}; pages leaked: {f['leaked_pages']}"),
        ("poisoned batch", f"{p['streams']} seeded streams beside {p['poison']} poisoned requests: "
                           f"byte-identical to their clean run: {p['identical']}; poison answered "
                           f"{p['poison_statuses']}; pages leaked: {p['leaked_pages']}"),
        ("concurrent pulls", f"{q['pulls']} at once: {q['failed']} failed ({q['seconds']:.1f} s); "
                             f"kill -9 mid-copy (reached: {q['killed_mid_copy']}) left "
                             f"{q['debris_after_kill']} temporaries; next pull "
                             f"ok: {q['next_pull_ok']}, store exactly one model: {q['store_clean']}"),
        ("long prefill", f"2-token request: first token after {lp['short_alone_s']:.2f} s alone, "
                         f"{lp['short_during_s']:.2f} s during a {lp['prefill_tokens']:,}-token "
                         f"prefill (whose first token came after {lp['long_ttft_s']:.2f} s)"),
    ]
    print("| phase | result |\n|---|---|")
    for phase, text in rows:
        print(f"| {phase} | {text} |")
    print(f"\n{cpus} CPUs, load average {load0:.1f} at the start, {load1:.1f} at the end")
    for e in f["failures"] + q["errors"]:
        print("  failure:", e)


if __name__ == "__main__":
    main()
