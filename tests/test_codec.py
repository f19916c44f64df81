"""K/V coding (rotation, centering, lsq rounding): exact attention, every backend against
the float64 attention of its own stored values, the fused CPU write against the torch
path byte for byte, lsq never worse than ggml, the defaults, and the settings plumbing.

Tolerances: relative Frobenius norm per sequence, 1e-5 for float32 caches (rounding of
the rotation and of a few thousand products), 1e-4 for quantized ones (the kernels'
budget, tests/test_attention_kernels.py).
"""
import random

import pytest
import torch
from test_attention_reference import float64_attention

from kvslim import formats, rounding
from kvslim.attention import Attention, plan_attention
from kvslim.cache import KVCache
from kvslim.kernels import cpu_write
from kvslim.codec import CodecChoice, CodecSettings, KVCodec, decide
from kvslim.rotation import Rotation

BACKENDS = ("reference", "tiled", "cpu")
L, HKV, HQ, D = 2, 2, 6, 64


def codec_for(kt, vt, *, mu_scale=3.0, rounding_k="lsq", rounding_v="lsq", seed=0,
              signs=True, center_v=True, key_scaling=False) -> KVCodec:
    """Rotation, centering, for an fp8 side random per-(layer, head) scales, and with
    ``key_scaling`` random per-channel key factors spanning 100x."""
    g = torch.Generator().manual_seed(seed)
    mu_k = torch.randn(L, HKV, D, generator=g) * mu_scale  # large offsets: centering matters
    mu_v = torch.randn(L, HKV, D, generator=g) * mu_scale if center_v else None
    scale = lambda t: torch.rand(L, HKV, generator=g) * 0.1 + 0.01 if formats.is_fp8(t) else None  # noqa: E731
    smooth = (torch.rand(L, HKV, D, generator=g) * 4.6 - 2.3).exp() if key_scaling else None
    return KVCodec(HQ, Rotation.make(D, random_signs=signs, seed=seed), Rotation.make(D), mu_k,
                   mu_v, rounding_k, rounding_v, scale(kt), scale(vt), smooth)


def rows(n, gen, offset=0.0):
    """q [n, HQ, D], k, v [n, HKV, D]: k and v with a per-channel offset, like real K."""
    bias = torch.linspace(-1, 1, D) * offset
    return (torch.randn(n, HQ, D, generator=gen), torch.randn(n, HKV, D, generator=gen) + bias,
            torch.randn(n, HKV, D, generator=gen) + bias)


