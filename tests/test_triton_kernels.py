"""Triton kernels without a GPU: run under TRITON_INTERPRET=1 on the CPU against the
reference path (every K/V type pair, decode and prefill), quantize-on-write byte for byte
against formats.encode, device selection with the device mocked at the boundary, and the
kernels compiled ahead of time for real GPU targets (sm_60/80/90, gfx942).

TRITON_INTERPRET only takes effect if it is set before ``import triton`` (triton's own
``tl.zeros``, ``tl.sum``... are jitted then), and compiling for a GPU target needs it unset,
so one process can do one of the two. This module runs the half its process can and
``test_other_half_in_a_child_process`` runs the rest in a child process with the variable
flipped: a plain ``pytest`` compiles here and interprets in the child, and
``TRITON_INTERPRET=1 pytest -k ...`` selects interpreted tests directly.
"""
import importlib
import itertools
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from triton.runtime.interpreter import InterpretedFunction

from kvslim import formats
from kvslim.attention import Step, plan_attention
from kvslim.cache import KVCache
from kvslim.kernels import reference

TYPES = formats.TYPES
# every pair of the ggml types, and the fp8 types with each other and beside a few others
# (the kernel reads each side alone, so this covers their code paths at a tenth the cost)
GGML = [t for t in TYPES if not formats.is_fp8(t)]
PAIRS = list(itertools.product(GGML, GGML)) + [
    ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("fp8_e4m3", "fp8_e5m2"),
    ("fp8_e5m2", "fp8_e4m3"), ("q8_0", "fp8_e4m3"), ("fp8_e4m3", "q4_0"), ("q4_1", "fp8_e5m2"),
    ("fp8_e5m2", "f16")]
INTERPRETING = isinstance(triton.language.zeros, InterpretedFunction)
ON_GPU = not INTERPRETING and torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"  # where kernel tests put their tensors
CHILD = os.environ.get("KVSLIM_TRITON_CHILD") == "1"
interpreted = pytest.mark.skipif(
    not (INTERPRETING or ON_GPU),
    reason="runs under TRITON_INTERPRET=1 in test_other_half_in_a_child_process")
compiled_only = pytest.mark.skipif(
    INTERPRETING or ON_GPU,
    reason="compiles without TRITON_INTERPRET in test_other_half_in_a_child_process; "
           "a GPU runs the kernels themselves")


@pytest.mark.skipif(CHILD, reason="already the child process (or asked to skip it)")
def test_other_half_in_a_child_process(request):
    env = dict(os.environ, KVSLIM_TRITON_CHILD="1")
    env.pop("TRITON_INTERPRET", None)
    if not INTERPRETING:
        env["TRITON_INTERPRET"] = "1"
    root = str(Path(formats.__file__).resolve().parents[1])  # where kvslim is importable from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    if request.config.getoption("markexpr"):
        cmd += ["-m", request.config.getoption("markexpr")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"child pytest failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", r.stdout)  # the child ran kernels, not only skips
    assert passed and int(passed.group(1)) >= 100, r.stdout[-3000:]


def _kernels(interpret: bool):
    """The kernels module, its kernels decorated in this process's mode (reloaded if it
    was imported under the other one)."""
    mod = importlib.import_module("kvslim.kernels.triton")
    if isinstance(mod._attn_kernel, InterpretedFunction) != interpret:
        mod = importlib.reload(mod)
    assert isinstance(mod._attn_kernel, InterpretedFunction) == interpret
    return mod


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tk():
    return _kernels(interpret=INTERPRETING)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return _kernels(interpret=False)


# ---------------------------------------------------------------- helpers

def filled_cache(kt, vt, prefix, q_lens, *, hq=6, hkv=2, d=64, dv=None, page=8, layers=1):
    """A cache whose sequences hold ``prefix`` tokens, then this step's ``q_lens`` rows
    reserved and written; returns (cache, meta, q [N, hq, d] float32)."""
    cache = KVCache(layers, hkv, d, 64, page_size=page, cache_type_k=kt, cache_type_v=vt,
                    v_head_dim=dv, device=DEV)
    dv = cache.v_head_dim
    seqs = [cache.new_sequence() for _ in prefix]
    for s, n in zip(seqs, prefix):
        if n:
            m = Step.reserve(cache, [s], [n])
            for layer in range(layers):
                cache.write(layer, m.slots, torch.randn(n, hkv, d), torch.randn(n, hkv, dv))
    meta = Step.reserve(cache, seqs, q_lens)
    _kernels(interpret=INTERPRETING).Backend().prepare(meta)
    n = meta.n_rows
    for layer in range(layers):
        cache.write(layer, meta.slots, torch.randn(n, hkv, d), torch.randn(n, hkv, dv))
    return cache, meta, torch.randn(n, hq, d, device=DEV)


