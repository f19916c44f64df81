"""Read GGUF files: open with clear errors, model config from metadata, weights.

GGUF stores tensor shapes in ggml order (`ne`, fastest-varying dimension first);
the `gguf` reader's numpy data is already row-major in the reversed order, so a
weight matrix with ne = [in, out] comes out as [out, in], which is nn.Linear's
layout. Everything here reads the file through `gguf.GGUFReader`, which memory-maps
it: opening a 70B file costs only its metadata.
"""
from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import torch
from tqdm import tqdm

from kvslim import formats
from kvslim.architectures import ARCHITECTURES
from kvslim.kernels.qtypes import CODES as KERNEL_TYPES  # the types read in place

SUPPORTED_ARCHS = tuple(ARCHITECTURES)

GGUF_MAGIC = b"GGUF"
_REQUIRED = object()


class GGUFError(ValueError):
    """A GGUF file that is missing, corrupt, or describes a model kvslim cannot run."""


# ---------------------------------------------------------------------------
# Opening a file


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open a GGUF file, turning every way it can be unreadable into a GGUFError."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror})") from e
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = _Reader(path)
    # A cut or damaged header makes the reader fail in many ways (short reads give
    # IndexError, bad enums ValueError, garbage lengths MemoryError...): all of them
    # mean the same thing to the user.
    except Exception as e:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    _check_tensor_extents(reader, path)
    return reader


