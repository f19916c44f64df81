"""HTTP downloads into the store, resumable and verified (``kvslim pull``'s transport).

``fetch`` writes a blob's bytes into the model's directory as ``.resume-<sha256>``, a
name `list` and `run` never read; a cut download keeps them and the next pull asks for
the rest with a Range request (a server that ignores it sends everything again). The
sha256 is checked over the whole file before ``install`` renames it into the store;
wrong bytes are removed. Progress goes to a callback as the lines of Ollama's /api/pull
stream: ``{"status", "digest", "total", "completed"}``.
"""
from __future__ import annotations

import errno
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from kvslim import store
from kvslim.store import PullError

Progress = Callable[[dict], None]

TIMEOUT = httpx.Timeout(30.0, read=60.0)
REPORT_EVERY_S = 0.1  # progress lines at most this often per blob (and at its end)


@dataclass(frozen=True)
class Blob:
    """One file to fetch: where, its sha256 (hex) and size (None when the server did not say)."""

    url: str
    sha256: str
    size: int | None
    headers: dict | None = None


def fetch(http: httpx.Client, blob: Blob, directory: Path, report: Progress) -> Path:
    """Download ``blob`` into ``directory`` (resuming), verify its sha256; the verified
    temporary file, for ``store.commit``. Raises PullError, keeping resumable bytes."""
    if not re.fullmatch(r"[0-9a-f]{64}", blob.sha256):  # it names a file: never a path
        raise PullError(f"{blob.url}: the server gave no valid sha256 ({blob.sha256[:80]!r})")
    part = directory / f"{store.RESUME_PREFIX}{blob.sha256}"
    digest = f"sha256:{blob.sha256}"
    h, have = _hash_existing(part, blob.size)
    status = f"pulling {blob.sha256[:12]}"
    last = [0.0]

    def progress(done: int, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - last[0] >= REPORT_EVERY_S:
            last[0] = now
            report({"status": status, "digest": digest, "total": blob.size, "completed": done})

    progress(have, final=True)
    if blob.size is None or have < blob.size:
        h, have = _download(http, blob, part, h, have, progress)
    progress(have, final=True)
    report({"status": "verifying sha256 digest"})
    if h.hexdigest() != blob.sha256:
        part.unlink(missing_ok=True)
        raise PullError(f"{blob.url}: sha256 {h.hexdigest()} differs from the expected {blob.sha256} "
                        "(the download is removed; pull again to retry)")
    return part


def _hash_existing(part: Path, size: int | None):
    """(sha256 of the bytes an earlier pull left, their count); a file longer than the
    blob cannot be a prefix of it and is started over."""
    h = hashlib.sha256()
    if not part.is_file() or (size is not None and part.stat().st_size > size):
        part.unlink(missing_ok=True)
        return h, 0
    with open(part, "rb") as f:
        while chunk := f.read(store.CHUNK):
            h.update(chunk)
    return h, part.stat().st_size


def _download(http: httpx.Client, blob: Blob, part: Path, h, have: int, progress):
    """Append the rest of ``blob`` to ``part``, hashing it into ``h``; (h, bytes held)."""
    headers = dict(blob.headers or {})
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with http.stream("GET", blob.url, headers=headers) as r:
            if r.status_code == 416 and have:  # nothing left to send: the digest decides
                return h, have
            _check(r, blob.url)
            if have and r.status_code != 206:  # the server ignored the Range: start over
                h, have = hashlib.sha256(), 0
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_bytes():  # as it arrives: a cut keeps every byte received
                    f.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    progress(have)
    except httpx.HTTPError as e:
        size = "?" if blob.size is None else f"{blob.size:,}"
        raise PullError(f"download of {blob.url} stopped at {have:,} of {size} bytes "
                        f"({type(e).__name__}: {e}); pull again to resume") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PullError(f"no space left on the device holding {part.parent}: free some and "
                            f"pull again to resume ({have:,} bytes kept)") from e
        raise
    if blob.size is not None and have != blob.size:
        raise PullError(f"download of {blob.url} ended at {have:,} of {blob.size:,} bytes; "
                        "pull again to resume")
    return h, have


def _check(r: httpx.Response, url: str) -> None:
    """PullError for an HTTP error answer, naming what was asked for."""
    if r.status_code < 400:
        return
    if r.status_code in (401, 403):
        why = "access denied (a private or gated model needs a token: HF_TOKEN for Hugging Face)"
    elif r.status_code == 404:
        why = "not found"
    else:
        why = f"HTTP {r.status_code}"
    raise PullError(f"{url}: {why}")


def get_small(http: httpx.Client, url: str, headers: dict | None = None,
              sha256: str | None = None) -> bytes:
    """A small document (a manifest, a template layer): in memory, sha256-checked when known."""
    try:
        r = http.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise PullError(f"cannot reach {url} ({type(e).__name__}: {e})") from e
    _check(r, url)
    if sha256 is not None and hashlib.sha256(r.content).hexdigest() != sha256:
        raise PullError(f"{url}: sha256 differs from the manifest's {sha256}")
    return r.content


def client() -> httpx.Client:
    """HTTP client for pulls: redirects followed (registries send blobs to a CDN; httpx
    drops Authorization when the host changes), the environment's proxies honoured."""
    return httpx.Client(follow_redirects=True, timeout=TIMEOUT, trust_env=True)


def install(name: str, blob: Blob, filename: str, manifest: dict, report: Progress,
            force: bool = False, card_from: Callable[[Path], dict] | None = None) -> Path:
    """Fetch ``blob`` as model ``name``'s file (skipped when the store holds it already,
    unless ``force``) and write its manifest. ``card_from(file)`` may add manifest fields
    read from the downloaded file before it is committed."""
    with store.writing(name) as directory, client() as http:
        present = store.find(name)
        if (not force and present is not None and present.sha256 == blob.sha256
                and present.path.parent == directory):
            report({"status": "success"})
            return present.path
        part = fetch(http, blob, directory, report)
        extra = card_from(part) if card_from else {}
        report({"status": "writing manifest"})
        path = store.commit(directory, name, part, filename,
                            {**manifest, "sha256": blob.sha256, **extra})
    report({"status": "success"})
    return path
