"""K/V cache files: one sequence's blocks saved to disk and restored into another pool.

A ``.kvc`` file is a safetensors file (a plain header of JSON plus raw tensors, nothing
executable) holding, for one sequence of ``n`` tokens:

    tokens                int64 [n]                      the token ids the K/V belong to
    k.<plane>, v.<plane>  [n_layers, n_kv_heads, n, nb, per_block]   the pool's planes as stored
    codec.shift_k / _v    float32 [n_layers, n_kv_heads, dim]        centering means, if centered
    codec.signs_k / _v    float32 [dim]                              rotation signs, if any
    codec.scale_k / _v    float32 [n_layers, n_kv_heads]             fp8 scales, if an fp8 side
    codec.keyscale_k      float32 [n_layers, n_kv_heads, dim]        key scaling factors, if on

and string metadata: the format and its version, the model's identity (``model_identity``),
the K/V types, head layout, the coding (rotation, centering, rounding), a sha256 of every
tensor's bytes, and free-form ``extra`` fields of the caller (JSON). The planes are the
cache bytes themselves, so a file's size is the sequence's cache bytes plus a small
header: a q4_0 file is about 0.28 of an f16 one.

A model with sliding-window layers (``KVCache.window_groups``) writes format version 2:
per cache group ``i`` (its window, its layers and the first position it still holds,
in the ``groups`` metadata) the planes ``g<i>.k.<plane>`` / ``g<i>.v.<plane>``
[group layers, n_kv_heads, n - first, nb, per_block]: a window group's file holds the
pages the pool still held (about the window), not the whole prompt, and restores into
a sequence holding the same span. A cache of global layers alone writes version 1 as
before, so those files stay readable by earlier kvslim.

``read`` refuses what is not a complete, unaltered kvslim cache file; ``check`` refuses a
file written for another model, other types, another coding or other windows;
``restore`` writes the blocks into new pages of a pool, all or nothing. Each refusal is
a ``KVFileError`` (a ValueError) whose message says what differs, so a restored cache is
bit-identical to the saved one or nothing is restored.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvslim import formats
from kvslim.cache import KVCache
from kvslim.version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "KVFileError", "SavedCache", "SavedGroup",
           "model_identity", "coding_of", "held_bytes", "save", "read", "read_header",
           "read_tokens", "check", "restore", "can_serve"]

FORMAT = "kvslim-kv-cache"
FORMAT_VERSION = 2  # the newest this kvslim writes; it reads 1 and 2
VERSIONS = ("1", "2")
SUFFIX = ".kvc"


class KVFileError(ValueError):
    """A cache file that cannot be restored here: unreadable, altered, or written for
    another model, other cache types or another coding."""


def model_identity(path: str | os.PathLike, data_offset: int, samples: int = 64) -> str:
    """A sha256 naming a GGUF file's content without reading all of it: its size, its
    whole header (metadata and tensor table, the first ``data_offset`` bytes) and
    ``samples`` slices of 4 KiB spread evenly over its tensor data."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(f"{size}:{data_offset}".encode())
    with open(path, "rb") as f:
        h.update(f.read(data_offset))
        span = max(size - data_offset - 4096, 0)
        for i in range(samples):
            f.seek(data_offset + span * i // max(samples - 1, 1))
            h.update(f.read(4096))
    return h.hexdigest()


# ---------------------------------------------------------------- coding


def coding_of(codec) -> tuple[dict, dict[str, torch.Tensor]]:
    """A ``KVCodec``'s description (JSON-able) and tensors, as a file records them.

    Everything that decides how stored rows are read back: the rotations (block size and
    signs), the centering shifts in stored coordinates, the rounding, and an fp8 side's
    scales (a stored element is the value over its scale)."""
    if codec is None:
        return {"rotation_k": "off", "rotation_v": "off", "rounding_k": "ggml",
                "rounding_v": "ggml"}, {}
    desc, tensors = {}, {}
    for side in ("k", "v"):
        rot = getattr(codec, f"rotation_{side}")
        desc[f"rotation_{side}"] = rot.describe() if rot is not None else "off"
        if rot is not None and rot.signs is not None:
            tensors[f"codec.signs_{side}"] = rot.signs.to(torch.float32).cpu().contiguous()
        desc[f"rounding_{side}"] = getattr(codec, f"rounding_{side}")
    shift_k, shift_v = codec._shift_k, codec._shift_v  # [L, Hkv, D] float32, stored coordinates
    for side, shift in (("k", shift_k), ("v", shift_v)):
        if shift is not None:
            tensors[f"codec.shift_{side}"] = shift.detach().to("cpu", torch.float32).contiguous()
    for side in ("k", "v"):  # [L, Hkv]
        scale = getattr(codec, f"scale_{side}", None)
        if scale is not None:
            tensors[f"codec.scale_{side}"] = scale.detach().to("cpu", torch.float32).contiguous()
    smooth = getattr(codec, "smooth_k", None)  # [L, Hkv, D]: the key scaling, model coordinates
    if smooth is not None:
        tensors["codec.keyscale_k"] = smooth.detach().to("cpu", torch.float32).contiguous()
    return desc, tensors


# ---------------------------------------------------------------- the file


@dataclass
class SavedGroup:
    """One cache group's part of a file: the layers on one window (0: every position) and
    their stored rows from position ``first`` to the end."""

    window: int
    layers: list[int]
    first: int
    k: dict[str, torch.Tensor]  # plane -> [group layers, Hkv, n - first, nb, per]
    v: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass
class SavedCache:
    """A cache file's content, checked against its own checksum."""

    path: Path
    meta: dict  # format, version, model, type_k, type_v, layout, coding, extra (, groups)
    tokens: list[int]
    groups: list[SavedGroup]
    coding: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def extra(self) -> dict:
        return self.meta.get("extra", {})

    @property
    def nbytes(self) -> int:
        """Cache bytes held (the planes)."""
        return sum(g.nbytes for g in self.groups)

    def can_serve(self, length: int, page_size: int) -> bool:
        """``can_serve`` of this file's groups."""
        return can_serve(self.meta["groups"], len(self.tokens), length, page_size)

    def pages(self, page_size: int) -> list[int]:
        """Pages per cache group that ``restore`` takes in a pool of ``page_size``."""
        n = len(self.tokens)
        return [-(-n // page_size) - -(-g.first // page_size) for g in self.groups]


def can_serve(groups: list[dict], n: int, length: int, page_size: int) -> bool:
    """Whether the first ``length`` of a file's ``n`` tokens (``groups`` from its header),
    restored into pages of ``page_size``, can be continued: every window group still holds
    the keys a query at ``length`` sees (``KVCache.can_trim``'s rule). A window group
    that released the start of a long prompt cannot serve a shorter prefix of it."""
    if length == n:
        return n > 0
    return 0 < length < n and all(-(-g["first"] // page_size) * page_size
                                  <= max(0, length - g["window"] + 1)
                                  for g in groups if g["window"])


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _layout(cache: KVCache) -> dict:
    return {"n_layers": cache.n_layers, "n_kv_heads": cache.n_kv_heads,
            "head_dim": cache.head_dim, "v_head_dim": cache.v_head_dim}


def _group_name(version: str, i: int) -> str:
    return "" if version == "1" else f"g{i}."


def held_bytes(cache: KVCache, cid: int) -> int:
    """Cache bytes sequence ``cid`` holds in its rows (a window group's from the first
    position it still holds): the planes a cache file of it stores."""
    n = cache.length(cid)
    per_row = cache.n_kv_heads * (cache.head_dim * formats.bytes_per_element(cache.cache_type_k)
                                  + cache.v_head_dim * formats.bytes_per_element(cache.cache_type_v))
    return round(sum(len(g.layers) * (n - cache.held_from(cid, i)) * per_row
                     for i, g in enumerate(cache.groups)))


def save(path: str | os.PathLike, cache: KVCache, cid: int, tokens: list[int], model_id: str,
         extra: dict | None = None) -> int:
    """Write sequence ``cid`` of ``cache`` (holding ``tokens``) to ``path``; the bytes written.

    Every group's rows the pool still holds are written (a window group's from its first
    held page). Written to a temporary file renamed over ``path``, so a reader never sees
    half a file."""
    from safetensors.torch import save_file

    n = cache.length(cid)
    if len(tokens) != n or n == 0:
        raise ValueError(f"sequence {cid} holds {n} tokens, {len(tokens)} token ids given")
    version = "2" if cache.window_groups() else "1"
    tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    groups = []
    for i, g in enumerate(cache.groups):
        first = cache.held_from(cid, i)
        per_layer = [cache.gather(layer, cid, first) for layer in g.layers]
        for side, fmt, j in (("k", cache.fmt_k, 0), ("v", cache.fmt_v, 1)):
            for name, _, _ in fmt.planes:  # [group layers, Hkv, n - first, nb, per]
                tensors[f"{_group_name(version, i)}{side}.{name}"] = torch.stack(
                    [got[j][name] for got in per_layer]).cpu().contiguous()
        groups.append({"window": g.window, "layers": g.layers, "first": first})
    desc, coding = coding_of(cache.codec)
    tensors.update(coding)
    meta = {"format": FORMAT, "format_version": version, "kvslim": __version__,
            "model": model_id, "type_k": cache.cache_type_k, "type_v": cache.cache_type_v,
            "n_tokens": str(n), "layout": json.dumps(_layout(cache)),
            "coding": json.dumps(desc, sort_keys=True), "extra": json.dumps(extra or {}),
            "sha256": _checksum(tensors)}
    if version != "1":
        meta["groups"] = json.dumps(groups)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path.stat().st_size


def read_header(path: str | os.PathLike) -> dict:
    """A cache file's metadata alone (cheap: the JSON header), checked to be ours; its
    ``groups`` are [{"window", "layers", "first"}] (one global group for version 1)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' errors: a short, cut or foreign file
        raise KVFileError(f"{path}: not a readable K/V cache file ({_short(e)})") from None
    if meta.get("format") != FORMAT:
        raise KVFileError(f"{path}: not a kvslim K/V cache file (a safetensors file without "
                          f"format {FORMAT!r})")
    if meta.get("format_version") not in VERSIONS:
        raise KVFileError(f"{path}: K/V cache file format version {meta.get('format_version')} "
                          f"(written by kvslim {meta.get('kvslim', '?')}); this kvslim reads "
                          f"versions {' and '.join(VERSIONS)}")
    try:
        for key in ("layout", "coding", "extra"):
            meta[key] = json.loads(meta[key])
        meta["n_tokens"] = int(meta["n_tokens"])
        for key in ("model", "type_k", "type_v", "sha256"):
            meta[key] = str(meta[key])
        meta["groups"] = _groups_of(meta)
    except (KeyError, ValueError, TypeError) as e:
        raise KVFileError(f"{path}: K/V cache file with a damaged header ({_short(e)})") from None
    return meta


def _groups_of(meta: dict) -> list[dict]:
    if meta["format_version"] == "1":
        return [{"window": 0, "layers": list(range(meta["layout"]["n_layers"])), "first": 0}]
    groups = json.loads(meta["groups"])
    out = [{"window": int(g["window"]), "layers": [int(x) for x in g["layers"]],
            "first": int(g["first"])} for g in groups]
    n, n_layers = meta["n_tokens"], meta["layout"]["n_layers"]
    if sorted(x for g in out for x in g["layers"]) != list(range(n_layers)) or any(
            not 0 <= g["first"] <= max(0, n - g["window"] + 1) if g["window"] else g["first"]
            for g in out):
        raise ValueError(f"groups {out} do not fit {n_layers} layers and {n} tokens")
    return out


def read_tokens(path: str | os.PathLike) -> list[int]:
    """A cache file's token ids alone (not checked against the checksum: for an index;
    ``read`` checks everything before a restore)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("tokens").tolist()
    except Exception as e:
        raise KVFileError(f"{path}: K/V cache file cannot be read ({_short(e)})") from None


def read(path: str | os.PathLike) -> SavedCache:
    """A cache file's content; KVFileError unless it is whole and unaltered."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise KVFileError(f"{path}: K/V cache file cannot be read ({_short(e)})") from None
    if _checksum(tensors) != meta["sha256"]:
        raise KVFileError(f"{path}: K/V cache file is damaged (its data does not match the "
                          "checksum it was written with)")
    try:
        version = meta["format_version"]
        groups = [SavedGroup(g["window"], g["layers"], g["first"],
                             _planes(tensors, f"{_group_name(version, i)}k", meta["type_k"]),
                             _planes(tensors, f"{_group_name(version, i)}v", meta["type_v"]))
                  for i, g in enumerate(meta["groups"])]
        saved = SavedCache(path, meta, tensors.pop("tokens").tolist(), groups,
                           {n: t for n, t in tensors.items() if n.startswith("codec.")})
    except (KeyError, ValueError) as e:
        raise KVFileError(f"{path}: K/V cache file is inconsistent ({_short(e)})") from None
    _check_shapes(saved)
    return saved


def _planes(tensors: dict, side: str, type_: str) -> dict[str, torch.Tensor]:
    fmt = formats.get_format(type_)
    out = {}
    for name, dt, n in fmt.planes:
        t = tensors[f"{side}.{name}"]
        if t.dtype != dt or t.dim() != 5 or t.shape[-1] != n:
            raise ValueError(f"plane {side}.{name} is {t.dtype} {list(t.shape)}")
        out[name] = t
    return out


def _check_shapes(saved: SavedCache) -> None:
    lay, n = saved.meta["layout"], saved.meta["n_tokens"]
    for g in saved.groups:
        for side, planes, dim in (("k", g.k, lay["head_dim"]), ("v", g.v, lay["v_head_dim"])):
            want = (len(g.layers), lay["n_kv_heads"], n - g.first, dim // formats.QK)
            for name, t in planes.items():
                if tuple(t.shape[:4]) != want:
                    raise KVFileError(f"{saved.path}: plane {side}.{name} has shape "
                                      f"{list(t.shape)}, the header says {list(want)} + block")
    if len(saved.tokens) != n:
        raise KVFileError(f"{saved.path}: {len(saved.tokens)} token ids for {n} tokens")


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# ---------------------------------------------------------------- restoring


def check(saved: SavedCache, cache: KVCache, model_id: str, vocab_size: int | None = None,
          hint: str = "") -> None:
    """KVFileError unless ``saved`` was written for this model, these types, this layout
    and this coding (everything that decides how the stored blocks are read)."""
    meta, where = saved.meta, saved.path
    if meta["model"] != model_id:
        raise KVFileError(f"{where}: K/V cache file was written for another model (or another "
                          "version of its GGUF file)")
    types = (meta["type_k"], meta["type_v"])
    if types != (cache.cache_type_k, cache.cache_type_v):
        raise KVFileError(f"{where}: K/V cache file holds K {types[0]} / V {types[1]}, this "
                          f"cache is K {cache.cache_type_k} / V {cache.cache_type_v}; load the "
                          "model with the file's cache types")
    if meta["layout"] != _layout(cache):
        raise KVFileError(f"{where}: K/V cache file layout {meta['layout']} differs from this "
                          f"cache's {_layout(cache)}")
    ours = [(g.window, g.layers) for g in cache.groups]
    if [(g.window, g.layers) for g in saved.groups] != ours:
        raise KVFileError(f"{where}: K/V cache file's layers keep {_windows_text(saved.groups)}, "
                          f"this cache's {_windows_text(cache.groups)}")
    if vocab_size is not None and saved.tokens and not 0 <= min(saved.tokens) <= max(saved.tokens) < vocab_size:
        raise KVFileError(f"{where}: K/V cache file has token ids outside [0, {vocab_size})")
    _check_coding(saved, cache, hint)


def _check_coding(saved: SavedCache, cache: KVCache, hint: str) -> None:
    desc, tensors = coding_of(cache.codec)
    where = saved.path
    if saved.meta["coding"] != desc:
        raise KVFileError(f"{where}: K/V cache file was coded with {_coding_text(saved.meta['coding'])}, "
                          f"this cache with {_coding_text(desc)}")
    if set(saved.coding) != set(tensors):
        raise KVFileError(f"{where}: K/V cache file was centered on {_centered(saved.coding)}"
                          f"{_scaled(saved.coding)}{_key_scaled(saved.coding)}, this cache on "
                          f"{_centered(tensors)}{_scaled(tensors)}{_key_scaled(tensors)}")
    for name, t in tensors.items():
        if not torch.equal(saved.coding[name], t):
            raise KVFileError(f"{where}: K/V cache file's {name.split('.')[1]} differs from this "
                              f"cache's (centering means, key and fp8 scales depend on the model "
                              f"and on num_ctx"
                              f"{hint})")


def _scaled(tensors: dict) -> str:
    sides = [n[-1].upper() for n in sorted(tensors) if n.startswith("codec.scale_")]
    return f" with fp8 scales on {'+'.join(sides)}" if sides else ""


def _key_scaled(tensors: dict) -> str:
    return " with key scaling" if "codec.keyscale_k" in tensors else ""


def _coding_text(desc: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(desc.items()))


def _centered(tensors: dict) -> str:
    sides = [n[-1].upper() for n in sorted(tensors) if n.startswith("codec.shift_")]
    return "+".join(sides) or "nothing"


def _windows_text(groups) -> str:
    return "; ".join(f"layers {g.layers} every position" if not g.window else
                     f"layers {g.layers} a window of {g.window}" for g in groups)


def restore(cache: KVCache, saved: SavedCache) -> int:
    """A new sequence of ``cache`` holding the saved blocks (each group the span the file
    holds, a window group's start rounded up to this pool's pages); ``check`` first. All
    or nothing: ``CacheFull`` leaves the pool unchanged."""
    n, ps = saved.meta["n_tokens"], cache.page_size
    firsts = [-(-g.first // ps) * ps for g in saved.groups]
    try:
        cid = cache.new_held(n, firsts)
    except ValueError as e:  # CacheFull is no ValueError: it passes through
        raise KVFileError(f"{saved.path}: K/V cache file cannot be restored into pages of "
                          f"{ps} tokens ({e})") from None
    for i, (g, got, first) in enumerate(zip(cache.groups, saved.groups, firsts)):
        slots = cache.slots(cid, first, n, i).to(cache.device)
        page, off = slots // ps, slots % ps
        for planes, rows in ((g.k_planes, got.k), (g.v_planes, got.v)):
            for name, t in planes.items():
                # saved [GL, Hkv, n - got.first, nb, per]; t[:, page, :, off] is
                # [n - first, GL, Hkv, nb, per] (the two index tensors are apart, so their
                # dimension comes first)
                x = rows[name][:, :, first - got.first:]
                t[:, page, :, off] = x.to(cache.device).permute(2, 0, 1, 3, 4)
    return cid
