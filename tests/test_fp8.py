"""fp8 K/V types: the torch format (formats.FP8_*), the numba conversions (kernels.ggml)
bit for bit against torch's own float8_e4m3fn / float8_e5m2 conversions on fresh random
inputs and every edge value, and the numba writer's bytes against formats.encode."""
import random

import numpy as np
import pytest
import torch
from numba import njit

from kvslim import formats as F
from kvslim.kernels import ggml

FP8 = {"fp8_e4m3": (ggml.E4M3, torch.float8_e4m3fn), "fp8_e5m2": (ggml.E5M2, torch.float8_e5m2)}


@njit(cache=True)
def _encode(x, code, out):
    for i in range(x.shape[0]):
        out[i] = ggml.fp8_from_float(x[i], code)


@njit(cache=True)
def _decode(b, code, out):
    for i in range(b.shape[0]):
        out[i] = ggml.fp8_to_float(b[i], code)


def _edges(dt: torch.dtype) -> torch.Tensor:
    """Every finite value of the format, the midpoints between neighbours (ties) and the
    floats just either side of them, zeros, infinities, NaNs, float32 subnormals and
    values past the largest finite one."""
    vals = torch.arange(256, dtype=torch.uint8).view(dt).float()
    s = vals[torch.isfinite(vals)].unique().sort().values
    mid = (s[1:] + s[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    inf, nan = float("inf"), float("nan")
    extra = torch.tensor([0.0, -0.0, inf, -inf, nan, -nan, 1e-45, -1e-45, 1e-40, 448.0, 464.0,
                          470.0, 480.0, 500.0, 57344.0, 61440.0, 61439.996, 65536.0, 1e30, -1e30])
    return torch.cat([s, mid, torch.nextafter(mid, up), torch.nextafter(mid, down), extra])


@pytest.mark.parametrize("t", list(FP8))
def test_numba_encode_is_torchs_conversion(t):
    code, dt = FP8[t]
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50_000, generator=g) * torch.exp(torch.randn(50_000, generator=g) * 8)
    x = torch.cat([x, _edges(dt)]).float()
    out = np.empty(x.shape[0], np.uint8)
    _encode(x.numpy(), code, out)
    ref = x.to(dt).view(torch.uint8).numpy()
    bad = np.nonzero(out != ref)[0]
    assert bad.size == 0, (f"seed {seed}: {t} differs from torch at {x[bad[:5]].tolist()}: "
                           f"{out[bad[:5]]} vs {ref[bad[:5]]}")


@pytest.mark.parametrize("t", list(FP8))
def test_numba_decode_is_torchs_conversion(t):
    code, dt = FP8[t]
    b = np.arange(256, dtype=np.uint8)
    out = np.empty(256, np.float32)
    _decode(b, code, out)
    ref = torch.from_numpy(b).view(dt).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # -0 too
    # the f16 route the vector microkernels take gives the same values off the NaN codes
    h = np.array([ggml_half(v, code) for v in b], np.float32)
    assert np.array_equal(h[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@njit(cache=True)
def _via_half(b, code):
    h, mul = ggml.fp8_to_half(b, code)
    return ggml.half_to_float(h) * mul


def ggml_half(b, code):
    return _via_half(np.uint8(b), code)


@pytest.mark.parametrize("t", list(FP8))
def test_format_saturates_and_rounds_as_torch(t):
    """formats.encode: torch's conversion of the value clamped to the largest finite one
    (e5m2 alone would overflow to inf); 1 byte per value, no scale."""
    _, dt = FP8[t]
    fmt = F.get_format(t)
    x = torch.cat([torch.randn(4000) * 1e3, torch.tensor([1e6, -1e6, 70000.0, -500.0])])
    x = x[: x.shape[0] // 32 * 32]
    q = F.quantize(x, t)
    assert q.dtype == torch.uint8 and q.shape == x.shape and fmt.block_bytes == 32
    want = x.clamp(-fmt.max, fmt.max).to(dt).view(torch.uint8)
    assert torch.equal(q, want)
    back = F.dequantize(q, t)
    assert torch.isfinite(back).all() and back.abs().max() <= fmt.max


@pytest.mark.parametrize("t,rel,tiny", [("fp8_e4m3", 2**-4, 2**-10), ("fp8_e5m2", 2**-3, 2**-17)])
def test_round_trip_error_bound(t, rel, tiny):
    """Half an ulp: 2^-4 (e4m3) / 2^-3 (e5m2) relative in the normal range, half the
    subnormal step absolute below it."""
    seed = torch.seed()
    x = torch.randn(200, 128) * torch.exp(torch.randn(200, 1) * 3)
    x = x.clamp(-F.get_format(t).max, F.get_format(t).max)
    r = F.dequantize(F.quantize(x, t), t)
    bound = torch.maximum(x.abs() * rel, torch.full_like(x, tiny))
    assert ((r - x).abs() <= bound).all(), f"seed {seed}"


@pytest.mark.parametrize("t", list(FP8))
def test_numba_block_writer_matches_format(t):
    """ggml.encode_block (the CPU writer's) gives formats.encode's bytes, saturation too."""
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 6)
    x[0, :4] = torch.tensor([1e6, -1e6, 0.0, -0.0])
    planes = F.encode(x, t)
    p = ggml.tiny_planes(t, 64)
    codes = np.empty(32, np.int32)
    xs = x.numpy()
    for b in range(64):
        _enc_block(p, xs[b], b, codes)
    got = p.qs.view(np.uint8)[:64 * 32].reshape(64, 32)
    assert np.array_equal(got, planes["qs"].reshape(64, 32).numpy()), f"seed {seed}"


@njit(cache=True)
def _enc_block(p, x, blk, codes):
    ggml.encode_block(p, x, blk, codes)