def check(tk, kt, vt, prefix, q_lens, dtype=torch.float32, tol=2e-5, layer=0, **kw):
    cache, meta, q = filled_cache(kt, vt, prefix, q_lens, **kw.pop("shape", {}))
    q = q.to(dtype)
    ref = reference.attention(q.float(), cache, layer, meta, 0.125)
    out = tk.paged_attention(q, *cache.layer_planes(layer), kt, vt, meta, 0.125, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref).abs().max().item()
    assert err < tol, f"{kt}/{vt} {dtype}: max error {err:.2e}"
    return out


def _bytes(t):
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------- attention

@interpreted
@pytest.mark.parametrize("kt,vt", PAIRS)
def test_decode_split_k_every_pair(tk, kt, vt):
    # 3 sequences, lengths off page boundaries, GQA 6/2, the keys split 3 ways + merge
    check(tk, kt, vt, prefix=[0, 12, 36], q_lens=[1, 1, 1], block_n=16, splits=3)


@interpreted
@pytest.mark.parametrize("kt,vt", PAIRS)
def test_prefill_every_pair(tk, kt, vt):
    # several query blocks per sequence (16 slots / group 3 = 5 rows), fp16 compute
    check(tk, kt, vt, prefix=[5, 0, 17], q_lens=[3, 1, 9], dtype=torch.float16, tol=1e-2,
          block_m=16, block_n=16)


BF16_DOT = pytest.mark.skipif(INTERPRETING, reason="triton's interpreter multiplies bf16 dot "
                              "operands as raw uint16 bits (create_dot); checked on a GPU")


@interpreted
@pytest.mark.parametrize("kt,vt", [("q8_0", "q4_0"), ("f16", "f16")])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.float32, 2e-5),
                                       pytest.param(torch.bfloat16, 4e-2, marks=BF16_DOT)])
def test_compute_dtypes(tk, kt, vt, dtype, tol):
    check(tk, kt, vt, prefix=[40, 7], q_lens=[1, 6], dtype=dtype, tol=tol, block_n=16,
          splits=2)


@interpreted
@pytest.mark.parametrize("kt,vt", [("q5_1", "iq4_nl"), ("q8_0", "f16"), ("q4_0", "bf16")])
def test_head_dims_not_a_power_of_two_and_v_dim(tk, kt, vt):
    # d 96 = 3 blocks (padded to 4 in registers), v dim 32, one q head per kv head
    check(tk, kt, vt, prefix=[9, 30], q_lens=[4, 1], block_n=16,
          shape={"hq": 3, "hkv": 3, "d": 96, "dv": 32, "page": 4})


@interpreted
def test_wide_group_and_head_dim_128(tk):
    check(tk, "q4_1", "q5_0", prefix=[21], q_lens=[2], block_n=16,
          shape={"hq": 8, "hkv": 2, "d": 128, "page": 16})


@interpreted
def test_split_count_does_not_change_the_result(tk):
    cache, meta, q = filled_cache("q4_0", "q8_0", [50, 3], [1, 1])
    planes = cache.layer_planes(0)
    one = tk.paged_attention(q, *planes, "q4_0", "q8_0", meta, 0.125, block_n=16, splits=1)
    many = tk.paged_attention(q, *planes, "q4_0", "q8_0", meta, 0.125, block_n=16, splits=4)
    assert (one - many).abs().max() < 1e-6


@interpreted
def test_backend_entry_point_reuses_step_metadata(tk):
    cache, meta, q = filled_cache("q8_0", "q4_0", [11, 2], [1, 4], layers=2)
    out = tk.attention(q.half(), cache, 1, meta, 0.125)
    ref = reference.attention(q.half().float(), cache, 1, meta, 0.125)
    assert out.dtype == torch.float16 and (out.float() - ref).abs().max() < 1e-2
    work = {k: v for k, v in meta.scratch.items() if k[0] == "work"}
    tk.attention(q.half(), cache, 0, meta, 0.125)  # the next layer reuses the work items
    assert work and all(meta.scratch[k] is v for k, v in work.items())


