"""The K/V codec's calibration: the mean key and value of every layer and head, measured
by running the model once over a short text, and the ``KVCodec`` built from them.

It runs the model, so it sits above ``models`` (the coding transforms themselves,
``codec``, stay below the cache). The means depend on the weights only: they are
computed once per loaded model and kept beside the model store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvslim import atomic, store
from kvslim.attention import Attention, plan_attention
from kvslim.codec import CodecChoice, KVCodec
from kvslim.rotation import Rotation
from kvslim.version import __version__

__all__ = ["AUTO_CANDIDATES", "CALIBRATION_TEXT", "auto_cache_types", "quality_table", "FP8_SCALE_DIVISORS", "build_codec", "calibrate", "calibration_ids",
           "fp8_scales", "key_scales", "key_shift", "model_means"]

log = logging.getLogger("kvslim")

_MEANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_means(model, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``calibrate`` on CALIBRATION_TEXT, once per loaded model (the weights never change).

    Without a tokenizer (bare engines in tests) a fixed spread of token ids stands in.
    """
    got = _MEANS.get(model)
    if got is None:
        ids = calibration_ids(model, tokenizer)
        path = _means_path(model, ids)
        got = _load_means(path, model) if path is not None else None
        if got is None:
            got = calibrate(model, ids)
            if path is not None:
                _save_means(path, got)
        _MEANS[model] = got
    return got


def calibration_ids(model, tokenizer=None) -> list[int]:
    """CALIBRATION_TEXT's tokens (a fixed spread of ids without a tokenizer)."""
    if tokenizer is not None:
        return tokenizer.encode(CALIBRATION_TEXT, add_special=True, parse_special=False)
    return [(i * 7919) % model.config.vocab_size for i in range(256)]


# ---------------------------------------------------------------- the means on disk
# The calibration forward is a sizeable part of a model load (benchmarks/README.md) and
# its result only depends on the weights, so it is kept beside the model store, keyed by
# everything it depends on. A missing, unreadable or mismatched file is recomputed.

_MEANS_FORMAT = 1


def _means_path(model, ids: list[int], extra=(), suffix: str = ""):
    """Where ``model``'s means live (None: this model cannot be keyed, e.g. no layers);
    ``extra`` keys other measurements of the same model (``suffix`` names their kind)."""
    layers = getattr(model, "layers", None)
    if not layers or not hasattr(layers[0], "wqkv"):
        return None
    h = hashlib.sha256(repr((_MEANS_FORMAT, __version__, model.config, str(model.dtype),
                             model.device.type, *extra)).encode())
    h.update(np.asarray(ids, np.int64).tobytes())
    for layer in (layers[0], layers[-1]):  # a sample of the weights themselves
        h.update(layer.wqkv.sample(8))
    return store.store_dir() / ".calibration" / f"{h.hexdigest()[:32]}{suffix}.pt"


def _load_means(path, model):
    try:
        mk, mv = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # absent, cut short, or not ours: recompute
        return None
    c = model.config
    want = (c.n_layers, c.n_kv_heads)
    if not (isinstance(mk, torch.Tensor) and isinstance(mv, torch.Tensor)):
        return None
    if mk.dtype != torch.float32 or mv.dtype != torch.float32 or mk.shape[:2] != want or mv.shape[:2] != want:
        return None
    return mk, mv


def _save_means(path, means) -> None:
    atomic.save(path, lambda tmp: torch.save(tuple(means), tmp), "K/V calibration")


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
    smooth = key_scales(model, tokenizer) if choice.key_scaling else None
    codec = KVCodec(model.n_heads, rot(choice.rotation_k), rot(choice.rotation_v), mu_k, mu_v,
                    choice.rounding_k, choice.rounding_v, smooth_k=smooth)
    if choice.scaled_k or choice.scaled_v:
        sk, sv = fp8_scales(model, tokenizer, codec.to(model.device), n_positions)
        codec = KVCodec(model.n_heads, codec.rotation_k, codec.rotation_v, mu_k, mu_v,
                        choice.rounding_k, choice.rounding_v,
                        sk if choice.scaled_k else None, sv if choice.scaled_v else None, smooth)
    return codec.to(model.device)


