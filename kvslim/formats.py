"""ggml block formats for the K/V cache: quantize, dequantize, sizes.

Every block holds 32 values along the head dimension. Each format is a class in a
registry (``FORMATS``) that turns float32 blocks into *planes* (the fields of a ggml
block, in ggml's field order: ``d``, ``m``, ``qh``, ``qs``) and back. The cache keeps
the planes as separate tensors so kernels can load them aligned; concatenating the
planes of one block gives ggml's bytes exactly (``to_bytes`` / ``from_bytes``).

Quantization reproduces llama.cpp's reference quantizers (``quantize_row_*_ref`` in
ggml-quants.c) and therefore ``gguf.quants.quantize`` byte for byte: same float32
operation order, the same round-half-away-from-zero, ties and argmax conventions.

One corner is not pinned down by the reference itself: when a q4_1/q5_1 block's minimum
is a zero present with both signs, which zero becomes ``m`` depends on reduction order
(C keeps the first, numpy's SIMD min depends on lanes); the decoded values are equal.

Non-finite input (NaN, +-inf) is refused with ``ValueError`` for every type: a K/V
row with NaN means the model already failed, and storing it would poison every later
attention score silently. Finite values too large for a half-precision scale overflow
to an infinite scale exactly as in ggml (f16 caches hold values up to 65504).
"""
from __future__ import annotations

from typing import ClassVar

import torch

QK = 32  # values per block, for every format

__all__ = [
    "QK", "TYPES", "FORMATS", "Format", "get_format", "bytes_per_element", "block_bytes",
    "is_quantized", "is_fp8", "quantize", "dequantize", "encode", "decode", "to_bytes", "from_bytes",
    "as_blocks", "pack_nibbles", "pack_high_bits",
]

# (field name, dtype, elements per block), in ggml's field order.
Plane = tuple[str, torch.dtype, int]


