"""How K/V rows are coded into the cache beyond their block format.

Three exact transforms, each undone where attention is computed, so a float32 cache
gives the same attention with or without them (to float32 rounding):

* rotation (``rotation``): q and k by one orthonormal Hadamard R_k, v by R_v, the
  output by R_v^T. Spreads outlier channels over each 32-value block.
* centering: a fixed per-(layer, kv head) vector mu_k is subtracted from every stored
  key, mu_v from every stored value and added back to the output. Exact because a
  query's scores all move by the same q . mu_k (softmax ignores it) and the softmax
  weights sum to 1 (sum_i p_i (v_i - mu_v) + mu_v = sum_i p_i v_i). K carries large
  per-channel offsets (half its energy on SmolLM2, nearly the same on any text) that
  otherwise take up each block's range. mu is a property of the model, estimated once
  from a short text shipped here (``CALIBRATION_TEXT``), so pages shared between
  sequences (prefix caching) hold the same code everywhere.
* rounding: "lsq" picks least-squares block scales (``rounding``) instead of ggml's
  max-based ones; the blocks stay ggml blocks.

A ``KVCodec`` is part of a cache's configuration (``KVCache.codec``): set when the pool
is built, never changed, so a cache written with one codec is never read with another.
``Attention.forward`` applies it: encode q/k/v -> write -> attend -> decode the output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from kvslim import formats, rounding
from kvslim.rotation import Rotation, hadamard_size, rotate_rows

__all__ = ["KVCodec", "CodecSettings", "CodecChoice", "decide", "build_codec",
           "CALIBRATION_TEXT", "calibrate", "key_shift", "MODES", "ROUNDING_MODES"]

log = logging.getLogger("kvslim")

MODES = ("auto", "on", "off")
ROUNDING_MODES = ("auto", "lsq", "ggml")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _mode(name: str, value, env_name: str, env: Mapping[str, str], choices=MODES) -> str:
    """An explicit value, else the environment, else auto; 1/0/true/false mean on/off."""
    raw = value if value is not None else env.get(env_name) or "auto"
    if isinstance(raw, bool):
        raw = "on" if raw else "off"
    text = str(raw).strip().lower()
    if choices is MODES:
        text = "on" if text in _TRUE else "off" if text in _FALSE else text
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return text


@dataclass(frozen=True)
class CodecSettings:
    """What the user asked for; ``build_codec`` turns it into a cache's KVCodec.

    rotation: auto (Hadamard on each block-quantized side when head_dim allows it), on
    (both sides, whatever their type), off. centering: auto (keys of a block-quantized
    K), on (K and V), off. rounding: auto / lsq (least-squares scales on q8_0, q4_0,
    q4_1, q5_0, q5_1), ggml (llama.cpp's own rounding).
    """

    rotation: str = "auto"
    centering: str = "auto"
    rounding: str = "auto"

    @classmethod
    def resolve(cls, rotation=None, centering=None, rounding=None,
                env: Mapping[str, str] = os.environ) -> "CodecSettings":
        """Arguments beat KVSLIM_KV_ROTATION / KVSLIM_KV_CENTERING / KVSLIM_KV_ROUNDING,
        which beat auto. ValueError for an unknown value."""
        return cls(_mode("kv_rotation", rotation, "KVSLIM_KV_ROTATION", env),
                   _mode("kv_centering", centering, "KVSLIM_KV_CENTERING", env),
                   _mode("kv_rounding", rounding, "KVSLIM_KV_ROUNDING", env, ROUNDING_MODES))

    def replace(self, rotation=None, centering=None, rounding=None) -> "CodecSettings":
        """These settings with the given ones changed (None keeps a setting)."""
        keep = lambda new, old: old if new is None else new  # noqa: E731
        return CodecSettings.resolve(keep(rotation, self.rotation), keep(centering, self.centering),
                                     keep(rounding, self.rounding), env={})


class KVCodec:
    """Rotation, centering and rounding of one cache's K/V rows.

    mu_k [L, Hkv, D] and mu_v [L, Hkv, Dv] are in the model's (unrotated) coordinates;
    None turns centering off for that side. n_heads: query heads (GQA groups share mu_v).
    """

    def __init__(self, n_heads: int, rotation_k: Rotation | None = None,
                 rotation_v: Rotation | None = None, mu_k: torch.Tensor | None = None,
                 mu_v: torch.Tensor | None = None, rounding_k: str = "ggml",
                 rounding_v: str = "ggml"):
        self.n_heads, self.rotation_k, self.rotation_v = n_heads, rotation_k, rotation_v
        self.mu_k, self.mu_v = mu_k, mu_v
        self.rounding_k, self.rounding_v = rounding_k, rounding_v
        self.centered_k, self.centered_v = mu_k is not None, mu_v is not None
        # shifts in the rotated (stored) coordinates, float32 contiguous for the kernel
        self._shift_k = self._rotated(mu_k, rotation_k)  # [L, Hkv, D]
        self._shift_v = self._rotated(mu_v, rotation_v)  # [L, Hkv, Dv]
        self._shift_o = None  # [L, Hq, Dv]: mu_v per query head
        self._side_args: dict[int, tuple] = {}  # layer -> CPU kernel arguments
        if self._shift_v is not None:
            group = n_heads // self._shift_v.shape[1]
            self._shift_o = self._shift_v.repeat_interleave(group, dim=1).contiguous()

    @staticmethod
    def _rotated(mu: torch.Tensor | None, rot: Rotation | None) -> torch.Tensor | None:
        if mu is None:
            return None
        mu = mu.to(torch.float32)
        return (rot.forward(mu) if rot is not None else mu).contiguous()

    @property
    def identity(self) -> bool:
        """True when encode/decode change nothing (only the rounding may differ)."""
        return not (self.rotation_k or self.rotation_v or self.centered_k or self.centered_v)

    def to(self, device) -> "KVCodec":
        for name in ("_shift_k", "_shift_v", "_shift_o"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    def encode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(R_k q, R_k k - mu_k, R_v v - mu_v) for q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv].

        Computed in float32 whatever the rows' dtype (a bf16 butterfly would add an error
        the size of q8_0's); q goes back to its dtype, k and v stay float32 for the write.
        """
        sk = self._shift_k[layer] if self._shift_k is not None else None
        sv = self._shift_v[layer] if self._shift_v is not None else None
        return (rotate_rows(q.float(), self.rotation_k).to(q.dtype),
                rotate_rows(k.float(), self.rotation_k, sk), rotate_rows(v.float(), self.rotation_v, sv))

    def store(self, cache, layer: int, slots: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        """Write coded k, v into ``slots`` of ``cache``; return the coded q.

        On CPU one numba call does it all (rotation, centering, rounding, the write);
        elsewhere ``encode`` then ``cache.write`` (which applies the rounding).
        """
        if rounding.can_store(cache, q, k, v):
            return rounding.store_rows(cache, layer, slots, q, k, v, self._sides(cache, layer))
        q, k, v = self.encode(layer, q, k, v)
        cache.write(layer, slots, k, v)
        return q

    def _sides(self, cache, layer: int) -> tuple:
        """``rounding.store_rows``'s per-side arguments for one layer, made once."""
        got = self._side_args.get(layer)
        if got is None:
            got = self._side_args[layer] = tuple(
                rounding.side_args(t, rot, self._shift_np(shift, layer, cache.n_kv_heads, dim), r)
                for t, rot, shift, r, dim in (
                    (cache.cache_type_k, self.rotation_k, self._shift_k, self.rounding_k, cache.head_dim),
                    (cache.cache_type_v, self.rotation_v, self._shift_v, self.rounding_v, cache.v_head_dim)))
        return got

    @staticmethod
    def _shift_np(shift: torch.Tensor | None, layer: int, heads: int, dim: int) -> np.ndarray:
        if shift is None:
            return np.zeros((heads, dim), np.float32)
        return shift[layer].cpu().contiguous().numpy()

    def decode(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """R_v^T (o + mu_v): the attention output back in the model's coordinates.

        o [N, Hq, Dv] is the attention's own fresh output, so it is decoded in place."""
        so = self._shift_o[layer] if self._shift_o is not None else None
        if o.dtype is not torch.float32:  # GPU compute dtypes: the butterfly in float32
            return rotate_rows(o.float(), self.rotation_v, so, inverse=True).to(o.dtype)
        return rotate_rows(o, self.rotation_v, so, inverse=True, in_place=True)


def _pair(k: str, v: str) -> str:
    return k if k == v else f"K {k} / V {v}"


@dataclass(frozen=True)
class CodecChoice:
    """What a cache of given types does with given settings (no model needed)."""

    rotation_k: int | None  # Hadamard block size, None: not rotated
    rotation_v: int | None
    centering_k: bool
    centering_v: bool
    rounding_k: str  # "lsq" | "ggml"
    rounding_v: str
    note: str | None = None  # a setting asked for that could not be honoured

    @property
    def active(self) -> bool:
        return bool(self.rotation_k or self.rotation_v or self.centering_k or self.centering_v
                    or "lsq" in (self.rounding_k, self.rounding_v))

    def describe(self) -> dict:
        """{"kv_rotation", "kv_centering", "kv_rounding", "kv_codec_note"} for reports:
        e.g. "hadamard-64" or "K hadamard-64 / V off", "K" (the centered sides), "lsq"."""
        rot = lambda n: f"hadamard-{n}" if n else "off"  # noqa: E731
        sides = [n for n, on in (("K", self.centering_k), ("V", self.centering_v)) if on]
        return {"kv_rotation": _pair(rot(self.rotation_k), rot(self.rotation_v)),
                "kv_centering": "+".join(sides) or "off",
                "kv_rounding": _pair(self.rounding_k, self.rounding_v), "kv_codec_note": self.note}


def decide(settings: CodecSettings, type_k: str, type_v: str, head_dim: int) -> CodecChoice:
    """Apply the settings to a cache's effective types and head_dim.

    auto: rotation and centering where a side is block-quantized (rotation only when a
    Hadamard block of 64 or more divides head_dim), lsq rounding on the types that have
    it. "on" for rotation on a head_dim without a Hadamard block gives no rotation and a
    note (the caller warns), like flash attention asked for where it cannot run.
    """
    qk, qv = formats.is_quantized(type_k), formats.is_quantized(type_v)
    size, note = hadamard_size(head_dim), None
    rot_k = settings.rotation == "on" or (settings.rotation == "auto" and qk)
    rot_v = settings.rotation == "on" or (settings.rotation == "auto" and qv)
    if (rot_k or rot_v) and size is None:
        if settings.rotation == "on":
            note = (f"kv_rotation on: head_dim {head_dim} has no Hadamard block of 64 or more "
                    "(it needs a multiple of 64), so the cache is not rotated")
        rot_k = rot_v = False
    lsq = settings.rounding in ("auto", "lsq")
    return CodecChoice(
        size if rot_k else None, size if rot_v else None,
        settings.centering == "on" or (settings.centering == "auto" and qk),
        settings.centering == "on",
        "lsq" if lsq and rounding.supports_lsq(type_k) else "ggml",
        "lsq" if lsq and rounding.supports_lsq(type_v) else "ggml", note)


_MEANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_means(model, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``calibrate`` on CALIBRATION_TEXT, once per loaded model (the weights never change).

    Without a tokenizer (bare engines in tests) a fixed spread of token ids stands in.
    """
    got = _MEANS.get(model)
    if got is None:
        if tokenizer is not None:
            ids = tokenizer.encode(CALIBRATION_TEXT, add_special=True, parse_special=False)
        else:
            ids = [(i * 7919) % model.config.vocab_size for i in range(256)]
        path = _means_path(model, ids)
        got = _load_means(path, model) if path is not None else None
        if got is None:
            got = calibrate(model, ids)
            if path is not None:
                _save_means(path, got)
        _MEANS[model] = got
    return got


# ---------------------------------------------------------------- the means on disk
# The calibration forward costs 0.6-0.9 s of a 2.2 s SmolLM2 load on 2 cores, and its
# result only depends on the weights, so it is kept beside the model store, keyed by
# everything it depends on. A missing, unreadable or mismatched file is recomputed.

_MEANS_FORMAT = 1


def _means_path(model, ids: list[int]):
    """Where ``model``'s means live (None: this model cannot be keyed, e.g. no layers)."""
    import hashlib

    from kvslim import __version__, store

    layers = getattr(model, "layers", None)
    if not layers or not hasattr(layers[0], "wqkv"):
        return None
    h = hashlib.sha256(repr((_MEANS_FORMAT, __version__, model.config, str(model.dtype),
                             model.device.type)).encode())
    h.update(np.asarray(ids, np.int64).tobytes())
    for layer in (layers[0], layers[-1]):  # a sample of the weights themselves
        h.update(layer.wqkv.w[:8].detach().float().cpu().numpy().tobytes())
    return store.store_dir() / ".calibration" / f"{h.hexdigest()[:32]}.pt"


def _load_means(path, model):
    try:
        mk, mv = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # absent, cut short, or not ours: recompute
        return None
    c = model.config
    want = (c.n_layers, c.n_kv_heads)
    if mk.dtype != torch.float32 or mv.dtype != torch.float32 or mk.shape[:2] != want or mv.shape[:2] != want:
        return None
    return mk, mv


def _save_means(path, means) -> None:
    """Write atomically (a temporary file renamed); a store that cannot be written only
    costs the next load the calibration."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tuple(means), tmp)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("K/V calibration not saved to %s: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def build_codec(model, tokenizer, choice: CodecChoice, n_positions: int) -> KVCodec | None:
    """The KVCodec for ``choice`` on ``model`` (None when it does nothing).

    n_positions: the context the cache serves; keys are centered on their mean over it.
    The first centered cache of a model runs the calibration forward (then remembered).
    """
    if not choice.active:
        return None
    mu_k = mu_v = None
    if choice.centering_k or choice.centering_v:
        pre_k, mean_v = model_means(model, tokenizer)
        mu_k = key_shift(model, pre_k, n_positions) if choice.centering_k else None
        mu_v = mean_v if choice.centering_v else None
    dim = model.cache_head_dim
    rot = lambda size: Rotation.make(dim, size) if size else None  # noqa: E731
    codec = KVCodec(model.n_heads, rot(choice.rotation_k), rot(choice.rotation_v), mu_k, mu_v,
                    choice.rounding_k, choice.rounding_v)
    return codec.to(model.device)


# Original prose written for kvslim (no outside text): the model reads it once to estimate
# the mean key and value of every layer and head. Ordinary English on everyday topics, so
# the means describe the model, not one kind of text.
CALIBRATION_TEXT = """\
The morning train was late again, so the platform filled slowly with people who had \
stopped pretending to read. A woman in a green coat checked her watch twice, then \
called someone to say she would miss the start of the meeting. Near the stairs, a boy \
explained to his grandfather how the new bridge had been built: first the towers, then \
the cables, and only at the end the road that everyone would drive on. The old man \
listened, nodded, and asked whether the river had been closed while they worked.

In the kitchen of a small restaurant across the street, the cook was already preparing \
soup for lunch. She cut onions, carrots and celery, warmed oil in a heavy pot, and let \
the vegetables soften before adding stock. Her assistant counted plates and wrote a list \
of what to buy on Friday: flour, eggs, lemons, rice, and more of the dark bread that \
customers kept asking for. Neither of them looked up when the train finally arrived.

Scientists who study weather often say that the hardest part of a forecast is not the \
physics but the measurements. A model can only be as good as the numbers it starts from, \
and the atmosphere is large, fast and full of small surprises. Satellites help, as do \
balloons, ships and thousands of ground stations, yet every forecast still carries some \
doubt. That is why a careful report speaks of chances rather than certainties, and why \
it is updated several times a day.

Later that afternoon the library held a short talk about the history of the town. The \
speaker showed maps from three different centuries and pointed out how the market square \
had moved twice, once after a fire and once when the railway came. Questions came from \
every corner of the room. One visitor wanted to know why the church clock had four faces \
but only three worked; another asked where the first school had stood. The answers were \
not always certain, but everyone left with something to talk about on the way home.
"""


@torch.inference_mode()
def calibrate(model, ids: list[int], skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key before RoPE and mean value per layer and kv head over ``ids``:
    ([L, Hkv, D], [L, Hkv, Dv]) float32 on CPU, in the cache's head dims.

    One forward through a float32 cache, no codec; positions before ``skip`` are left out
    (the first token is an attention sink whose K/V look like no other token's). Keys
    are averaged before RoPE because that mean hardly depends on position, so a short
    text serves any context length (``key_shift`` rotates it back per position).
    """
    from kvslim.attention import Attention, plan_attention

    page = 64
    cache = model.new_cache(-(-len(ids) // page), page, "f32", "f32")
    plan = plan_attention(model.device, cache.head_dim, "f32", "f32", warn=False)
    seq = cache.new_sequence()
    model.forward(torch.tensor(ids), cache, [seq], [len(ids)], Attention(plan),
                  torch.tensor([len(ids) - 1]))
    pos = torch.arange(skip, len(ids), device=model.device)
    dim = model.head_dim
    mk, mv = [], []
    for layer in range(cache.n_layers):
        k, v = cache.read(layer, seq)  # [Hkv, T, Dc] float32
        pre = model.unrope(k[:, skip:, :dim].transpose(0, 1).to(model.dtype), pos, layer)  # [T', Hkv, D]
        mk.append(F.pad(pre.float().mean(0), (0, cache.head_dim - dim)))
        mv.append(v[:, skip:].mean(1))
    return torch.stack(mk).cpu(), torch.stack(mv).float().cpu()


def key_shift(model, pre_mean: torch.Tensor, n_positions: int) -> torch.Tensor:
    """The constant subtracted from stored keys: the mean over positions 0..n-1 of the
    RoPE-rotated pre-RoPE mean key. pre_mean [L, Hkv, Dc] -> [L, Hkv, Dc] float32 on CPU.

    A constant is what keeps attention exact; for RoPE frequencies that turn little over
    the context it is nearly the whole offset, for fast ones it averages out to ~0.
    """
    dim = model.head_dim
    mu = model.rope_mean(pre_mean[..., :dim].to(model.device), n_positions).float().cpu()
    return F.pad(mu, (0, pre_mean.shape[-1] - dim))