# ---------------------------------------------------------------- key scaling
# codec's key scaling: s_j = (E[q_j^2] / E[(k_j - mu_j)^2]) ** (1/4) per layer, kv head and
# channel, from the calibration forward. RoPE turns channel j with its partner j + R/2, so
# over positions both see the pair's mean energy: the factors are taken from it, which is
# the same before and after RoPE, and hold at any context length.

_KEY_SCALES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
KEY_SCALE_RANGE = 16.0  # s within [1/16, 16] of its geometric mean: no channel is starved


def key_scales(model, tokenizer=None) -> torch.Tensor:
    """s_k [L, Hkv, Dc] float32 on CPU (geometric mean 1 per head; padded channels 1),
    once per loaded model, kept beside the store as the means are."""
    got = _KEY_SCALES.get(model)
    if got is None:
        ids = calibration_ids(model, tokenizer)
        path = _means_path(model, ids, ("key-scales",), "-kscale")
        got = _load_means(path, model) if path is not None else None
        if got is None:
            got = channel_energies(model, ids)
            if path is not None:
                _save_means(path, got)
        got = scales_from_energies(*got)
        _KEY_SCALES[model] = got
    return got


def scales_from_energies(eq: torch.Tensor, ek: torch.Tensor) -> torch.Tensor:
    """s = (eq / ek) ** (1/4), normalised to geometric mean 1 per head and kept within
    KEY_SCALE_RANGE of it. eq, ek [L, Hkv, D] -> [L, Hkv, D]; channels without energy
    (padding) get 1."""
    tiny = 1e-6 * torch.minimum(eq.mean(-1, keepdim=True),
                                ek.mean(-1, keepdim=True)).clamp_min(1e-30)
    live = (eq > 0) & (ek > 0)
    log_s = torch.where(live, 0.25 * ((eq + tiny).log() - (ek + tiny).log()), 0.0)
    centre = (log_s * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    bound = math.log(KEY_SCALE_RANGE)
    return torch.where(live, (log_s - centre).clamp(-bound, bound).exp(), 1.0).float()


class _QueryEnergy(Attention):
    """Attention that also sums each layer's squared queries per kv head and channel."""

    def __init__(self, plan, n_kv: int, skip: int):
        super().__init__(plan)
        self.n_kv, self.skip, self.sums = n_kv, skip, {}

    def __call__(self, q, k, v, layer, step, scale, window=0, softcap=0.0):
        n, hq, d = q.shape
        e = q[self.skip:].float().pow(2).reshape(-1, self.n_kv, hq // self.n_kv, d).sum((0, 2))
        self.sums[layer] = self.sums.get(layer, 0) + e  # [Hkv, D]
        return super().__call__(q, k, v, layer, step, scale, window, softcap)


def _pair_mean(e: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Each RoPE pair's channels (j, j + R/2) given their mean; the rest unchanged."""
    r = e[..., :rope_dim]
    r = (r + torch.roll(r, rope_dim // 2, dims=-1)) / 2
    return torch.cat([r, e[..., rope_dim:]], -1)


@torch.inference_mode()
def channel_energies(model, ids: list[int], skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[q^2] summed over a kv head's query heads, E[(k - mean k)^2]) per layer, kv head and
    channel over ``ids`` (before RoPE, RoPE pairs averaged), [L, Hkv, Dc] float32 on CPU."""
    page = 64
    cache = model.new_cache(-(-len(ids) // page), page, "f32", "f32")
    plan = plan_attention(model.device, cache.head_dim, "f32", "f32", warn=False)
    attn = _QueryEnergy(plan, model.n_kv_heads, skip)
    cid = cache.new_sequence()
    model.forward(torch.tensor(ids), attn.begin(cache, [cid], [len(ids)]),
                  torch.tensor([len(ids) - 1]))
    pos = torch.arange(skip, len(ids), device=model.device)
    dim, rope = model.head_dim, getattr(model.config, "rope_dim", 0) or model.head_dim
    n = len(ids) - skip
    eq, ek = [], []
    for layer in range(cache.n_layers):
        k, _ = cache.read(layer, cid)  # [Hkv, T, Dc] float32
        pre = model.unrope(k[:, skip:, :dim].transpose(0, 1).to(model.dtype), pos, layer).float()
        e = (pre - pre.mean(0)).pow(2).mean(0)  # [Hkv, D]
        ek.append(F.pad(_pair_mean(e, rope), (0, cache.head_dim - dim)))
        q = attn.sums[layer][..., :dim].float() / n
        eq.append(F.pad(_pair_mean(q, rope), (0, cache.head_dim - dim)))
    return torch.stack(eq).cpu(), torch.stack(ek).cpu()


# ---------------------------------------------------------------- fp8 scales
# vLLM's calculate_kv_scales: scale = amax / constant, so the largest value seen maps to
# 200 (K) or 100 (V), leaving e4m3 (max 448) 2.2x / 4.5x of headroom for rows larger than
# the calibration's; beyond it values saturate. The same for e5m2, whose range needs none.
FP8_SCALE_DIVISORS = (200.0, 100.0)


def fp8_scales(model, tokenizer, codec: KVCodec, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_k, s_v) [L, Hkv] float32 on CPU: the largest |value| of the rows ``codec`` (no
    scales) stores over CALIBRATION_TEXT, per layer and kv head, divided by
    FP8_SCALE_DIVISORS. Kept beside the store as the means are (keyed by the coding)."""
    ids = calibration_ids(model, tokenizer)
    extra = (codec.rotation_k and codec.rotation_k.size, codec.rotation_v and codec.rotation_v.size,
             codec.centered_k, codec.centered_v, n_positions)
    known = _SCALES.setdefault(model, {})
    got = known.get(extra)
    if got is not None:
        return got
    path = _means_path(model, ids, extra, "-fp8")
    got = _load_means(path, model) if path is not None else None
    if got is None:
        ak, av = _coded_amax(model, ids, codec)
        got = tuple(torch.where(a > 0, a / c, torch.ones_like(a))
                    for a, c in zip((ak, av), FP8_SCALE_DIVISORS))
        if path is not None:
            _save_means(path, got)
    known[extra] = got
    return got


_SCALES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {coding: scales}


@torch.inference_mode()
def _coded_amax(model, ids: list[int], codec: KVCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest |stored value| per layer and kv head of a float32 cache coded by ``codec``."""
    page = 64
    cache = model.new_cache(-(-len(ids) // page), page, "f32", "f32", codec=codec)
    plan = plan_attention(model.device, cache.head_dim, "f32", "f32", warn=False)
    cid = cache.new_sequence()
    model.forward(torch.tensor(ids), Attention(plan).begin(cache, [cid], [len(ids)]),
                  torch.tensor([len(ids) - 1]))
    ak, av = [], []
    for layer in range(cache.n_layers):
        k, v = cache.read(layer, cid)  # [Hkv, T, D] as stored (coded)
        ak.append(k.abs().amax(dim=(1, 2)))
        av.append(v.abs().amax(dim=(1, 2)))
    return torch.stack(ak).float().cpu(), torch.stack(av).float().cpu()


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
    page = 64
    cache = model.new_cache(-(-len(ids) // page), page, "f32", "f32")
    plan = plan_attention(model.device, cache.head_dim, "f32", "f32", warn=False)
    cid = cache.new_sequence()
    model.forward(torch.tensor(ids), Attention(plan).begin(cache, [cid], [len(ids)]),
                  torch.tensor([len(ids) - 1]))
    pos = torch.arange(skip, len(ids), device=model.device)
    dim = model.head_dim
    mk, mv = [], []
    for layer in range(cache.n_layers):
        k, v = cache.read(layer, cid)  # [Hkv, T, Dc] float32
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


# ---------------------------------------------------------------- the quality table
# ``--kv-cache-type auto`` picks from the measured KLD vs an f16 cache of these pairs (K at
# least as precise as V: K is the more sensitive side), on CALIBRATION_TEXT, once per model,
# machine and coding; kept beside the store like the means.

AUTO_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("q8_0", "q8_0"), ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("q8_0", "q5_0"),
    ("q8_0", "q4_0"), ("q8_0", "iq4_nl"), ("fp8_e4m3", "q4_0"), ("q5_1", "q5_1"),
    ("q5_0", "q5_0"), ("q5_0", "q4_0"), ("q4_1", "q4_1"), ("q4_0", "q4_0"), ("iq4_nl", "iq4_nl"),
)
_TABLE_FORMAT = 1


def quality_table(model, tokenizer, settings, flash_attn: str = "auto",
                  pairs=AUTO_CANDIDATES, progress: bool = True) -> dict[str, float]:
    """{"k/v": mean KLD vs an f16 cache} over CALIBRATION_TEXT, for each pair the device
    runs without a fallback (those that fall back are left out), coded by ``settings``
    (codec.CodecSettings). Measured once and kept beside the store (keyed by the model,
    the device, the coding, flash attention and the pairs); recomputed when missing,
    unreadable or from another kvslim."""
    ids = calibration_ids(model, tokenizer)
    key = (settings, flash_attn, tuple(pairs), _TABLE_FORMAT)
    path = _means_path(model, ids, key, "-kld")
    path = path.with_suffix(".json") if path is not None else None
    known = _TABLES.setdefault(model, {})
    got = known.get(key)
    if got is None and path is not None:
        got = _load_table(path, pairs)
    if got is None:
        got = _measure_table(model, tokenizer, ids, settings, flash_attn, pairs, progress)
        if path is not None:
            _save_table(path, got)
    known[key] = got
    return dict(got)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: table}


def _load_table(path, pairs) -> dict[str, float] | None:
    try:
        data = json.loads(path.read_text())
        table = {str(k): float(v) for k, v in data["kld"].items()}
    except Exception:  # absent, cut short, or not ours: recompute
        return None
    names = {f"{k}/{v}" for k, v in pairs}
    if data.get("format") != _TABLE_FORMAT or not set(table) <= names:
        return None
    return table


def _save_table(path, table: dict[str, float]) -> None:
    text = json.dumps({"format": _TABLE_FORMAT, "kld": table}, indent=1)
    atomic.save(path, lambda tmp: tmp.write_text(text), "K/V quality table")


@torch.inference_mode()
def _measure_table(model, tokenizer, ids, settings, flash_attn, pairs, progress) -> dict[str, float]:
    from kvslim.codec import decide

    ref = F.log_softmax(_all_logits(model, ids, "f16", "f16", flash_attn, None), dim=-1)
    p_ref = ref.exp()
    table: dict[str, float] = {}
    show = progress and sys.stderr.isatty()
    for k, v in tqdm(pairs, desc="measuring K/V cache types", unit="pair", disable=not show):
        plan = plan_attention(model.device, model.config.head_dim, k, v, flash_attn,
                              v_head_dim=model.config.v_head_dim, warn=False)
        if plan.fell_back:
            continue
        choice = decide(settings, k, v, model.cache_head_dim)
        codec = build_codec(model, tokenizer, choice, len(ids))
        logp = F.log_softmax(_all_logits(model, ids, k, v, flash_attn, codec), dim=-1)
        kld = (p_ref * (ref - logp)).sum(-1)[1:]  # the first position sees only itself
        table[f"{k}/{v}"] = max(0.0, float(kld.double().mean()))  # >= 0 but for rounding
    return table


def _all_logits(model, ids: list[int], k: str, v: str, flash_attn: str, codec) -> torch.Tensor:
    """float32 logits [T, V] of every position of ``ids`` through a fresh k/v cache."""
    page = 64
    cache = model.new_cache(-(-len(ids) // page), page, k, v, codec=codec)
    plan = plan_attention(model.device, model.config.head_dim, k, v, flash_attn,
                          v_head_dim=model.config.v_head_dim, warn=False)
    cid = cache.new_sequence()
    step = Attention(plan).begin(cache, [cid], [len(ids)])
    return model.forward(torch.tensor(ids), step, torch.arange(len(ids))).float()


def auto_cache_types(model, tokenizer, settings, max_kld: float, flash_attn: str = "auto",
                     max_bytes_per_token: int | None = None, progress: bool = True):
    """``--kv-cache-type auto``: the autotype.AutoChoice for this model from its quality
    table (measured on first use). NothingFits when a memory budget rules out every
    pair within max_kld."""
    from kvslim.cache import KVCache
    from kvslim.autotype import choose_auto

    table = quality_table(model, tokenizer, settings, flash_attn, progress=progress)

    def per_token(k: str, v: str) -> int:
        return KVCache.bytes_per_token(model.n_layers, model.n_kv_heads, model.cache_head_dim, k, v)
    return choose_auto(table, max_kld, per_token, max_bytes_per_token)