class Format:
    """One block format. Subclasses define ``planes`` and the two block transforms."""

    name: ClassVar[str]
    # The format's identity in every kernel (numba and Triton branch on it): fixed per
    # format, never derived from the registry's order, never reused.
    code: ClassVar[int]
    planes: ClassVar[tuple[Plane, ...]]
    quantized: ClassVar[bool] = True
    registry: ClassVar[dict[str, "Format"]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__name__.startswith("_"):  # a family's shared base, not a format
            return
        taken = {f.code: f.name for f in Format.registry.values()}
        if cls.code in taken:
            raise ValueError(f"format {cls.name} reuses code {cls.code} of {taken[cls.code]}")
        Format.registry[cls.name] = cls()

    @property
    def block_bytes(self) -> int:
        return sum(torch.empty((), dtype=dt).element_size() * n for _, dt, n in self.planes)

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / QK

    # blocks: [N, 32] float32 -> {plane: [N, n]}
    def encode_blocks(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # {plane: [N, n]} -> [N, 32] float32
    def decode_blocks(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.block_bytes} B / {QK} values>"


# ---------------------------------------------------------------- float types

class F32(Format):
    name = "f32"
    code = 0
    planes = (("x", torch.float32, QK),)
    quantized = False

    def encode_blocks(self, blocks):
        return {"x": blocks.clone()}

    def decode_blocks(self, p):
        return p["x"].float()


class F16(Format):
    name = "f16"
    code = 1
    planes = (("x", torch.float16, QK),)
    quantized = False

    def encode_blocks(self, blocks):
        return {"x": blocks.to(torch.float16)}  # round to nearest even, as numpy/F16C

    def decode_blocks(self, p):
        return p["x"].float()


class BF16(Format):
    name = "bf16"
    code = 2
    planes = (("x", torch.bfloat16, QK),)
    quantized = False

    def encode_blocks(self, blocks):
        # ggml_compute_fp32_to_bf16: quiet NaNs, then round to nearest even on the bits.
        n = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        return {"x": (n & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)}

    def decode_blocks(self, p):
        return p["x"].float()


# ---------------------------------------------------------------- helpers

def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), exactly as gguf's ``np_roundf``."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` without dividing by zero."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / safe)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude, first one on ties (ggml's loop keeps the first)."""
    idx = blocks.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(blocks, -1, idx)  # [N, 1]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, 32] uint8 in 0..15 -> [N, 16]: value j in the low nibble, j+16 in the high."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, 16] uint8 -> [N, 32] uint8 in 0..15."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


_BIT = torch.arange(8, dtype=torch.uint8)


def pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 values -> 4 bytes, little-endian bit order (ggml's ``qh``)."""
    bits = ((q >> 4) & 1).view(-1, 4, 8)  # [N, 4, 8]
    return (bits << _BIT.to(q.device)).sum(dim=-1, dtype=torch.uint8)  # [N, 4]


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[N, 4] uint8 -> [N, 32] uint8 holding 0 or 16."""
    bits = (qh.unsqueeze(-1) >> _BIT.to(qh.device)) & 1  # [N, 4, 8]
    return bits.reshape(qh.shape[0], QK) << 4


def _code(t: torch.Tensor, hi: int, dtype=torch.uint8) -> torch.Tensor:
    """Float codes -> integers as the C reference does on x86: ``MIN(hi, (int8_t)t)``.

    A non-finite code (a subnormal scale whose inverse overflowed) converts to INT_MIN
    there, whose low byte is 0; in range codes are clamped to ``hi``.
    """
    return torch.where(torch.isfinite(t), t.clamp(max=hi), 0).to(dtype)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


# ---------------------------------------------------------------- block types

class Q8_0(Format):
    name = "q8_0"
    code = 3
    planes = (("d", torch.float16, 1), ("qs", torch.int8, QK))

    def encode_blocks(self, blocks):
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        qs = _code(_roundf(blocks * _inv(d)), 127, torch.int8)
        return {"d": _f16(d), "qs": qs}

    def decode_blocks(self, p):
        return p["qs"].float() * p["d"].float()


class Q4_0(Format):
    name = "q4_0"
    code = 4
    planes = (("d", torch.float16, 1), ("qs", torch.uint8, QK // 2))

    def encode_blocks(self, blocks):
        d = _signed_absmax(blocks) / -8
        q = _code(torch.trunc(blocks * _inv(d) + 8.5), 15)
        return {"d": _f16(d), "qs": pack_nibbles(q)}

    def decode_blocks(self, p):
        q = _unpack_nibbles(p["qs"]).to(torch.int8) - 8
        return p["d"].float() * q.float()


class Q4_1(Format):
    name = "q4_1"
    code = 5
    planes = (("d", torch.float16, 1), ("m", torch.float16, 1), ("qs", torch.uint8, QK // 2))

    def encode_blocks(self, blocks):
        mx = blocks.amax(dim=-1, keepdim=True)
        mn = blocks.amin(dim=-1, keepdim=True)
        d = (mx - mn) / 15
        q = _code(torch.trunc((blocks - mn) * _inv(d) + 0.5), 15)
        return {"d": _f16(d), "m": _f16(mn), "qs": pack_nibbles(q)}

    def decode_blocks(self, p):
        q = _unpack_nibbles(p["qs"]).float()
        return p["d"].float() * q + p["m"].float()


class Q5_0(Format):
    name = "q5_0"
    code = 6
    planes = (("d", torch.float16, 1), ("qh", torch.uint8, 4), ("qs", torch.uint8, QK // 2))

    def encode_blocks(self, blocks):
        d = _signed_absmax(blocks) / -16
        q = _code(torch.trunc(blocks * _inv(d) + 16.5), 31)
        return {"d": _f16(d), "qh": pack_high_bits(q), "qs": pack_nibbles(q)}

    def decode_blocks(self, p):
        q = (_unpack_nibbles(p["qs"]) | _unpack_high_bits(p["qh"])).to(torch.int8) - 16
        return p["d"].float() * q.float()


class Q5_1(Format):
    name = "q5_1"
    code = 7
    planes = (("d", torch.float16, 1), ("m", torch.float16, 1), ("qh", torch.uint8, 4),
              ("qs", torch.uint8, QK // 2))

    def encode_blocks(self, blocks):
        mx = blocks.amax(dim=-1, keepdim=True)
        mn = blocks.amin(dim=-1, keepdim=True)
        d = (mx - mn) / 31
        q = _code(torch.trunc((blocks - mn) * _inv(d) + 0.5), 31)
        return {"d": _f16(d), "m": _f16(mn), "qh": pack_high_bits(q), "qs": pack_nibbles(q)}

    def decode_blocks(self, p):
        q = (_unpack_nibbles(p["qs"]) | _unpack_high_bits(p["qh"])).float()
        return p["d"].float() * q + p["m"].float()


IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class IQ4_NL(Format):
    """4-bit non-linear codebook with a least-squares block scale.

    Follows ``quantize_row_iq4_nl_ref`` (ntry = -1, weights x^2): pick codes with the
    scale max/-127, then store the weighted least-squares scale for those codes. The
    sums run sequentially over the 32 values as the C loop does, without FMA
    contraction (a build of ggml that contracts ``w*q*x`` into an FMA can differ in
    the last bit of ``d``).
    """

    name = "iq4_nl"
    code = 8
    planes = (("d", torch.float16, 1), ("qs", torch.uint8, QK // 2))
    _values = torch.tensor(IQ4NL_VALUES, dtype=torch.float32)
    # midpoints doubled: code j is chosen once 2x >= values[j-1] + values[j]
    _mid2 = torch.tensor([IQ4NL_VALUES[j - 1] + IQ4NL_VALUES[j] for j in range(1, 16)],
                         dtype=torch.float32)

    def _best_index(self, al: torch.Tensor) -> torch.Tensor:
        """Branchless binary search of ggml's ``best_index_int8`` (n = 16)."""
        x2 = al + al
        mid2 = self._mid2.to(al.device)
        idx = torch.zeros_like(al, dtype=torch.int64)
        for step in (8, 4, 2, 1):
            j = idx + step
            idx = torch.where(x2 >= mid2[j - 1], j, idx)
        return idx

    def encode_blocks(self, blocks):
        mx = _signed_absmax(blocks)  # [N, 1]
        tiny = mx.abs() < 1e-15
        d0 = torch.where(tiny, torch.ones_like(mx), mx / -127.0)
        L = self._best_index((1.0 / d0) * blocks)  # [N, 32]
        L = torch.where(tiny, torch.zeros_like(L), L)
        q = self._values.to(blocks.device)[L]
        w = blocks * blocks
        wq = w * q
        sumqx = torch.zeros_like(mx[:, 0])
        sumq2 = torch.zeros_like(mx[:, 0])
        for j in range(QK):  # sequential, as the C loop (float addition is not associative)
            sumqx = sumqx + wq[:, j] * blocks[:, j]
            sumq2 = sumq2 + wq[:, j] * q[:, j]
        pos = sumq2 > 0
        d = torch.where(pos, sumqx / torch.where(pos, sumq2, torch.ones_like(sumq2)), 0.0)
        d = torch.where(tiny[:, 0], 0.0, d)
        return {"d": _f16(d[:, None]), "qs": pack_nibbles(L.to(torch.uint8))}

    def decode_blocks(self, p):
        q = self._values.to(p["qs"].device)[_unpack_nibbles(p["qs"]).long()]
        return p["d"].float() * q