@interpreted
def test_a_window_layer_writes_and_reads_its_own_pages(tk):
    """Layer 1 is on a window, in its own pool: the backend writes and reads it through
    its group's slots and page table (sequences within the window, as ``Attention``
    sends them here)."""
    cache = KVCache(2, 2, 64, 16, page_size=4, cache_type_k="q8_0", cache_type_v="q4_0",
                    device=DEV, windows=[0, 8], window_pages=8)
    z = cache.new_sequence()
    cache.reserve(z, 12)
    cache.reserve(z, 1)  # its first window page goes back: the two pools now differ
    meta = Step.reserve(cache, [cache.new_sequence(), cache.new_sequence()], [5, 3])
    assert not torch.equal(meta.layer_slots(1), meta.slots)
    tk.Backend().prepare(meta)
    n = meta.n_rows
    for layer in range(2):
        tk.write(cache, layer, meta, torch.randn(n, 2, 64, device=DEV),
                 torch.randn(n, 2, 64, device=DEV))
    q = torch.randn(n, 4, 64, device=DEV)
    for layer, window in ((0, 0), (1, 8)):
        ref = reference.attention(q, cache, layer, meta, 0.125, window=window)
        assert (tk.attention(q, cache, layer, meta, 0.125).float() - ref).abs().max() < 2e-5
    cache.check()


# every type once as K and once as V (mixed pairs, fp8 included), as the CPU tests
ONCE = [(t, TYPES[(i + 1) % len(TYPES)]) for i, t in enumerate(TYPES)]


def check_window(tk, kt, vt, prefix, q_lens, window, softcap, tol=2e-5, **kw):
    """paged_attention with a window and soft-capping against reference.attention; scores
    scaled up so that the cap bites."""
    cache, meta, q = filled_cache(kt, vt, prefix, q_lens)
    q = q * 3.0
    ref = reference.attention(q, cache, 0, meta, 0.125, window=window, softcap=softcap)
    out = tk.paged_attention(q, *cache.layer_planes(0), kt, vt, meta, 0.125, window=window,
                             softcap=softcap, **kw)
    err = (out.float() - ref).abs().max().item()
    assert err < tol, f"{kt}/{vt} window {window} softcap {softcap}: max error {err:.2e}"


@interpreted
@pytest.mark.parametrize("kt,vt", ONCE)
def test_window_and_softcap_every_type(tk, kt, vt):
    # decode past the window and within it, keys split 3 ways + merge; prefill chunks
    # crossing the window's edge in several query blocks (5 rows each); a window longer
    # than every sequence
    check_window(tk, kt, vt, [0, 12, 36, 50], [1, 1, 1, 1], 10, 2.0, block_n=16, splits=3)
    check_window(tk, kt, vt, [3, 0, 17], [9, 1, 9], 6, 2.0, block_m=16, block_n=16)
    check_window(tk, kt, vt, [3, 30], [9, 1], 100, 0.0, block_m=16, block_n=16, splits=2)


@interpreted
@pytest.mark.parametrize("window,softcap", [(0, 3.0), (7, 0.0)])
def test_window_or_softcap_alone(tk, window, softcap):
    check_window(tk, "q8_0", "q4_0", [40, 7, 0], [1, 6, 12], window, softcap, block_n=16,
                 splits=2)


@interpreted
def test_a_window_layer_past_its_window_reads_only_live_pages(tk):
    """Sequences past the window, whose first pages went back to the pool (-1 in the
    layer's table): decode steps and chunks read only their windows (split-K too)."""
    window = 9
    cache = KVCache(2, 2, 64, 32, page_size=4, cache_type_k="q4_0", cache_type_v="q8_0",
                    device=DEV, windows=[0, window], window_pages=16)
    seqs = [cache.new_sequence() for _ in range(2)]
    for q_lens in ([20, 3], [1, 14], [1, 1], [5, 1], [1, 1]):
        meta = Step.reserve(cache, seqs, q_lens)
        tk.Backend().prepare(meta)
        n = meta.n_rows
        for layer in range(2):
            tk.write(cache, layer, meta, torch.randn(n, 2, 64, device=DEV),
                     torch.randn(n, 2, 64, device=DEV))
        q = torch.randn(n, 4, 64, device=DEV) * 3.0
        ref = reference.attention(q, cache, 1, meta, 0.125, window=window, softcap=2.0)
        out = tk.attention(q, cache, 1, meta, 0.125, window=window, softcap=2.0)
        assert (out.float() - ref).abs().max() < 2e-5, q_lens
    assert any(p < 0 for s in seqs for p in cache.pages(s, 1))
    cache.check()