def run_steps(kt, vt, codec, backend, steps, seed, page_size=16):
    """One sequence fed ``steps`` rows at a time through Attention: outputs [T, HQ, D]."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(steps)
    cache = KVCache(L, HKV, D, -(-total // page_size) + 1, page_size=page_size, cache_type_k=kt,
                    cache_type_v=vt, codec=codec)
    plan = plan_attention("cpu", D, kt, vt, warn=False)
    plan.backend = backend
    attn, seq, outs, inputs = Attention(plan), cache.new_sequence(), [], []
    for n in steps:
        q, k, v = rows(n, gen, offset=4.0)
        outs.append(attn(q, k, v, 1, attn.begin(cache, [seq], [n]), D ** -0.5))
        inputs.append((q, k, v))
    return torch.cat(outs), inputs, cache, seq


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_scales_leave_float32_attention_unchanged(backend):
    """fp8's per-(layer, head) scales on an f32 cache (q times s_k, the output times s_v,
    rows divided by them): the same attention as no coding, to float32 rounding."""
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    steps = [37, 1, 1, 5, 1]
    scaled = KVCodec(HQ, scale_k=torch.rand(L, HKV, generator=g) * 3 + 0.01,
                     scale_v=torch.rand(L, HKV, generator=g) * 3 + 0.01)
    plain, _, _, _ = run_steps("f32", "f32", None, backend, steps, seed)
    coded, _, cache, seq = run_steps("f32", "f32", scaled, backend, steps, seed)
    assert rel(coded, plain) < 1e-5, f"seed {seed}"
    k, _ = cache.read(1, seq)
    _, k_in, _ = rows(37, torch.Generator().manual_seed(seed), offset=4.0)
    torch.testing.assert_close(k[:, :37] * scaled.scale_k[1][:, None, None], k_in.transpose(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coding_leaves_float32_attention_unchanged(backend):
    """Rotation (with random signs), key and value centering on an f32 cache: the same
    attention as no coding at all, to float32 rounding."""
    seed = random.randrange(1 << 30)
    steps = [37, 1, 1, 5, 1]
    plain, _, _, _ = run_steps("f32", "f32", None, backend, steps, seed)
    coded, _, _, _ = run_steps("f32", "f32", codec_for("f32", "f32", seed=seed), backend, steps, seed)
    assert rel(coded, plain) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_scaling_leaves_float32_attention_unchanged(backend):
    """Per-channel key factors (keys times s, queries over s) with rotation and centering
    on an f32 cache: the same attention as no coding, to float32 rounding."""
    seed = random.randrange(1 << 30)
    steps = [37, 1, 1, 5, 1]
    plain, _, _, _ = run_steps("f32", "f32", None, backend, steps, seed)
    codec = codec_for("f32", "f32", seed=seed, key_scaling=True)
    coded, _, cache, seq = run_steps("f32", "f32", codec, backend, steps, seed)
    assert rel(coded, plain) < 1e-5, f"seed {seed}"
    k, _ = cache.read(1, seq)  # stored: R (s k) - R (s mu)
    _, k_in, _ = rows(37, torch.Generator().manual_seed(seed), offset=4.0)
    back = codec.rotation_k.inverse(k[:, :37] + codec.stored_shift(1)[0][:, None])
    torch.testing.assert_close(back / codec.smooth_k[1][:, None], k_in.transpose(0, 1),
                               rtol=1e-4, atol=1e-4)


def assert_steps_match_float64(out, inputs, k, v, seed) -> None:
    """Each step's rows of out equal float64 attention of its queries over the un-coded
    keys and values cached up to its end (causal by step), within 1e-4 relative."""
    t = 0
    for q_step in [x[0] for x in inputs]:
        n = q_step.shape[0]
        ref = float64_attention(q_step.double(), k[:, :t + n].double(), v[:, :t + n].double(), D ** -0.5)
        assert rel(out[t:t + n], ref) < 1e-4, f"seed {seed}: rows {t}..{t + n}"
        t += n
    assert t == out.shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kt,vt", [("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q4_1", "q5_1")])
def test_key_scaled_quantized_path_matches_its_reference(backend, kt, vt):
    """With key scaling, each backend's output equals float64 attention over the stored
    blocks un-coded (R^T, + mu, / s): the scaling is undone exactly through q."""
    seed = random.randrange(1 << 30)
    codec = codec_for(kt, vt, seed=seed, key_scaling=True)
    out, inputs, cache, seq = run_steps(kt, vt, codec, backend, [40, 1, 1, 3], seed)
    k, v = cache.read(1, seq)
    shift_k, shift_v = codec.stored_shift(1)
    k = codec.rotation_k.inverse(k + shift_k[:, None]) / codec.smooth_k[1][:, None]
    v = codec.rotation_v.inverse(v + shift_v[:, None])
    assert_steps_match_float64(out, inputs, k, v, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kt,vt", [("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q4_1", "q5_1"),
                                   ("q5_0", "iq4_nl"), ("q8_0", "f16"), ("fp8_e4m3", "fp8_e5m2"),
                                   ("q8_0", "fp8_e4m3")])
def test_coded_quantized_path_matches_its_reference(backend, kt, vt):
    """Each backend's decoded output equals float64 attention over the stored blocks,
    dequantized and un-coded (R^T, + mu): the reference path of the same cache."""
    seed = random.randrange(1 << 30)
    codec = codec_for(kt, vt, seed=seed)
    out, inputs, cache, seq = run_steps(kt, vt, codec, backend, [40, 1, 1, 3], seed)
    k, v = cache.read(1, seq)  # [HKV, T, D] stored (rotated, centered, fp8: scaled) values
    shift_k, shift_v = codec.stored_shift(1)
    inv_k, inv_v = codec.stored_scale(1)
    k = k if inv_k is None else k / inv_k[:, None, None]
    v = v if inv_v is None else v / inv_v[:, None, None]
    k = codec.rotation_k.inverse(k + shift_k[:, None])
    v = codec.rotation_v.inverse(v + shift_v[:, None])
    assert_steps_match_float64(out, inputs, k, v, seed)


@pytest.mark.parametrize("kt,vt,rk,rv", [("q4_0", "q8_0", "lsq", "lsq"), ("q4_1", "f16", "lsq", "ggml"),
                                         ("iq4_nl", "q5_0", "ggml", "ggml"), ("q8_0", "bf16", "ggml", "lsq"),
                                         ("fp8_e4m3", "fp8_e5m2", "lsq", "lsq")])
@pytest.mark.parametrize("key_scaling", [False, True])
def test_fused_cpu_write_equals_torch_path(kt, vt, rk, rv, key_scaling):
    """The CPU writer's one numba call (rotate, centre, round, store) writes the same bytes
    as the torch path: transform_kv + cache.write (symmetric lsq types and ggml rounding
    are exact)."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(70, HQ + 2 * HKV, D, generator=gen)
    k, v = qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:]  # strided views, as the model's
    codec = codec_for(kt, vt, rounding_k=rk, rounding_v=rv, key_scaling=key_scaling)
    a, b = (KVCache(L, HKV, D, 4, page_size=32, cache_type_k=kt, cache_type_v=vt, codec=codec)
            for _ in range(2))
    sa, sb = a.new_sequence(), b.new_sequence()
    slots_a, slots_b = a.reserve(sa, 70), b.reserve(sb, 70)
    cpu_write.write(a, 1, slots_a, k, v)
    b.write(1, slots_b, *codec.transform_kv(1, k, v))
    for pa, pb in ((a.k_planes, b.k_planes), (a.v_planes, b.v_planes)):
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name


