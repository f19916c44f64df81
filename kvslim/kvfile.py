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

``read`` refuses what is not a complete, unaltered kvslim cache file; ``check`` refuses a
file written for another model, other types or another coding; ``restore`` writes the
blocks into new pages of a pool, all or nothing (only pools of global layers: a model
with sliding-window layers, whose pages before the window are released, is refused).
Each refusal is a ``KVFileError`` (a ValueError) whose message says what differs, so a
restored cache is bit-identical to the saved one or nothing is restored.
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

__all__ = ["FORMAT", "FORMAT_VERSION", "KVFileError", "SavedCache", "model_identity",
           "coding_of", "save", "read", "read_header", "read_tokens", "check", "restore"]

FORMAT = "kvslim-kv-cache"
FORMAT_VERSION = 1
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


def _check_unwindowed(cache: KVCache) -> None:
    if cache.window_groups():
        raise KVFileError("K/V cache files are not supported for models with sliding-window "
                          "layers (their pages before the window are released)")


# ---------------------------------------------------------------- the file


@dataclass
class SavedCache:
    """A cache file's content, checked against its own checksum."""

    path: Path
    meta: dict  # format, version, model, type_k, type_v, layout, coding, extra
    tokens: list[int]
    k: dict[str, torch.Tensor]  # plane -> [L, Hkv, n, nb, per]
    v: dict[str, torch.Tensor]
    coding: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def extra(self) -> dict:
        return self.meta.get("extra", {})

    @property
    def nbytes(self) -> int:
        """Cache bytes held (the planes)."""
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


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


def save(path: str | os.PathLike, cache: KVCache, cid: int, tokens: list[int], model_id: str,
         extra: dict | None = None) -> int:
    """Write sequence ``cid`` of ``cache`` (holding ``tokens``) to ``path``; the bytes written.

    Written to a temporary file renamed over ``path``, so a reader never sees half a file."""
    from safetensors.torch import save_file

    _check_unwindowed(cache)
    n = cache.length(cid)
    if len(tokens) != n or n == 0:
        raise ValueError(f"sequence {cid} holds {n} tokens, {len(tokens)} token ids given")
    tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
    per_layer = [cache.gather(layer, cid) for layer in range(cache.n_layers)]
    for side, fmt, i in (("k", cache.fmt_k, 0), ("v", cache.fmt_v, 1)):
        for name, _, _ in fmt.planes:  # [L, Hkv, n, nb, per]
            tensors[f"{side}.{name}"] = torch.stack([g[i][name] for g in per_layer]).cpu().contiguous()
    desc, coding = coding_of(cache.codec)
    tensors.update(coding)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "kvslim": __version__,
            "model": model_id, "type_k": cache.cache_type_k, "type_v": cache.cache_type_v,
            "n_tokens": str(n), "layout": json.dumps(_layout(cache)),
            "coding": json.dumps(desc, sort_keys=True), "extra": json.dumps(extra or {}),
            "sha256": _checksum(tensors)}
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
    """A cache file's metadata alone (cheap: the JSON header), checked to be ours."""
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
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise KVFileError(f"{path}: K/V cache file format version {meta.get('format_version')} "
                          f"(written by kvslim {meta.get('kvslim', '?')}); this kvslim reads "
                          f"version {FORMAT_VERSION}")
    try:
        for key in ("layout", "coding", "extra"):
            meta[key] = json.loads(meta[key])
        meta["n_tokens"] = int(meta["n_tokens"])
        for key in ("model", "type_k", "type_v", "sha256"):
            meta[key] = str(meta[key])
    except (KeyError, ValueError, TypeError) as e:
        raise KVFileError(f"{path}: K/V cache file with a damaged header ({_short(e)})") from None
    return meta


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
        saved = SavedCache(path, meta, tensors.pop("tokens").tolist(),
                           _planes(tensors, "k", meta["type_k"]),
                           _planes(tensors, "v", meta["type_v"]),
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
    for side, planes, dim in (("k", saved.k, lay["head_dim"]), ("v", saved.v, lay["v_head_dim"])):
        want = (lay["n_layers"], lay["n_kv_heads"], n, dim // formats.QK)
        for name, t in planes.items():
            if tuple(t.shape[:4]) != want:
                raise KVFileError(f"{saved.path}: plane {side}.{name} has shape {list(t.shape)}, "
                                  f"the header says {list(want)} + block")
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
    _check_unwindowed(cache)
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


def restore(cache: KVCache, saved: SavedCache, length: int | None = None) -> int:
    """A new sequence of ``cache`` holding the first ``length`` (default all) saved tokens'
    blocks; ``check`` first. All or nothing: ``CacheFull`` leaves the pool unchanged."""
    _check_unwindowed(cache)
    n = saved.meta["n_tokens"] if length is None else length
    if not 0 < n <= saved.meta["n_tokens"]:
        raise ValueError(f"cannot restore {n} of {saved.meta['n_tokens']} saved tokens")
    cid = cache.new_sequence()
    try:
        slots = cache.reserve(cid, n).to(cache.device)
    except BaseException:
        cache.free(cid)
        raise
    page, off = slots // cache.page_size, slots % cache.page_size
    for planes, got in ((cache.k_planes, saved.k), (cache.v_planes, saved.v)):
        for name, t in planes.items():
            # saved [L, Hkv, n, nb, per]; t[:, page, :, off] is [n, L, Hkv, nb, per] (the
            # two index tensors are apart, so their dimension comes first)
            t[:, page, :, off] = got[name][:, :, :n].to(cache.device).permute(2, 0, 1, 3, 4)
    return cid