# ---------------------------------------------------------------- quantize on write

def rows_with_edge_cases(kind: str, n: int, heads: int, d: int) -> torch.Tensor:
    x = torch.randn(n, heads, d) * torch.logspace(-3, 3, n)[:, None, None]
    flat = x.view(-1, formats.QK)
    flat[0] = 0  # all-zero block: scale 0, inverse 0
    flat[1] = torch.arange(-16, 16) + 0.5  # q8_0 scale 1: codes that are exact halves
    flat[1, 0] = 127
    flat[2, :2] = torch.tensor([-5.0, 5.0])  # a magnitude tie: the first one sets the sign
    flat[3] = torch.randn(32) * 1e-37  # subnormal scale: its inverse overflows
    flat[4] = torch.randn(32) * 3e6  # the f16 scale overflows to inf
    if kind in ("q4_0", "q5_0", "iq4_nl", "q8_0"):
        flat[5] = 0
        flat[5, 0] = -0.0  # signed zero picked as the "largest" value
    return x


@interpreted
@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_quantize_into_is_bit_identical_to_encode(tk, type, dtype):
    cache = KVCache(1, 3, 64, 6, page_size=5, cache_type_k=type, cache_type_v=type)
    seqs = [cache.new_sequence() for _ in range(2)]
    cache.reserve(seqs[0], 7)
    slots = torch.cat([cache.reserve(seqs[1], 9), cache.reserve(seqs[0], 4)])  # out of order
    x = rows_with_edge_cases(type, len(slots), 3, 64)
    x = x.clamp(-6e4, 6e4) if dtype == torch.float16 else x
    x = x.to(dtype)
    if type in ("q4_1", "q5_1"):  # quantize_into's one documented gap: min/max of +-0 mixes
        x = x + 0.0  # -0.0 -> +0.0
    for t in cache.k_planes.values():  # garbage around the written slots must survive
        t.view(torch.uint8).random_(0, 256)
    mine = {k: t[0].clone().to(DEV) for k, t in cache.k_planes.items()}
    cache.write(0, slots, x, x)  # the torch path on the CPU: formats.encode
    tk.quantize_into(mine, slots.to(DEV), x.to(DEV), type, block_r=16)
    for name, t in cache.k_planes.items():
        assert torch.equal(_bytes(mine[name].cpu()), _bytes(t[0])), f"{type} plane {name} differs"