def test_threaded_write_equals_one_call(monkeypatch):
    """A long write split over threads (row ranges coded at once) stores the same bytes as
    one numba call; a NaN anywhere still leaves the cache untouched."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = rows(100, gen, offset=3.0)
    codec = codec_for("q4_0", "q5_1")
    caches = [KVCache(L, HKV, D, 4, page_size=32, cache_type_k="q4_0", cache_type_v="q5_1", codec=codec)
              for _ in range(2)]
    slots = [c.reserve(c.new_sequence(), 100) for c in caches]
    cpu_write.write(caches[0], 1, slots[0], k, v)
    parts = cpu_write._row_parts
    assert parts(10) == [(0, 10)] and len(parts(4096)) == min(torch.get_num_threads(),
                                                              4096 // cpu_write.PARALLEL_MIN_ROWS)
    monkeypatch.setattr(cpu_write, "_row_parts", lambda n: [(0, 33), (33, 34), (34, n)])
    cpu_write.write(caches[1], 1, slots[1], k, v)
    for name in caches[0].k_planes:
        assert torch.equal(caches[0].k_planes[name], caches[1].k_planes[name]), name
    for name in caches[0].v_planes:
        assert torch.equal(caches[0].v_planes[name], caches[1].v_planes[name]), name
    before = {n: p.clone() for n, p in caches[1].v_planes.items()}
    v_bad = v.clone()
    v_bad[90, 1, 5] = float("nan")  # in the last range: the first must not be written either
    with pytest.raises(ValueError, match="non-finite"):
        cpu_write.write(caches[1], 0, slots[1], k, v_bad)
    assert all(torch.equal(before[n], caches[1].v_planes[n]) for n in before)


def test_stored_blocks_are_ggml_blocks_of_coded_values():
    """With ggml rounding the cache holds exactly gguf's q4_0 bytes of R k - mu_k."""
    import gguf
    import numpy as np

    codec = codec_for("q4_0", "q4_0", rounding_k="ggml", rounding_v="ggml")
    gen = torch.Generator().manual_seed(2)
    q, k, v = rows(20, gen, offset=2.0)
    cache = KVCache(L, HKV, D, 2, page_size=32, cache_type_k="q4_0", cache_type_v="q4_0", codec=codec)
    seq = cache.new_sequence()
    cpu_write.write(cache, 0, cache.reserve(seq, 20), k, v)
    kb, _ = cache.export(0, seq)  # [HKV, T, bytes]
    coded = codec.rotation_k.forward(k) - codec.stored_shift(0)[0]  # [T, HKV, D]
    want = gguf.quants.quantize(coded.transpose(0, 1).numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(kb.numpy(), want)


@pytest.mark.parametrize("t", rounding.LSQ_TYPES)
def test_lsq_never_worse_than_ggml_per_block(t):
    """Every block's squared error (f16 scales included) is at most ggml's, for the torch
    encoder and the numba writer, and the total is clearly lower."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, HKV, D, generator=gen) * torch.rand(2000, HKV, 1, generator=gen) * 4
    x[:50] = x[:50] ** 3  # heavy tails
    x[50, 0] = 0.0  # an all-zero row
    x[51, 0] = 1.5  # a constant row
    err = lambda y: ((y - x) ** 2).reshape(-1, 32).sum(-1)  # noqa: E731
    ggml = err(formats.decode(formats.encode(x, t), t))
    torch_lsq = err(formats.decode(rounding.encode_rounded(x, t, "lsq"), t))
    cache = KVCache(1, HKV, D, 63, page_size=32, cache_type_k=t, cache_type_v="f16",
                    codec=KVCodec(HQ, rounding_k="lsq"))
    seq = cache.new_sequence()
    cpu_write.write(cache, 0, cache.reserve(seq, 2000), x, x)
    numba_lsq = err(cache.read(0, seq)[0].transpose(0, 1))
    normal = slice(52 * HKV * D // 32, None)  # the blocks of the Gaussian rows
    for got in (torch_lsq, numba_lsq):
        assert (got <= ggml * (1 + 1e-6) + 1e-12).all()
        assert got[normal].sum() < 0.92 * ggml[normal].sum()  # ~11-20% measured
    torch.testing.assert_close(numba_lsq.sum(), torch_lsq.sum(), rtol=1e-4, atol=0)


def test_lsq_refuses_non_finite_and_keeps_the_cache():
    cache = KVCache(1, HKV, D, 1, page_size=8, cache_type_k="q4_0", cache_type_v="q4_0",
                    codec=KVCodec(HQ, rounding_k="lsq", rounding_v="lsq"))
    seq = cache.new_sequence()
    k = torch.randn(2, HKV, D)
    v = k.clone()
    v[1, 0, 3] = float("nan")
    before = {n: t.clone() for n, t in cache.k_planes.items()}
    slots = cache.reserve(seq, 2)
    for write in (cache.write, lambda *a: cpu_write.write(cache, *a)):  # torch, numba
        with pytest.raises(ValueError, match="non-finite"):
            write(0, slots, k, v)
        assert all(torch.equal(before[n], t) for n, t in cache.k_planes.items())


# The defaults, as the README states them: rotation and key centering on for every
# block-quantized side when head_dim allows a Hadamard block (a multiple of 64), lsq
# rounding on q8_0, q4_0, q4_1, q5_0, q5_1; nothing for f32, f16, bf16.
@pytest.mark.parametrize("t", formats.TYPES)
def test_default_for_each_type(t):
    quantized = formats.is_quantized(t)
    got = decide(CodecSettings(), t, t, 64)
    assert got == CodecChoice(64 if quantized else None, 64 if quantized else None, quantized,
                              False, "lsq" if t in rounding.LSQ_TYPES else "ggml",
                              "lsq" if t in rounding.LSQ_TYPES else "ggml", None,
                              formats.is_fp8(t), formats.is_fp8(t),
                              quantized and not formats.is_fp8(t))
    assert got.active == quantized
    assert decide(CodecSettings(), t, t, 96).rotation_k is None  # no Hadamard block


def test_mixed_types_and_explicit_modes():
    c = decide(CodecSettings(), "q8_0", "f16", 128)
    assert (c.rotation_k, c.rotation_v, c.centering_k, c.rounding_v) == (128, None, True, "ggml")
    assert c.describe()["kv_rotation"] == "K hadamard-128 / V off"
    c = decide(CodecSettings("on", "on", "ggml"), "f16", "f16", 64)
    assert (c.rotation_k, c.rotation_v, c.centering_k, c.centering_v, c.rounding_k) == \
        (64, 64, True, True, "ggml")
    c = decide(CodecSettings("on", "off", "auto"), "q4_0", "q4_0", 96)
    assert c.rotation_k is None and "head_dim 96" in c.note
    assert decide(CodecSettings("off", "off", "ggml"), "q4_0", "q4_0", 64).active is False


# ---------------------------------------------------------------- through the model


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny llama with head_dim 64 (so a Hadamard block fits), its path, model, tokenizer."""
    import tiny_llama

    from kvslim.gguf_loader import ModelConfig, open_gguf
    from kvslim.models import load_model
    from kvslim.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("codec") / "tiny64.gguf"
    tiny_llama.write(path, tiny_llama.Tiny(d_model=256, n_heads=4, n_kv_heads=2, ctx=512))
    reader = open_gguf(path)
    return path, load_model(reader, ModelConfig.from_gguf(reader), progress=False), Tokenizer.from_gguf(reader)


def greedy(engine, ids, n=8):
    from kvslim.sampling import SamplingParams

    seq = engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0, repeat_penalty=1.0,
                                                 ignore_eos=True))
    while engine.has_work():
        engine.step()
    return seq.output_ids


