"""Pulls from the Ollama registry: ``kvslim pull llama3.2[:TAG]``.

Names are Ollama's: ``[host/][namespace/]model[:tag]``; the host defaults to
``KVSLIM_REGISTRY`` (a URL; ``http://`` for a local one) else Ollama's registry, the
namespace to ``library`` and the tag to ``latest``. The manifest
(``GET /v2/NS/MODEL/manifests/TAG``) lists layers by sha256: the model (a GGUF, fetched
by ``kvslim.pull.fetch`` from ``/v2/NS/MODEL/blobs/DIGEST``, resumable), and small
template, params, system and license layers, which become the model's card. The
template layer is a Go template: it is used (translated, ``kvslim.gotemplate``) only
where the GGUF has no chat template of its own.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvslim import download as pulls
from kvslim import store
from kvslim.modelfile import PARAMETERS, check_parameters
from kvslim.store import PullError

log = logging.getLogger("kvslim")

DEFAULT_REGISTRY = "https://registry.ollama.ai"
MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json, "
                  "application/vnd.oci.image.manifest.v1+json")
MEDIA = "application/vnd.ollama.image."
REFUSED_LAYERS = {"adapter": "a LoRA adapter", "projector": "a vision projector"}


@dataclass(frozen=True)
class Ref:
    base: str  # https://registry.ollama.ai
    namespace: str
    model: str
    tag: str

    @property
    def url(self) -> str:
        return f"{self.base}/v2/{self.namespace}/{self.model}"


def registry_base() -> str:
    return (os.environ.get("KVSLIM_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")


def parse(name: str) -> Ref:
    """The registry reference of a model name (ValueError for one that is not)."""
    full = store.check_name(name)
    path, _, tag = full.partition(":")
    parts = path.split("/")
    if len(parts) > 3:
        raise ValueError(f"'{name}': a registry model is [host/][namespace/]model[:tag]")
    base = registry_base()
    if len(parts) == 3:
        scheme = "http" if parts[0].startswith(("localhost", "127.0.0.1")) else "https"
        base, parts = f"{scheme}://{parts[0]}", parts[1:]
    namespace, model = parts if len(parts) == 2 else ("library", parts[0])
    return Ref(base, namespace, model, tag or "latest")


def pull(name: str, report: pulls.Progress, force: bool = False) -> Path:
    """Fetch a registry model into the store; its .gguf path."""
    ref = parse(name)
    report({"status": "pulling manifest"})
    with pulls.client() as http:
        try:
            raw = pulls.get_small(http, f"{ref.url}/manifests/{ref.tag}", {"Accept": MANIFEST_TYPES})
        except PullError as e:
            if str(e).endswith(": not found"):
                raise PullError(f"model '{name}' not found in the registry {ref.base} "
                                f"({ref.namespace}/{ref.model}:{ref.tag})") from None
            raise
        manifest = _manifest(raw, name)
        layers = {kind: layer for kind, layer in _layers(manifest, name)}
        card = {kind: pulls.get_small(http, f"{ref.url}/blobs/{layer['digest']}",
                                      sha256=_hex(layer["digest"])).decode("utf-8", "replace")
                for kind, layer in layers.items() if kind != "model"}
    model = layers["model"]
    blob = pulls.Blob(url=f"{ref.url}/blobs/{model['digest']}", sha256=_hex(model["digest"]),
                      size=model.get("size"))
    fields = _card_fields(card, report)
    source = f"ollama:{ref.base}/{ref.namespace}/{ref.model}:{ref.tag}"
    return pulls.install(store.check_name(name), blob, f"{ref.model}-{ref.tag}.gguf",
                         {"source": source, **fields}, report, force,
                         card_from=lambda path: _template_fields(path, card.get("template"), report))


def _manifest(raw: bytes, name: str) -> dict:
    try:
        manifest = json.loads(raw)
        assert isinstance(manifest.get("layers"), list)
        return manifest
    except (ValueError, AssertionError):
        raise PullError(f"'{name}': the registry's manifest is not a manifest") from None


def _layers(manifest: dict, name: str):
    """(kind, layer) of the layers kvslim reads; PullError for ones it cannot honour."""
    seen = set()
    for layer in manifest["layers"]:
        kind = str(layer.get("mediaType", "")).removeprefix(MEDIA)
        if kind in REFUSED_LAYERS:
            raise PullError(f"'{name}' needs {REFUSED_LAYERS[kind]}, which kvslim does not run")
        if kind not in ("model", "template", "params", "system", "license"):
            continue  # messages and others kvslim has no use for
        if kind in seen:
            raise PullError(f"'{name}' has several {kind} layers; kvslim reads one")
        digest = str(layer.get("digest", ""))
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise PullError(f"'{name}': a layer without a valid sha256 digest ({digest[:80]!r})")
        seen.add(kind)
        yield kind, layer
    if "model" not in seen:
        raise PullError(f"'{name}' has no model layer (GGUF) in the registry's manifest")


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _card_fields(card: dict, report) -> dict:
    """Manifest fields from the small layers (params keeps what kvslim honours)."""
    out = {}
    if "system" in card:
        out["system"] = card["system"]
    if "license" in card:
        out["license"] = card["license"]
    if "params" in card:
        try:
            params = json.loads(card["params"])
        except ValueError:
            params = {}
        kept = {k: v for k, v in params.items() if k in PARAMETERS}
        dropped = sorted(set(params) - set(kept))
        if dropped:
            report({"status": f"parameters kvslim does not use: {', '.join(dropped)}"})
        try:
            out["parameters"] = check_parameters(kept, "the registry's params")
        except ValueError as e:
            report({"status": f"parameters not used: {e}"})
    return out


def _template_fields(path: Path, template: str | None, report) -> dict:
    """The template layer, translated when the GGUF has no chat template of its own."""
    if not template:
        return {}
    from kvslim.gguf_loader import open_gguf
    from kvslim.modelfile import chat_template

    try:
        field = open_gguf(path).fields.get("tokenizer.chat_template")
    except (OSError, ValueError) as e:
        raise PullError(f"the downloaded model layer is not a GGUF file kvslim reads: {e}") from e
    if field is not None:
        return {"template": template}  # the GGUF's own template is the one rendered
    try:
        return {"template": template, "chat_template": chat_template(template)}
    except ValueError as e:
        message = (f"{e}; the GGUF has no chat template either, so chats use kvslim's default "
                   "(ChatML). `kvslim create NAME -f Modelfile` with a TEMPLATE fixes it")
        log.warning(message)
        report({"status": f"warning: {message}"})
        return {"template": template}