class _Reader(gguf.GGUFReader):
    """gguf's reader, parsing the header from a plain ndarray view of its memory map.

    ``GGUFReader`` slices its ``np.memmap`` once per header item; every slice of a memmap
    is a new memmap object (``__array_finalize__``), and a 49k-token vocabulary has about
    a million such items: SmolLM2's header took 1.6-2.0 s to parse, most of a model load.
    Slicing an ndarray view of the same map gives the same zero-copy arrays in 0.5 s.
    Only ``_get`` (the reader's one slicing primitive) differs, with gguf's own logic; a
    test checks that fields and tensors equal ``gguf.GGUFReader``'s.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        """gguf's parts for an array of scalars or strings, made on access (`_ArrayParts`).

        gguf parses an array element by element (an enum, a dtype and two views each): a
        262k-token vocabulary (Gemma 3) took about 18 s. Here a scalar array is one read
        and a string array one walk over its lengths; nested arrays keep gguf's parsing.
        The indices of the values (``ReaderField.data``) are a ``range``, not a list of
        ints: lists held 7 MB for a 49k-token vocabulary's four arrays.
        """
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = gguf.GGUFValueType(raw_itype[0])
        n, offs = int(alen[0]), orig_offs + 12
        plain = self.data.view(np.ndarray)
        if itype == gguf.GGUFValueType.STRING:
            parts = _ArrayParts([raw_itype, alen], plain, self.byte_order,
                                starts=_string_starts(plain, offs, n, self.byte_order))
            data = range(3, len(parts), 2)  # the bytes after each length
        elif itype in self.gguf_scalar_to_np:
            bulk = self._get(offs, self.gguf_scalar_to_np[itype], n)
            if len(bulk) != n:
                raise ValueError(f"array of {n} items runs past the end of the file")
            parts = _ArrayParts([raw_itype, alen], plain, self.byte_order, bulk=bulk)
            data = range(2, len(parts))
        else:
            return super()._get_field_parts(orig_offs, raw_type)
        types = [gguf.GGUFValueType.ARRAY] + ([itype] if n else [])
        return 12 + parts.nbytes, parts, data, types

    def _build_fields(self, offs, count):
        # gguf's loop, except that it keeps an _ArrayParts lazy (gguf's `list += parts`
        # would make every part)
        for _ in range(int(count)):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            size, parts, idxs, types = self._get_field_parts(offs, raw_kv_type[0])
            key = [kv_klen, kv_kdata, raw_kv_type]
            parts = parts.prefixed(key) if isinstance(parts, _ArrayParts) else key + parts
            self._push_field(gguf.ReaderField(orig_offs, str(bytes(kv_kdata), encoding="utf-8"), parts,
                                              _shifted(idxs, len(key)), types), skip_sum=True)
            offs += size
        return offs


def _shifted(idxs: range | list[int], by: int) -> range | list[int]:
    if isinstance(idxs, range):
        return range(idxs.start + by, idxs.stop + by, idxs.step)
    return [i + by for i in idxs]


def _string_starts(plain: np.ndarray, offs: int, n: int, byte_order: str) -> np.ndarray:
    """Offsets of n consecutive GGUF strings (u64 length + bytes) from offs, and the end."""
    order = "little" if (sys.byteorder == "little") == (byte_order == "I") else "big"
    raw, end = memoryview(plain), len(plain)
    starts = np.empty(n + 1, dtype=np.int64)
    for i in range(n):
        if offs + 8 > end:
            raise ValueError("string array runs past the end of the file")
        starts[i] = offs
        offs += 8 + int.from_bytes(raw[offs:offs + 8], order)
    if offs > end:
        raise ValueError("string array runs past the end of the file")
    starts[n] = offs
    return starts


class _ArrayParts(Sequence):
    """``ReaderField.parts`` of one array field, each part made when it is read.

    The same parts as gguf's (two head arrays, then a one-element view per scalar or a
    [u64 length, uint8 bytes] pair per string), without a million views up front.
    `array_values` reads the whole array in bulk.
    """

    def __init__(self, head, plain, byte_order, *, bulk=None, starts=None):
        self.head, self.plain, self.bulk, self.starts = head, plain, bulk, starts
        self.byte_order = byte_order
        self.u64 = np.dtype(np.uint64).newbyteorder(byte_order)
        n_items = len(bulk) if bulk is not None else 2 * (len(starts) - 1)
        self.n = len(head) + n_items
        self.nbytes = int(bulk.nbytes) if bulk is not None else int(starts[-1] - starts[0])

    def prefixed(self, parts: list) -> "_ArrayParts":
        return _ArrayParts(parts + self.head, self.plain, self.byte_order, bulk=self.bulk, starts=self.starts)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = i + self.n if i < 0 else i
        if not 0 <= i < self.n:
            raise IndexError(i)
        h = len(self.head)
        if i < h:
            return self.head[i]
        if self.bulk is not None:
            return self.bulk[i - h:i - h + 1]
        k, is_text = divmod(i - h, 2)
        start, stop = int(self.starts[k]), int(self.starts[k + 1])
        return self.plain[start + 8:stop] if is_text else self.plain[start:start + 8].view(self.u64)

    def values(self) -> list[str] | np.ndarray:
        if self.bulk is not None:
            return self.bulk.copy()
        blob = self.plain[int(self.starts[0]):int(self.starts[-1])].tobytes()
        cut = (self.starts - self.starts[0]).tolist()
        return [blob[a + 8:b].decode("utf-8", errors="replace") for a, b in zip(cut, cut[1:])]


def array_values(field: Any) -> list[str] | np.ndarray | None:
    """An array field's values in bulk (strings as str), for any reader's field; None otherwise."""
    if field.types[0] != gguf.GGUFValueType.ARRAY:
        return None
    if isinstance(field.parts, _ArrayParts):
        return field.parts.values()
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)


def _check_tensor_extents(reader: gguf.GGUFReader, path: Path) -> None:
    # The reader memory-maps lazily, so data cut off at the end of a download would
    # only fail (with SIGBUS or garbage) when the weights are first touched.
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor '{t.name}' ends at byte {end:,} "
                f"but the file has {size:,} bytes"
            )


def reader_path(reader: gguf.GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "<gguf>")


def get_key(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    """Metadata value of `key` as a Python value; GGUFError naming key and file if required and absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise GGUFError(f"{reader_path(reader)}: missing required metadata key '{key}'")
        return default
    return f.contents()


# llama.cpp's LLAMA_POOLING_TYPE values ({arch}.pooling_type) that embeddings honour
_POOLING = {1: "mean", 2: "cls", 3: "last"}


def pooling_type(reader: gguf.GGUFReader) -> str:
    """How the file says its embeddings are pooled: mean, cls or last; mean when it
    declares none (generative models) or a kind without one vector per input."""
    arch = get_key(reader, "general.architecture", "")
    return _POOLING.get(get_key(reader, f"{arch}.pooling_type", 1), "mean")