def test_engine_coding_is_exact_on_a_float_cache(tiny64):
    """Rotation and centering of K and V on an f32 cache: the same logits (prefill) and the
    same greedy tokens (decode steps) as the plain cache."""
    from kvslim.engine import Engine

    _, model, tok = tiny64
    ids = tok.encode("the cab " * 30, add_special=True)
    engines = [Engine(model, tok, cache_type_k="f32", cache_type_v="f32", num_ctx=512,
                      codec=CodecSettings(mode, mode, "ggml")) for mode in ("off", "on")]
    info = engines[1].cache_info()
    assert (info["kv_rotation"], info["kv_centering"]) == ("hadamard-64", "K+V")
    plain, coded = (e.score(ids) for e in engines)
    torch.testing.assert_close(coded, plain, rtol=1e-4, atol=1e-4)
    assert greedy(engines[0], ids) == greedy(engines[1], ids)


def test_llm_settings_and_reconfigure(tiny64, monkeypatch):
    from kvslim import LLM

    for name in ("KVSLIM_KV_ROTATION", "KVSLIM_KV_CENTERING", "KVSLIM_KV_ROUNDING"):
        monkeypatch.delenv(name, raising=False)
    path, _, _ = tiny64
    llm = LLM(str(path), kv_cache_type="q4_0", num_ctx=256, progress=False, pull=False)
    info = llm.kv_cache_info()
    assert (info["kv_rotation"], info["kv_centering"], info["kv_rounding"]) == ("hadamard-64", "K", "lsq")
    assert llm.engine.cache.codec.rotation_k.size == 64
    llm.reconfigure(kv_rotation="off")  # the others keep their values
    info = llm.kv_cache_info()
    assert (info["kv_rotation"], info["kv_centering"], info["kv_rounding"]) == ("off", "K", "lsq")
    llm.reconfigure(kv_cache_type="f16")
    assert llm.kv_cache_info()["kv_centering"] == "off" and llm.engine.cache.codec is None
    with pytest.raises(ValueError, match="kv_centering"):
        llm.reconfigure(kv_centering="maybe")
    assert llm.kv_cache_info()["type_k"] == "f16"  # a bad setting leaves the cache as it was
    monkeypatch.setenv("KVSLIM_KV_ROUNDING", "ggml")
    assert LLM(str(path), kv_cache_type="q8_0", num_ctx=64, progress=False,
               pull=False).kv_cache_info()["kv_rounding"] == "ggml"


