"""Block formats: byte-exact against gguf's reference quantizers, bounded round trips."""
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kvslim import formats as F

GGUF_TYPES = {"f16": GT.F16, "bf16": GT.BF16, "q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1,
              "q5_0": GT.Q5_0, "q5_1": GT.Q5_1}
BLOCK_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]


def gguf_bytes(x: torch.Tensor, t: str) -> np.ndarray:
    ref = gq.quantize(x.numpy(), GGUF_TYPES[t])
    return ref.view(np.uint8).reshape(*x.shape[:-1], -1)


def assert_byte_exact(x: torch.Tensor, t: str):
    ours = F.quantize(x, t).numpy()
    ref = gguf_bytes(x, t)
    assert ours.shape == ref.shape
    diff = np.nonzero(ours != ref)
    assert ours.tobytes() == ref.tobytes(), f"{t}: {len(diff[0])} bytes differ, first at {diff}"


def named_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        "random": torch.randn(37, 128, generator=g),
        "zeros": torch.zeros(3, 64),
        "constant": torch.full((3, 64), -2.75),
        "huge": torch.randn(5, 64, generator=g) * 1e30,
        "tiny": torch.randn(5, 64, generator=g) * 1e-30,
        "subnormal": torch.randn(5, 64, generator=g) * 1e-41,
        "mixed_sign_scales": torch.randn(6, 96, generator=g) * torch.tensor([1e-3, -1e3]).repeat(48),
        "ties": torch.randint(-16, 17, (9, 64), generator=g).float() / 4,
        "one_hot": torch.eye(64)[:7] * 5,
    }


@pytest.mark.parametrize("t", list(GGUF_TYPES))
@pytest.mark.parametrize("case", list(named_inputs(0)))
def test_byte_exact_named_inputs(t, case):
    x = named_inputs(1234)[case]
    with np.errstate(all="ignore"):
        assert_byte_exact(x, t)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])), elements=finite32),
       st.sampled_from(list(GGUF_TYPES)))
def test_byte_exact_property(arr, t):
    # -0.0 + 0.0 = +0.0: when a block's min or max is a zero present with both signs, the
    # sign numpy's vectorized min/max keeps depends on SIMD lane order (C keeps the first
    # seen), so only that sign bit of q4_1/q5_1's m may differ; decoded values are equal.
    arr = arr + np.float32(0.0)
    with np.errstate(all="ignore"):
        assert_byte_exact(torch.from_numpy(arr), t)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (3, 64), elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(list(GGUF_TYPES) + ["iq4_nl"]))
def test_dequantize_matches_gguf(arr, t):
    q = F.quantize(torch.from_numpy(arr.copy()), t)
    qt = GGUF_TYPES.get(t, GT.IQ4_NL)
    ours = F.dequantize(q, t).numpy()
    ref = gq.dequantize(q.numpy(), qt).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref)


# --- iq4_nl: an independent scalar transcription of quantize_row_iq4_nl_ref (ntry = -1)

def iq4_nl_scalar(block: np.ndarray) -> bytes:
    f32 = np.float32
    vals = F.IQ4NL_VALUES
    amax, mx = f32(0), f32(0)
    for v in block:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f32(1e-15):
        return np.float16(0).tobytes() + bytes(16)
    d = f32(mx / f32(vals[0]))
    idd = f32(f32(1) / d)
    sumqx = sumq2 = f32(0)
    L = []
    for x in block:
        al = f32(idd * x)
        x2 = f32(al + al)
        idx, step = 0, 8
        while step:
            if x2 >= f32(vals[idx + step - 1] + vals[idx + step]):
                idx += step
            step //= 2
        L.append(idx)
        q, w = f32(vals[idx]), f32(x * x)
        sumqx = f32(sumqx + f32(f32(w * q) * x))
        sumq2 = f32(sumq2 + f32(f32(w * q) * q))
    d = f32(sumqx / sumq2) if sumq2 > 0 else f32(0)
    qs = bytes(L[j] | (L[j + 16] << 4) for j in range(16))
    return np.float16(d).tobytes() + qs


@pytest.mark.parametrize("case", ["random", "zeros", "constant", "ties", "one_hot", "mixed_sign_scales"])
def test_iq4_nl_matches_scalar_reference(case):
    x = named_inputs(7)[case]
    ours = F.quantize(x, "iq4_nl").numpy().reshape(-1, 18)
    blocks = x.numpy().reshape(-1, 32)
    with np.errstate(all="ignore"):
        ref = [iq4_nl_scalar(b) for b in blocks]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.tobytes() == b, f"block {i} differs"


# --- round trips