# ---------------------------------------------------------------------------
# Model config


class WeightStats(NamedTuple):
    n_params: int  # elements over all tensors
    n_bytes: int  # bytes of tensor data in the file, as stored (quantized)
    n_tensors: int
    held_quantized: int  # bytes a CPU model holds with weights="quantized"
    held_params: int  # elements a model holds dequantized (weights="dequantize")


# Tensors a model folds into something else at load instead of holding them.
CONSUMED_AT_LOAD = ("rope_freqs.weight",)


def weight_stats(reader: gguf.GGUFReader) -> WeightStats:
    """Parameter count and weight bytes from the tensor infos, without dequantizing."""
    held = [t for t in reader.tensors if t.name not in CONSUMED_AT_LOAD]
    return WeightStats(
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        n_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        n_tensors=len(reader.tensors),
        # matrices as stored; 1-D tensors and types without a kernel as float32
        held_quantized=sum(int(t.n_bytes) if len(t.shape) == 2 and t.tensor_type in KERNEL_TYPES
                           else 4 * int(t.n_elements) for t in held),
        held_params=sum(int(t.n_elements) for t in held),
    )


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    n_kv_heads: int = 0  # 0: same as n_heads (no GQA)
    head_dim: int = 0  # 0: d_model // n_heads
    v_head_dim: int = 0  # 0: head_dim
    rope_base: float = 10000.0
    rope_dim: int = 0  # 0: head_dim (rotate the whole head)
    rope_scaling_type: str | None = None  # "linear", "yarn", ... (the model decides what it supports)
    rope_scaling_factor: float | None = None
    rope_scaling_orig_ctx: int | None = None
    rope_freq_factors: bool = False  # a `rope_freqs.weight` tensor (llama-3.1 style scaling)
    rms_eps: float = 1e-5
    # Sliding-window attention (gemma2/3): a windowed layer's query at position p sees
    # keys p-window+1..p only. swa_layers[i] says whether layer i is windowed.
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_base_local: float = 0.0  # RoPE base of the windowed layers (0: rope_base)
    attn_softcap: float = 0.0  # 0: none; else scores -> cap * tanh(scores / cap)
    final_softcap: float = 0.0  # the same on the output logits
    query_scale: float = 0.0  # 0: 1/sqrt(head_dim); gemma: 1/sqrt(query_pre_attn_scalar)
    tied_output: bool = False  # no output.weight: the head reuses token_embd
    qkv_bias: bool = False  # qwen2 has biases on q, k, v
    name: str = ""
    file_type: int | None = None  # general.file_type (gguf.LlamaFileType)
    n_params: int = 0  # from the file's tensor infos (0 for hand-built configs)
    weights_bytes: int = 0  # in the file, as stored
    path: str | None = None
    held_quantized: int = field(default=0, repr=False)  # see WeightStats (0: weights_bytes)
    held_params: int = field(default=0, repr=False)  # (0: n_params)
    # derived in __post_init__
    rope_style: str = field(init=False)  # "normal" (interleaved pairs) or "neox"
    n_rep: int = field(init=False)  # query heads per kv head

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise GGUFError(f"unsupported architecture '{self.arch}'; supported: {', '.join(SUPPORTED_ARCHS)}")
        for name in ("n_layers", "d_model", "n_heads", "ffn_dim", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if not self.head_dim:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        self.v_head_dim = self.v_head_dim or self.head_dim
        self.rope_dim = self.rope_dim or self.head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        self.rope_style = ARCHITECTURES[self.arch].rope_style
        self.n_rep = self.n_heads // self.n_kv_heads
        self.rope_base_local = self.rope_base_local or self.rope_base
        self.query_scale = self.query_scale or 1.0 / self.head_dim ** 0.5
        if self.swa_layers and len(self.swa_layers) != self.n_layers:
            raise ValueError(f"sliding-window pattern has {len(self.swa_layers)} layers, "
                             f"the model {self.n_layers}")
        if any(self.swa_layers) and self.sliding_window <= 0:
            raise ValueError("windowed layers need a positive attention.sliding_window")

    def layer_window(self, layer: int) -> int:
        """Keys a query of ``layer`` attends to, itself included (0: all before it)."""
        return self.sliding_window if self.swa_layers and self.swa_layers[layer] else 0

    @property
    def cache_head_dim(self) -> int:
        """head_dim rounded up to whole 32-value blocks: the row width the K/V cache holds
        (a head_dim that 32 does not divide is zero-padded there and stored as f16)."""
        return -(-self.head_dim // formats.QK) * formats.QK

    def held_weight_bytes(self, weights: str = "quantized", element_size: int = 4) -> int:
        """Bytes of weights a loaded model holds: with weights="quantized" (CPU) the stored
        blocks, else every tensor dequantized to ``element_size`` bytes (4: CPU float32)."""
        if weights == "quantized":
            return self.held_quantized or self.weights_bytes
        return (self.held_params or self.n_params) * element_size

    @property
    def file_type_name(self) -> str | None:
        if self.file_type is None:
            return None
        try:
            return gguf.LlamaFileType(self.file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return str(self.file_type)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> "ModelConfig":
        path = reader_path(reader)
        arch = get_key(reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(f"{path}: unsupported architecture '{arch}'; supported: {', '.join(SUPPORTED_ARCHS)}")
        tensors = {t.name: t for t in reader.tensors}
        _refuse_experts(reader, arch, tensors)
        stats = weight_stats(reader)

        def key(suffix: str, default: Any = _REQUIRED) -> Any:
            return get_key(reader, f"{arch}.{suffix}", default)

        n_heads = key("attention.head_count")
        if isinstance(n_heads, list):
            raise GGUFError(f"{path}: per-layer head counts are not supported")
        try:
            config = cls(
                arch=arch,
                name=get_key(reader, "general.name", Path(path).stem),
                n_layers=key("block_count"),
                d_model=key("embedding_length"),
                n_heads=n_heads,
                n_kv_heads=key("attention.head_count_kv", 0),
                head_dim=key("attention.key_length", 0),
                v_head_dim=key("attention.value_length", 0),
                ffn_dim=key("feed_forward_length"),
                vocab_size=_vocab_size(reader, arch, tensors),
                context_length=key("context_length"),
                rope_base=float(key("rope.freq_base", 10000.0)),
                rope_dim=key("rope.dimension_count", 0),
                rope_scaling_type=key("rope.scaling.type", None),
                rope_scaling_factor=_opt_float(key("rope.scaling.factor", None)),
                rope_scaling_orig_ctx=key("rope.scaling.original_context_length", None),
                rope_freq_factors="rope_freqs.weight" in tensors,
                rms_eps=float(key("attention.layer_norm_rms_epsilon")),
                **_gemma_fields(reader, arch, key("block_count"), key("attention.key_length", 0)),
                tied_output="output.weight" not in tensors,
                qkv_bias="blk.0.attn_q.bias" in tensors,
                file_type=get_key(reader, "general.file_type", None),
                n_params=stats.n_params,
                weights_bytes=stats.n_bytes,
                path=path,
                held_quantized=stats.held_quantized,
                held_params=stats.held_params,
            )
        except GGUFError:
            raise
        except ValueError as e:  # inconsistent hyperparameters from __post_init__
            raise GGUFError(f"{path}: {e}") from e
        check_physical(reader, config)
        return config


def check_physical(reader: gguf.GGUFReader, config: ModelConfig) -> None:
    """GGUFError (file and key named) for values no working model has, which would
    otherwise load and fail at the first token (a NaN or zero RoPE base or epsilon), or
    answer nothing (a NaN norm weight), or quietly drop layers (a wrong block count)."""
    path, arch = reader_path(reader), config.arch
    for key, value in (("rope.freq_base", config.rope_base),
                       ("attention.layer_norm_rms_epsilon", config.rms_eps),
                       ("rope.scaling.factor", config.rope_scaling_factor)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise GGUFError(f"{path}: metadata '{arch}.{key}' is {value}; it must be a finite "
                            f"positive number")
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if blocks != set(range(config.n_layers)):
        raise GGUFError(f"{path}: metadata '{arch}.block_count' is {config.n_layers} but the file "
                        f"holds tensors of {len(blocks)} blocks"
                        + (f" (numbered up to {max(blocks)})" if blocks else ""))
    for t in reader.tensors:  # norms are a few KB each: reading them all costs nothing
        if t.name.endswith("norm.weight") and not np.isfinite(dequantize_tensor(t)).all():
            raise GGUFError(f"{path}: tensor '{t.name}' holds non-finite values")


# Layers on a sliding window where the GGUF does not list them (llama.cpp's
# set_swa_pattern(n): layer i is windowed unless i % n == n - 1).
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0  # Gemma 3's rope_local_base_freq; GGUFs do not store it


def _gemma_fields(reader: gguf.GGUFReader, arch: str, n_layers: int, key_length: int) -> dict:
    """ModelConfig fields of the gemma family: window, its layers, local RoPE base,
    soft-caps and query scale. Empty for other architectures."""
    if arch not in _SWA_PERIOD:
        return {}
    get = lambda suffix, default=None: get_key(reader, f"{arch}.{suffix}", default)  # noqa: E731
    window = int(get("attention.sliding_window", 0))
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        swa = tuple(bool(x) for x in pattern)
    else:
        period = int(pattern) if pattern else _SWA_PERIOD[arch]
        swa = tuple(i % period != period - 1 for i in range(n_layers))
    # query_pre_attn_scalar is head_dim in every Gemma 3 and in Gemma 2 2B/9B, which is
    # what llama.cpp scales by; Gemma 2 27B (46 layers) uses d_model / n_heads.
    scalar = key_length
    if arch == "gemma2" and n_layers == 46:
        scalar = get("embedding_length") // get("attention.head_count")
    return {
        "sliding_window": window,
        "swa_layers": swa if window else (),
        "rope_base_local": _GEMMA3_LOCAL_ROPE_BASE if arch == "gemma3" else 0.0,
        "attn_softcap": float(get("attn_logit_softcapping", 0.0) or 0.0),
        "final_softcap": float(get("final_logit_softcapping", 0.0) or 0.0),
        "query_scale": 1.0 / scalar ** 0.5 if scalar else 0.0,
    }


def _refuse_experts(reader: gguf.GGUFReader, arch: str, tensors: dict) -> None:
    """Mixture-of-experts files (Mixtral is arch 'llama' with expert tensors) would load
    without their experts' weights being used: refuse them by name."""
    experts = sorted(n for n in tensors if "_exps." in n or "_shexp." in n)
    n_experts = get_key(reader, f"{arch}.expert_count", 0) or 0
    if experts or n_experts:
        what = f"tensor '{experts[0]}'" if experts else f"'{arch}.expert_count' = {n_experts}"
        raise GGUFError(f"{reader_path(reader)}: mixture-of-experts models are not supported "
                        f"({what})")


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _vocab_size(reader: gguf.GGUFReader, arch: str, tensors: dict) -> int:
    n = get_key(reader, f"{arch}.vocab_size", None)
    if n is not None:
        return int(n)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    if "token_embd.weight" in tensors:
        return int(tensors["token_embd.weight"].shape[1])  # ne = [d_model, vocab]
    raise GGUFError(f"{reader_path(reader)}: missing required metadata key '{arch}.vocab_size'")


def load_config(path: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_gguf(open_gguf(path))


# ---------------------------------------------------------------------------
# Weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Torch shapes of the tensors the llama-family forward needs ([out, in] for matrices)."""
    d, q = config.d_model, config.n_heads * config.head_dim
    k, v = config.n_kv_heads * config.head_dim, config.n_kv_heads * config.v_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, d),
        "output_norm.weight": (d,),
    }
    if not config.tied_output:
        shapes["output.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (k, d),
            p + "attn_v.weight": (v, d),
            p + "attn_output.weight": (d, q),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate.weight": (config.ffn_dim, d),
            p + "ffn_up.weight": (config.ffn_dim, d),
            p + "ffn_down.weight": (d, config.ffn_dim),
        }
        if config.qkv_bias:
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (k,), p + "attn_v.bias": (v,)}
        if config.arch == "phi3":  # fused q/k/v rows and fused gate/up rows
            for name in ("attn_q", "attn_k", "attn_v", "ffn_gate"):
                del shapes[p + name + ".weight"]
            shapes |= {p + "attn_qkv.weight": (q + 2 * k, d),
                       p + "ffn_up.weight": (2 * config.ffn_dim, d)}
        if config.arch in ("gemma2", "gemma3"):  # norms after attention and FFN
            shapes |= {p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)}
        if config.arch in ("gemma3", "qwen3"):  # q and k RMS-normalized per head
            shapes |= {p + "attn_q_norm.weight": (config.head_dim,),
                       p + "attn_k_norm.weight": (config.head_dim,)}
    return shapes


def torch_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))  # ne order -> row-major