def test_torch_path_for_other_dtypes_and_devices():
    """The plain-torch write (transform_kv + cache.write + torch lsq, as off the CPU) takes
    bf16 rows (a GPU's compute dtype), codes them in float32, and they attend like float32
    rows."""
    codec = codec_for("q8_0", "q8_0")
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(L, HKV, D, 2, page_size=32, cache_type_k="q8_0", cache_type_v="q8_0", codec=codec)
        plan = plan_attention("cpu", D, "q8_0", "q8_0", warn=False)
        plan.backend = "reference"
        seq = cache.new_sequence()
        q, k, v = (x.to(torch.bfloat16).to(dtype) for x in rows(40, torch.Generator().manual_seed(5)))
        attn = Attention(plan)
        outs.append(attn(q, k, v, 1, attn.begin(cache, [seq], [40]), 0.125))
    assert outs[1].dtype == torch.float32  # the reference backend's output, decoded in float32
    assert rel(outs[1], outs[0]) < 1e-2  # bf16 q rounding only; k, v quantized from the same values


def test_calibration_is_kept_beside_the_store(tiny64, monkeypatch, tmp_path):
    """The centering means are computed once per model and read back from the store on
    the next load; a damaged file is recomputed, an unwritable store only costs time."""
    from kvslim import calibration as C

    monkeypatch.setenv("KVSLIM_MODELS", str(tmp_path / "store"))
    _, model, tok = tiny64
    calls, real = [], C.calibrate
    monkeypatch.setattr(C, "calibrate", lambda m, ids: calls.append(1) or real(m, ids))
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731

    C._MEANS.pop(model, None)
    first = C.model_means(model, tok)
    files = list((tmp_path / "store" / ".calibration").glob("*.pt"))
    assert len(calls) == 1 and len(files) == 1
    C._MEANS.pop(model)
    assert same(C.model_means(model, tok), first) and len(calls) == 1  # read back
    files[0].write_bytes(b"not a tensor file")
    C._MEANS.pop(model)
    assert same(C.model_means(model, tok), first) and len(calls) == 2  # recomputed, rewritten
    C._MEANS.pop(model)
    assert same(C.model_means(model, tok), first) and len(calls) == 2
    monkeypatch.setenv("KVSLIM_MODELS", str(files[0]))  # a file where the store should be
    C._MEANS.pop(model)
    assert same(C.model_means(model, tok), first) and len(calls) == 3