@interpreted
def test_quantize_into_refuses_bad_rows(tk):
    cache = KVCache(1, 2, 32, 2, page_size=4, cache_type_k="q4_0", device=DEV)
    planes = cache.layer_planes(0)[0]
    before = {k: v.clone() for k, v in planes.items()}
    x = torch.randn(3, 2, 32, device=DEV)
    x[1, 0, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tk.quantize_into(planes, torch.tensor([0, 1, 2]), x, "q4_0")
    with pytest.raises(ValueError, match=r"\[n, 2, 32\]"):
        tk.quantize_into(planes, torch.tensor([0]), torch.randn(1, 2, 64, device=DEV), "q4_0")
    assert all(torch.equal(before[k], planes[k]) for k in planes)


# ---------------------------------------------------------------- device selection

@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of a chosen capability, mocked where torch asks the driver."""
    def make(cap=(9, 0), hip=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(torch.version, "hip", hip)
    return make


def test_available_on_supported_gpus(gpu):
    from kvslim.kernels import triton as kt
    gpu((6, 0))
    assert kt.available(torch.device("cuda"), "q8_0", "q4_0") is None
    gpu((9, 0))
    assert all(kt.available(torch.device("cuda:0"), k, "iq4_nl") is None for k in TYPES)


def test_available_reasons(gpu, monkeypatch):
    from kvslim.kernels import triton as kt
    assert "not on cpu" in kt.available(torch.device("cpu"), "q8_0", "q8_0")
    assert "not on mps" in kt.available(torch.device("mps"), "q8_0", "q8_0")
    gpu((5, 2))
    assert kt.available(torch.device("cuda"), "q8_0", "f16") == \
        "GPU sm_52 is older than Pascal (sm_60), triton's minimum"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA or ROCm GPU" in kt.available(torch.device("cuda"), "f16", "f16")
    gpu((9, 0))
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    assert kt.available(torch.device("cuda"), "q8_0", "q8_0").startswith("triton is not installed")


def test_rocm_is_not_held_to_cuda_capabilities(gpu):
    from kvslim.kernels import triton as kt
    gpu((5, 0), hip="6.2.41133")  # torch reports gfx arch numbers as capabilities on ROCm
    assert kt.available(torch.device("cuda"), "q4_0", "q4_0") is None


def test_plan_picks_triton_on_a_supported_gpu(gpu):
    gpu((9, 0))
    plan = plan_attention("cuda", 64, "q8_0", "q4_0", warn=False)
    assert (plan.backend, plan.fused, plan.fell_back) == ("triton", True, False)


def test_plan_on_an_old_gpu_does_not_use_triton(gpu, caplog):
    gpu((5, 2))
    with caplog.at_level(logging.WARNING, logger="kvslim"):
        plan = plan_attention("cuda", 64, "q8_0", "q4_0")
    assert plan.backend != "triton"
    if plan.backend == "reference":  # no tiled path importable: f16 V with one warning
        assert plan.effective_v == "f16" and "older than Pascal" in plan.reason
        assert len(caplog.records) == 1


# ---------------------------------------------------------------- ahead-of-time compile

class _Capture:
    """Stands in for a kernel: records ``kernel[grid](*args, **kw)`` instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel.kernel if isinstance(kernel, _Capture) else kernel  # never nest
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
       torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def compile_call(kernel, args, kw, target):
    """Compile one recorded launch for ``target`` (no GPU needed); returns the kernel."""
    from triton.compiler import ASTSource
    names = kernel.arg_names
    sig, consts = {}, {}
    for name, a in zip(names, args):
        sig[name] = ("*" + _TT[a.dtype] if isinstance(a, torch.Tensor)
                     else "fp32" if isinstance(a, float) else "i32")
    for name, v in kw.items():
        if name in names:
            sig[name], consts[(names.index(name),)] = "constexpr", v
    src = ASTSource(kernel, {n: sig[n] for n in names}, constexprs=consts)
    return triton.compile(src, target=target, options={k: kw[k] for k in _OPTIONS if k in kw})


def record_attention(mod, monkeypatch, kt, vt, dtype, decode, **kw):
    attn, merge = _Capture(mod._attn_kernel), _Capture(mod._merge_kernel)
    monkeypatch.setattr(mod, "_attn_kernel", attn)
    monkeypatch.setattr(mod, "_merge_kernel", merge)
    cache, meta, q = filled_cache(kt, vt, [70, 20], [1, 1] if decode else [9, 30],
                                  hq=8, hkv=2, d=128)
    mod.paged_attention(q.to(dtype), *cache.layer_planes(0), kt, vt, meta, 0.1,
                        splits=4 if decode else 1, **kw)
    return [(attn.kernel, *c) for c in attn.calls] + [(merge.kernel, *c) for c in merge.calls]


def _target(name):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("hip", "gfx942", 64) if name == "gfx942" else \
        GPUTarget("cuda", int(name[3:]), 32)


GPU_CASES = [("sm_90", "decode"), ("sm_90", "prefill"), ("gfx942", "decode"), ("sm_60", "decode"),
             pytest.param("sm_80", "prefill", marks=pytest.mark.slow),
             pytest.param("gfx942", "prefill", marks=pytest.mark.slow)]


@compiled_only
@pytest.mark.parametrize("target,mode", GPU_CASES)
def test_attention_compiles_for_gpus(compiled, monkeypatch, target, mode):
    # decode: fp16, q4_0 K / q8_0 V, split-K + merge; prefill: bf16, q5_1 K / iq4_nl V
    if mode == "decode":
        calls = record_attention(compiled, monkeypatch, "q4_0", "q8_0", torch.float16, True)
    else:
        calls = record_attention(compiled, monkeypatch, "q5_1", "iq4_nl", torch.bfloat16, False)
    assert len(calls) == (2 if mode == "decode" else 1)
    for kernel, args, kw in calls:
        assert compile_call(kernel, args, kw, _target(target)).asm


@compiled_only
def test_window_and_softcap_compile_for_gpus(compiled, monkeypatch):
    calls = record_attention(compiled, monkeypatch, "q8_0", "q4_0", torch.float16, True,
                             window=16, softcap=50.0)
    assert calls[0][2]["SOFTCAP"] is True
    for kernel, args, kw in calls:
        assert compile_call(kernel, args, kw, _target("sm_90")).asm


@compiled_only
@pytest.mark.slow
@pytest.mark.parametrize("kt", TYPES)
def test_attention_compiles_for_every_type(compiled, monkeypatch, kt):
    vt = TYPES[(TYPES.index(kt) + 4) % len(TYPES)]
    for kernel, args, kw in record_attention(compiled, monkeypatch, kt, vt, torch.float16, True):
        assert compile_call(kernel, args, kw, _target("sm_90")).asm


@compiled_only
@pytest.mark.parametrize("type", TYPES)
def test_quantize_kernel_keeps_torch_rounding_on_gpu(compiled, monkeypatch, type):
    # Bit-exactness on a GPU rests on two things the interpreter cannot show: divisions
    # that round correctly (div.rn, not div.full) and no mul+add fused into an FMA.
    quant = _Capture(compiled._quant_kernel)
    monkeypatch.setattr(compiled, "_quant_kernel", quant)
    planes = KVCache(1, 2, 64, 2, page_size=4, cache_type_k=type).layer_planes(0)[0]
    compiled.quantize_into(planes, torch.arange(3), torch.randn(3, 2, 64), type)
    (args, kw), = quant.calls
    assert kw["enable_fp_fusion"] is False
    ptx = compile_call(quant.kernel, args, kw, _target("sm_90")).asm["ptx"]
    assert not re.search(r"\bfma\.", ptx)
    assert set(re.findall(r"\bdiv\.[a-z0-9.]+", ptx)) <= {"div.rn.f32"}
    # Subnormal scales must not flush to zero. libdevice's floor/ceil do flush, which is
    # harmless here: their arguments are >= 0 (floor(+subnormal) = 0) or, for trunc of a
    # negative subnormal, ceil gives -0 either way.
    assert set(re.findall(r"\b[\w.]*\.ftz[\w.]*", ptx)) <= {"cvt.rmi.ftz.f32.f32",
                                                           "cvt.rpi.ftz.f32.f32"}


@compiled_only
@pytest.mark.parametrize("type", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_native_conversions_compile_for_hopper(compiled, monkeypatch, type):
    """On sm_89+ the fp8 kernels convert with the GPU's own instructions (cvt ... e4m3 /
    e5m2; the interpreter runs the float16 route instead): both the write, saturating and
    rounding to nearest even, and the attention read compile to them for sm_90."""
    monkeypatch.setattr(compiled, "native_fp8", lambda device: True)
    quant = _Capture(compiled._quant_kernel)
    monkeypatch.setattr(compiled, "_quant_kernel", quant)
    planes = KVCache(1, 2, 64, 2, page_size=4, cache_type_k=type).layer_planes(0)[0]
    compiled.quantize_into(planes, torch.arange(3), torch.randn(3, 2, 64), type)
    (args, kw), = quant.calls
    assert kw["FP8N"] is True
    ptx = compile_call(quant.kernel, args, kw, _target("sm_90")).asm["ptx"]
    name = "e4m3" if type == "fp8_e4m3" else "e5m2"
    assert re.search(rf"cvt\.rn\.satfinite\.{name}x2\.f32", ptx)
    calls = record_attention(compiled, monkeypatch, type, type, torch.float16, True)
    kernel, args, kw = calls[0]
    assert kw["FP8N"] is True
    ptx = compile_call(kernel, args, kw, _target("sm_90")).asm["ptx"]
    assert re.search(rf"cvt\.rn\.f16x2\.{name}x2", ptx)