def dequantize_tensor(t: gguf.ReaderTensor) -> np.ndarray:
    """float32 numpy array of a reader tensor, in its torch shape; never a view of the mmap."""
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    # F32 tensors come back as read-only views of the memory map (and possibly
    # big-endian); torch needs its own native float32 copy.
    if arr.dtype != np.float32 or not arr.flags.writeable:
        arr = arr.astype(np.float32)
    return arr.reshape(torch_shape(t))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's LlamaModel.permute on attn_q/attn_k rows (weight or bias).

    In the file, row 2i+h of a head holds original row h*head_dim/2 + i, so the
    interleaved ("normal") rotation of pair (2i, 2i+1) equals the NEOX rotation of
    pair (i, i+head_dim/2) on the original rows.
    """
    # w: [n_heads * head_dim, ...] -> [n_heads, head_dim/2, 2, ...] -> swap -> back
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_weights(
    reader: gguf.GGUFReader,
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    neox_qk: bool = False,
    quantized: bool = False,
) -> dict[str, Any]:
    """Every tensor of the file keyed by its GGUF name ("blk.0.attn_q.weight").

    Dequantized (torch tensors in ``dtype`` on ``device``), one at a time so peak extra
    memory is one float32 tensor; with ``quantized``, every matrix of a type the CPU
    kernels read is instead a ``weights.QTensor``: a view of its blocks in the file's
    memory map, no copy (1-D tensors, norms and biases, are still small float copies).
    With `neox_qk`, q/k of "normal"-style architectures are un-permuted so the caller
    applies NEOX RoPE whatever the architecture (see ``kvslim.architectures``); a QTensor
    records the permutation instead, and its matmul undoes it on the output.
    """
    _check_expected(reader, config)
    unpermute = neox_qk and config.rope_style == "normal"
    heads = {".attn_q.": config.n_heads, ".attn_k.": config.n_kv_heads}
    views: dict[str, Any] = {}
    if quantized:
        from kvslim import weights as wt  # numba: imported only when a model is built
        views = wt.views(reader, {t.name: config.head_dim for t in reader.tensors
                                  if unpermute and any(k in t.name for k in heads)})
    rest = [t for t in reader.tensors if t.name not in views]
    show = progress and sys.stderr.isatty()
    out: dict[str, Any] = dict(views)
    with _progress_bar(sum(int(t.n_bytes) for t in rest), show) as bar:
        for t in rest:
            w = torch.from_numpy(dequantize_tensor(t))
            n = next((h for k, h in heads.items() if k in t.name), 0) if unpermute else 0
            if n:
                w = unpermute_qk(w, n)
            out[t.name] = w.to(device=device, dtype=dtype)
            bar.update(int(t.n_bytes))
    return out


def _check_expected(reader: gguf.GGUFReader, config: ModelConfig) -> None:
    tensors = {t.name: t for t in reader.tensors}
    for name, shape in expected_shapes(config).items():
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{reader_path(reader)}: missing tensor '{name}'")
        if torch_shape(t) != shape:
            raise GGUFError(
                f"{reader_path(reader)}: tensor '{name}' has shape {list(torch_shape(t))}, "
                f"expected {list(shape)} from the metadata"
            )


def _progress_bar(total_bytes: int, show: bool):
    # shown only once loading has taken a second (a quantized load never does)
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show,
                leave=False, delay=1.0)