def test_key_scales_minimise_the_score_error_proxy():
    """calibration.scales_from_energies: s = (E q^2 / E k^2) ** (1/4) (geometric mean 1,
    channels without energy 1) gives a smaller sum(eq / s^2) * sum(ek s^2) (a rotated
    cache's score error) than no scaling or random perturbations of it."""
    from kvslim.calibration import scales_from_energies

    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    eq = torch.randn(L, HKV, D, generator=g).exp()  # within KEY_SCALE_RANGE: no clamping
    ek = torch.randn(L, HKV, D, generator=g).exp()
    eq[0, 0, -4:] = 0.0  # padding: no energy
    s = scales_from_energies(eq, ek)
    live = s[0, 0, :-4]
    assert torch.equal(s[0, 0, -4:], torch.ones(4))
    assert abs(float(live.log().mean())) < 1e-5 and abs(float(s[1].log().mean())) < 1e-5
    proxy = lambda x: ((eq / x ** 2).sum(-1) * (ek * x ** 2).sum(-1))  # noqa: E731
    assert bool((proxy(s) <= proxy(torch.ones_like(s)) * (1 + 1e-6)).all())
    for _ in range(5):
        other = s * (torch.randn(s.shape, generator=g) * 0.2).exp()
        assert bool((proxy(s) <= proxy(other) * (1 + 1e-6)).all())


@pytest.mark.parametrize("kt,vt", [("q8_0", "q4_0"), ("fp8_e4m3", "fp8_e5m2")])
@pytest.mark.parametrize("key_scaling", [False, True])
@pytest.mark.parametrize("q_lens", [[1, 1], [1, 40]], ids=["decode", "with-a-tiled-chunk"])
def test_cpu_write_attend_codes_q_and_restores_as_the_separate_calls(kt, vt, key_scaling, q_lens):
    """The CPU backend's one job (the codec's query coding by the first thread in, the
    output restored after the merge; a step with a long chunk codes around torch's
    attention instead) against write, transform_q, attend and restore called one by one:
    the same output and the same cache bytes, bit for bit. fp8 sides bring the per-head
    scales, key_scaling the per-channel query factors; rotation and centering always."""
    from kvslim.attention import Step
    from kvslim.kernels import cpu

    seed = random.randrange(1 << 30)
    codec = codec_for(kt, vt, key_scaling=key_scaling, seed=seed % 997)
    gen = torch.Generator().manual_seed(seed)
    before = [rows(n, gen, offset=2.0) for n in (21, 9)]
    q, k, v = rows(sum(q_lens), gen, offset=2.0)
    got = []
    for fused in (True, False):
        cache = KVCache(L, HKV, D, 16, page_size=16, cache_type_k=kt, cache_type_v=vt, codec=codec)
        seqs = [cache.new_sequence() for _ in q_lens]
        for s, (_, bk, bv) in zip(seqs, before):
            cpu_write.write(cache, 1, Step.reserve(cache, [s], [bk.shape[0]]).slots, bk, bv)
        step = Step.reserve(cache, seqs, q_lens)
        backend = cpu.Backend()
        backend.prepare(step)
        if fused:
            out = backend.write_attend(q, k, v, cache, 1, step, 0.125)
        else:
            backend.write(cache, 1, step, k, v)
            out = codec.restore(1, backend.attend(codec.transform_q(1, q), cache, 1, step, 0.125))
        got.append((out, [t.clone() for t in (*cache.k_planes.values(), *cache.v_planes.values())]))
    (a, sa), (b, sb) = got
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"seed {seed}"
    assert all(torch.equal(x, y) for x, y in zip(sa, sb)), f"seed {seed}"