# max error per block relative to the block's largest magnitude: half a step plus the f16
# scale's rounding; q4_0/q5_0 codes run -8..7 / -16..15 with the largest magnitude at the
# -8 / -16 end, so the opposite extreme clips by a whole step.
REL_BOUND = {"f32": 0.0, "f16": 2**-11, "bf16": 2**-8, "q8_0": 0.5 / 127 + 1e-3,
             "q4_0": 1 / 8 + 1e-3, "q4_1": 0.5 / 15 * 2 + 2e-3, "q5_0": 1 / 16 + 1e-3,
             "q5_1": 0.5 / 31 * 2 + 2e-3,
             # iq4_nl: half its widest code gap (24/127) plus the least-squares scale moving
             # the block's largest value off its code; 0.141 seen over 80,000 gaussian blocks
             "iq4_nl": 0.2}


@pytest.mark.parametrize("t", [t for t in F.TYPES if not F.is_fp8(t)])  # fp8: test_fp8.py
def test_round_trip_error_bound(t):
    seed = torch.seed()
    # rows scaled 0.05..10: a block's f16 scale stays a normal number (a block whose
    # largest value is under ~0.008 has a subnormal q8_0 scale, rounded to 2**-24: a
    # seed with a row scale of 3.8e-4 measured 0.0098 relative error, as ggml's own)
    x = torch.randn(200, 128) * (torch.rand(200, 1) * 9.95 + 0.05)
    r = F.dequantize(F.quantize(x, t), t)
    xb, rb = x.reshape(-1, 32), r.reshape(-1, 32)
    scale = xb.abs().amax(dim=1, keepdim=True)
    if t in ("q4_1", "q5_1"):
        scale = (xb.amax(1, keepdim=True) - xb.amin(1, keepdim=True)) / 2
    err = ((rb - xb).abs() / scale.clamp_min(1e-30)).max().item()
    assert err <= REL_BOUND[t], f"seed {seed}: {t} relative error {err} > {REL_BOUND[t]}"


@pytest.mark.parametrize("t", F.TYPES)
def test_zero_and_constant_blocks(t):
    z = torch.zeros(2, 64)
    assert torch.equal(F.dequantize(F.quantize(z, t), t), z)
    c = torch.full((2, 64), 1.5)
    assert torch.allclose(F.dequantize(F.quantize(c, t), t), c, rtol=0.02)


def test_bytes_per_element_table():
    expected = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32, "fp8_e4m3": 1,
                "fp8_e5m2": 1}
    assert set(F.TYPES) == set(expected)
    for t, bpe in expected.items():
        assert F.bytes_per_element(t) == bpe
        assert F.block_bytes(t) == bpe * 32
        assert F.quantize(torch.zeros(5, 64), t).shape == (5, 2 * F.block_bytes(t))
    for t, g in GGUF_TYPES.items():
        bs, ts = gq.GGML_QUANT_SIZES[g]
        assert F.bytes_per_element(t) == ts / bs


def test_planes_round_trip_through_bytes():
    x = torch.randn(4, 3, 64)
    for t in F.TYPES:
        planes = F.encode(x, t)
        b = F.to_bytes(planes, t)
        back = F.from_bytes(b, t)
        assert all(torch.equal(back[k], planes[k]) for k in planes)
        assert b.shape == (4, 3, 2 * F.block_bytes(t))
        assert sum(p.numel() * p.element_size() for p in planes.values()) == b.numel()


# --- bad input

def test_unknown_type_lists_valid_ones():
    with pytest.raises(ValueError, match="q4_0.*q8_0|q8_0.*q4_0"):
        F.quantize(torch.zeros(32), "q3_x")
    with pytest.raises(ValueError, match="unknown cache type"):
        F.bytes_per_element("int4")


@pytest.mark.parametrize("n", [1, 31, 33, 100])
def test_last_dim_not_multiple_of_32(n):
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize(torch.zeros(2, n), "q8_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        F.quantize(torch.tensor(1.0), "q8_0")


def test_wrong_dtype():
    with pytest.raises(ValueError, match="dtype"):
        F.quantize(torch.zeros(2, 32, dtype=torch.int32), "q8_0")
    with pytest.raises(ValueError, match="uint8"):
        F.dequantize(torch.zeros(2, 34, dtype=torch.int8), "q8_0")
    with pytest.raises(ValueError, match="multiple of 34"):
        F.dequantize(torch.zeros(2, 35, dtype=torch.uint8), "q8_0")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("t", F.TYPES)
def test_non_finite_is_refused(bad, t):
    x = torch.randn(2, 64)
    x[1, 40] = bad
    with pytest.raises(ValueError, match="non-finite"):
        F.quantize(x, t)


def test_other_float_dtypes_are_converted():
    x = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(F.quantize(x, "q8_0"), F.quantize(x.float(), "q8_0"))
    h = torch.randn(3, 64).half()
    assert torch.equal(F.quantize(h, "q4_0"), F.quantize(h.float(), "q4_0"))