# ---------------------------------------------------------------- fp8 types

class _FP8(Format):
    """One byte per value, no block scale: vLLM's fp8 K/V cache.

    The byte is the value in the float8 format itself (torch's ``float8_e4m3fn`` /
    ``float8_e5m2`` bits), rounded to nearest even; values beyond the largest finite one
    saturate to it (torch's e4m3fn conversion saturates by itself, its e5m2 one would
    give inf). Like vLLM, the scale lives outside the block: a float32 per (layer, kv
    head), measured by the calibration pass, divides the coded rows before they are
    stored (``codec.KVCodec``). ``encode`` here stores the values as given (scale 1).
    The 32-value "block" only keeps rows whole blocks, as the other types.
    """

    planes = (("qs", torch.uint8, QK),)
    dtype: ClassVar[torch.dtype]
    max: ClassVar[float]  # largest finite value

    def encode_blocks(self, blocks):
        q = blocks.clamp(-self.max, self.max).to(self.dtype)
        return {"qs": q.view(torch.uint8)}

    def decode_blocks(self, p):
        return p["qs"].contiguous().view(self.dtype).float()


class FP8_E4M3(_FP8):
    """4 exponent bits (bias 7), 3 mantissa bits: finite up to 448, no inf."""

    name = "fp8_e4m3"
    code = 9
    dtype = torch.float8_e4m3fn
    max = 448.0


class FP8_E5M2(_FP8):
    """5 exponent bits (bias 15), 2 mantissa bits: the top byte of a float16."""

    name = "fp8_e5m2"
    code = 10
    dtype = torch.float8_e5m2
    max = 57344.0


