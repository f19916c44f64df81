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
  from a short text (``calibration.CALIBRATION_TEXT``), so pages shared between
  sequences (prefix caching) hold the same code everywhere.
* key scaling: keys are multiplied by a fixed per-(layer, kv head, channel) factor s_k
  before the rotation and queries divided by it (q . k = (q / s) . (s k)). Exact like
  the rest; it moves error from the channels queries weigh most to those they weigh
  least. With a rotation the stored error spreads evenly over a head's channels, so a
  score's error goes with sum_j q_j^2 / s_j^2 times sum_j k_j^2 s_j^2, least at
  s_j^2 = rms(q_j) / rms(k_j) (Cauchy-Schwarz; SmoothQuant's migration at alpha 1/2).
  Gemma 3's learned q/k norms give a few channels large queries and small keys, which
  this rebalances. Measured with the means (``calibration.key_scales``); on with K
  centering for a block-quantized K.
* rounding: "lsq" picks least-squares block scales (``rounding``) instead of ggml's
  max-based ones; the blocks stay ggml blocks.
* fp8 scales (vLLM's k_scale / v_scale, per layer and kv head): an fp8 side stores
  x / s_k (x / s_v) of the coded row x; q is multiplied by s_k (its kv head's) and the
  output by s_v before the rest is undone, so kernels read plain fp8 values. Measured by
  ``calibration.fp8_scales``; always on for an fp8 side.

A ``KVCodec`` is part of a cache's configuration (``KVCache.codec``): set when the pool
is built, never changed, so a cache written with one codec is never read with another.
The attention backend's write codes k/v (``transform_kv``, fused on CPU), ``Attention``
codes q (``transform_q``) and restores the output (``restore``). The means the
centering subtracts are measured by running the model (``kvslim.calibration``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvslim import formats, rounding
from kvslim.rotation import Rotation, hadamard_size, rotate_rows, scaled_rotate_rows

__all__ = ["KVCodec", "CodecSettings", "CodecChoice", "decide"]


@dataclass(frozen=True)
class CodecSettings:
    """What the user asked for; ``build_codec`` turns it into a cache's KVCodec.

    rotation: auto (Hadamard on each block-quantized side when head_dim allows it), on
    (both sides, whatever their type), off. centering: auto (keys of a block-quantized
    K), on (K and V), off. rounding: auto / lsq (least-squares scales on q8_0, q4_0,
    q4_1, q5_0, q5_1), ggml (llama.cpp's own rounding). Parsed from arguments and
    the environment by ``kvslim.settings.resolve_codec``.
    """

    rotation: str = "auto"
    centering: str = "auto"
    rounding: str = "auto"


class KVCodec:
    """Rotation, centering and rounding of one cache's K/V rows.

    mu_k [L, Hkv, D] and mu_v [L, Hkv, Dv] are in the model's (unrotated) coordinates;
    None turns centering off for that side. n_heads: query heads (GQA groups share mu_v).
    scale_k, scale_v [L, Hkv]: an fp8 side's scales (None: not scaled).
    smooth_k [L, Hkv, D]: key scaling factors s_k, model coordinates (None: off).
    """

    def __init__(self, n_heads: int, rotation_k: Rotation | None = None,
                 rotation_v: Rotation | None = None, mu_k: torch.Tensor | None = None,
                 mu_v: torch.Tensor | None = None, rounding_k: str = "ggml",
                 rounding_v: str = "ggml", scale_k: torch.Tensor | None = None,
                 scale_v: torch.Tensor | None = None, smooth_k: torch.Tensor | None = None):
        self.n_heads, self.rotation_k, self.rotation_v = n_heads, rotation_k, rotation_v
        self.version = 0  # counts changes of the terms after construction (set_means, to)
        self.smooth_k = None if smooth_k is None else smooth_k.to(torch.float32).contiguous()
        self._qdiv = None  # [L, Hq, D]: 1 / s_k per query head
        if self.smooth_k is not None:
            group = n_heads // self.smooth_k.shape[1]
            self._qdiv = (1.0 / self.smooth_k).repeat_interleave(group, dim=1).contiguous()
        self.scale_k, self.scale_v = scale_k, scale_v
        # stored = coded * inv; q * qmul; output * omul (per query head), all float32
        self._inv_k, self._qmul = self._scales(scale_k, n_heads)  # [L, Hkv], [L, Hq]
        self._inv_v, self._omul = self._scales(scale_v, n_heads)
        self.mu_k, self.mu_v = mu_k, mu_v
        self.rounding_k, self.rounding_v = rounding_k, rounding_v
        self.centered_k, self.centered_v = mu_k is not None, mu_v is not None
        # shifts in the rotated (stored) coordinates, float32 contiguous for the kernel
        self._shift_k = self._rotated(self._smoothed(mu_k), rotation_k)  # [L, Hkv, D]
        self._shift_v = self._rotated(mu_v, rotation_v)  # [L, Hkv, Dv]
        self._shift_o = None  # [L, Hq, Dv]: mu_v per query head
        if self._shift_v is not None:
            group = n_heads // self._shift_v.shape[1]
            self._shift_o = self._shift_v.repeat_interleave(group, dim=1).contiguous()

    @staticmethod
    def _scales(scale: torch.Tensor | None, n_heads: int):
        if scale is None:
            return None, None
        scale = scale.to(torch.float32)
        inv = (1.0 / scale).contiguous()
        return inv, scale.repeat_interleave(n_heads // scale.shape[1], dim=1).contiguous()

    def _smoothed(self, mu_k: torch.Tensor | None, layer: int | None = None):
        """s_k mu_k (all layers, or one layer's [Hkv, D]): the mean key as stored."""
        if mu_k is None or self.smooth_k is None:
            return mu_k
        s = self.smooth_k if layer is None else self.smooth_k[layer]
        return mu_k.to(torch.float32) * s.to(mu_k.device)

    @staticmethod
    def _rotated(mu: torch.Tensor | None, rot: Rotation | None) -> torch.Tensor | None:
        if mu is None:
            return None
        mu = mu.to(torch.float32)
        return (rot.forward(mu) if rot is not None else mu).contiguous()

    @property
    def identity(self) -> bool:
        """True when the transforms change nothing (only the rounding may differ)."""
        return not (self.rotation_k or self.rotation_v or self.centered_k or self.centered_v
                    or self.scale_k is not None or self.scale_v is not None
                    or self.smooth_k is not None)

    def to(self, device) -> "KVCodec":
        for name in ("_shift_k", "_shift_v", "_shift_o", "_inv_k", "_qmul", "_inv_v", "_omul",
                     "smooth_k", "_qdiv"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        self.version += 1
        return self

    def set_means(self, layer: int, mu_k: torch.Tensor | None = None,
                  mu_v: torch.Tensor | None = None) -> None:
        """Set one layer's centering means [Hkv, D] (model coordinates) of a centered side,
        before anything is stored in that layer: for a cache that measures them on its
        first rows instead of a calibration pass (``kvslim.hf``)."""
        mu_k = self._smoothed(mu_k, layer)
        for mu, shift, rot in ((mu_k, self._shift_k, self.rotation_k),
                               (mu_v, self._shift_v, self.rotation_v)):
            if mu is not None:
                if shift is None:
                    raise ValueError("this codec does not center that side")
                mu = mu.to(device=shift.device, dtype=torch.float32)
                shift[layer] = rot.forward(mu) if rot is not None else mu
        if mu_v is not None:
            group = self.n_heads // self._shift_v.shape[1]
            self._shift_o[layer] = self._shift_v[layer].repeat_interleave(group, dim=0)
        self.version += 1

    def query_terms(self, layer: int):
        """What ``transform_q`` applies to one layer's queries: (rotation R_k or None,
        pre [Hq, D] or None, post [Hq] or None) for (R_k (q * pre)) * post (a fused
        attention kernel applies them itself, in the same order)."""
        return (self.rotation_k, None if self._qdiv is None else self._qdiv[layer],
                None if self._qmul is None else self._qmul[layer])

    def output_terms(self, layer: int):
        """What ``restore`` applies to one layer's attention output: (rotation R_v or None,
        mul [Hq] or None, shift [Hq, Dv] or None) for R_v^T (o * mul + shift)."""
        return (self.rotation_v, None if self._omul is None else self._omul[layer],
                None if self._shift_o is None else self._shift_o[layer])

    def transform_q(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """R_k (q / s_k) for q [N, Hq, D]: queries in the cache's coordinates, in q's dtype
        (the butterfly runs in float32 whatever the dtype: a bf16 one would add an error
        the size of q8_0's)."""
        rot, pre, post = self.query_terms(layer)
        if rot is None and pre is None and post is None:
            return q
        y = scaled_rotate_rows(q, rot, pre, post)  # CPU float32: one kernel call
        if y is not None:
            return y
        y = q.float()
        if pre is not None:
            y = y * pre
        y = rotate_rows(y, rot)
        if post is not None:
            y = y * post[:, None]
        return y.to(q.dtype)

    def transform_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """(R_k (s_k k) - mu_k, R_v v - mu_v) float32 for k [N, Hkv, D], v [N, Hkv, Dv]: the
        rows as the cache stores them (the plain-torch write; ``kernels.cpu_write`` fuses it)."""
        sk, sv = self.stored_shift(layer)
        k = k.float() if self.smooth_k is None else k.float() * self.smooth_k[layer]
        k, v = rotate_rows(k, self.rotation_k, sk), rotate_rows(v.float(), self.rotation_v, sv)
        ik, iv = self.stored_scale(layer)
        return (k if ik is None else k * ik[:, None]), (v if iv is None else v * iv[:, None])

    def stored_scale(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(1/s_k, 1/s_v) of one layer, [Hkv] float32 each (the coded rows are multiplied
        by them before they are stored), None for a side that is not scaled."""
        return (self._inv_k[layer] if self._inv_k is not None else None,
                self._inv_v[layer] if self._inv_v is not None else None)

    def key_scale(self, layer: int) -> torch.Tensor | None:
        """s_k of one layer, [Hkv, D] float32 (keys are multiplied by it before the
        rotation), None when keys are not scaled."""
        return self.smooth_k[layer] if self.smooth_k is not None else None

    def stored_shift(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mu_k, mu_v) of one layer in the stored (rotated) coordinates, [Hkv, D] float32
        each, None for a side that is not centered."""
        return (self._shift_k[layer] if self._shift_k is not None else None,
                self._shift_v[layer] if self._shift_v is not None else None)

    def restore(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """R_v^T (o + mu_v): the attention output back in the model's coordinates.

        o [N, Hq, Dv] is the attention's own fresh output, so it is decoded in place."""
        rot, mul, so = self.output_terms(layer)
        if mul is not None:
            o = o * mul[:, None].to(o.dtype)
        if o.dtype is not torch.float32:  # GPU compute dtypes: the butterfly in float32
            return rotate_rows(o.float(), rot, so, inverse=True).to(o.dtype)
        return rotate_rows(o, rot, so, inverse=True, in_place=True)


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
    scaled_k: bool = False  # fp8 sides: a scale per (layer, kv head)
    scaled_v: bool = False
    key_scaling: bool = False  # keys times calibrated per-channel factors, q divided

    @property
    def active(self) -> bool:
        return bool(self.rotation_k or self.rotation_v or self.centering_k or self.centering_v
                    or "lsq" in (self.rounding_k, self.rounding_v) or self.scaled_k
                    or self.scaled_v or self.key_scaling)

    def describe(self) -> dict:
        """{"kv_rotation", "kv_centering", "kv_rounding", "kv_codec_note"} for reports:
        e.g. "hadamard-64" or "K hadamard-64 / V off", "K" (the centered sides), "lsq"."""
        rot = lambda n: f"hadamard-{n}" if n else "off"  # noqa: E731
        sides = [n for n, on in (("K", self.centering_k), ("V", self.centering_v)) if on]
        out = {"kv_rotation": _pair(rot(self.rotation_k), rot(self.rotation_v)),
               "kv_centering": "+".join(sides) or "off",
               "kv_rounding": _pair(self.rounding_k, self.rounding_v), "kv_codec_note": self.note}
        scaled = [n for n, on in (("K", self.scaled_k), ("V", self.scaled_v)) if on]
        if scaled:  # only fp8 caches report it, so other reports stay as they were
            out["kv_fp8_scales"] = "+".join(scaled) + " per layer and kv head"
        if self.key_scaling:  # only where on, so other reports stay as they were
            out["kv_key_scaling"] = "per channel"
        return out


def decide(settings: CodecSettings, type_k: str, type_v: str, head_dim: int) -> CodecChoice:
    """Apply the settings to a cache's effective types and head_dim.

    auto: rotation and centering where a side is block-quantized (rotation only when a
    Hadamard block of 64 or more divides head_dim), lsq rounding on the types that have
    it. Key scaling goes with K centering on a block-quantized K (not fp8, which has
    its own scale and a floating-point code). "on" for rotation on a head_dim without a
    Hadamard block gives no rotation and a note (the caller warns), like flash attention
    asked for where it cannot run.
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
    centering_k = settings.centering == "on" or (settings.centering == "auto" and qk)
    return CodecChoice(
        size if rot_k else None, size if rot_v else None,
        centering_k, settings.centering == "on",
        "lsq" if lsq and rounding.supports_lsq(type_k) else "ggml",
        "lsq" if lsq and rounding.supports_lsq(type_v) else "ggml", note,
        formats.is_fp8(type_k), formats.is_fp8(type_v),
        centering_k and qk and not formats.is_fp8(type_k))