FORMATS: dict[str, Format] = Format.registry
TYPES: tuple[str, ...] = tuple(FORMATS)

# ---------------------------------------------------------------- public API


def get_format(type: str) -> Format:
    """The format called ``type``; ValueError listing the valid names otherwise."""
    fmt = FORMATS.get(type.lower() if isinstance(type, str) else type)
    if fmt is None:
        raise ValueError(f"unknown cache type {type!r}; valid types: {', '.join(TYPES)}")
    return fmt


def bytes_per_element(type: str) -> float:
    """Exact bytes per stored value, block scales included (q8_0 = 34/32)."""
    return get_format(type).bytes_per_element


def block_bytes(type: str) -> int:
    """Bytes of one 32-value block."""
    return get_format(type).block_bytes


def is_quantized(type: str) -> bool:
    """True for block types with a scale (q8_0 ...) and fp8, False for f32/f16/bf16."""
    return get_format(type).quantized


def is_fp8(type: str) -> bool:
    """True for the fp8 types, whose scale is per (layer, kv head) in the codec."""
    return isinstance(get_format(type), _FP8)


_FLOAT_IN = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_blocks(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_IN:
        raise ValueError(f"cannot quantize dtype {x.dtype}: expected a floating tensor "
                         f"(float32, float16, bfloat16 or float64)")
    if x.dim() == 0 or x.shape[-1] % QK:
        n = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"last dimension must be a multiple of {QK} (block size), got {n}")
    x = x.to(torch.float32)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"input holds {int(bad.sum())} non-finite values (NaN or inf); "
                         "the K/V cache refuses them")
    return x.reshape(-1, QK)


def encode(x: torch.Tensor, type: str) -> dict[str, torch.Tensor]:
    """[..., n] float -> planes {name: [..., n/32, per_block]} in the cache's layout."""
    fmt = get_format(type)
    lead = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
    planes = fmt.encode_blocks(as_blocks(x))
    nb = x.shape[-1] // QK
    return {k: v.reshape(*lead, nb, v.shape[-1]) for k, v in planes.items()}


def decode(planes: dict[str, torch.Tensor], type: str) -> torch.Tensor:
    """planes {name: [..., nb, per_block]} -> [..., nb*32] float32."""
    fmt = get_format(type)
    first = planes[fmt.planes[0][0]]
    lead, nb = first.shape[:-2], first.shape[-2]
    flat = {name: planes[name].reshape(-1, n) for name, _, n in fmt.planes}
    return fmt.decode_blocks(flat).reshape(*lead, nb * QK)


def to_bytes(planes: dict[str, torch.Tensor], type: str) -> torch.Tensor:
    """planes -> [..., nb*block_bytes] uint8 in ggml's block layout."""
    fmt = get_format(type)
    parts = [planes[name].contiguous().view(torch.uint8) for name, _, _ in fmt.planes]
    b = torch.cat(parts, dim=-1)  # [..., nb, block_bytes]
    return b.reshape(*b.shape[:-2], -1)


def from_bytes(data: torch.Tensor, type: str) -> dict[str, torch.Tensor]:
    """[..., nb*block_bytes] uint8 in ggml's layout -> planes."""
    fmt = get_format(type)
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"ggml blocks must be a uint8 tensor, got {got}")
    bs = fmt.block_bytes
    if data.dim() == 0 or data.shape[-1] % bs:
        raise ValueError(f"last dimension must be a multiple of {bs} bytes ({fmt.name} block), "
                         f"got {data.shape[-1] if data.dim() else 'a scalar'}")
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // bs, bs)
    out, off = {}, 0
    for name, dt, n in fmt.planes:
        size = torch.empty((), dtype=dt).element_size() * n
        out[name] = blocks[..., off:off + size].contiguous().view(dt)
        off += size
    return out


def quantize(x: torch.Tensor, type: str) -> torch.Tensor:
    """[..., n] float -> [..., n/32 * block_bytes] uint8, ggml's bytes (raw for f32/f16/bf16)."""
    return to_bytes(encode(x, type), type)


def dequantize(q: torch.Tensor, type: str) -> torch.Tensor:
    """[..., nb*block_bytes] uint8 in ggml's layout -> [..., nb*32] float32."""
    return decode(from_bytes(q, type), type)
