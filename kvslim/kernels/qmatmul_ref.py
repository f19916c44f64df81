"""The oracle for ``kernels.qmatmul``: gguf's own dequantization and a float64 matmul;
and fresh random blocks of every type to test (and time) the kernels on."""
from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

T = gguf.GGMLQuantizationType


def dequantize_ref(blocks: np.ndarray, qtype, shape: tuple[int, int]) -> np.ndarray:
    """float64 [out, in] of a weight's stored rows (blocks: uint8 [out, row bytes])."""
    return dequantize(np.ascontiguousarray(blocks).view(np.uint8), qtype).reshape(shape).astype(np.float64)


def matmul_ref(blocks: np.ndarray, qtype, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """float64 [M, out] = x [M, in] @ W.T."""
    return x.astype(np.float64) @ dequantize_ref(blocks, qtype, shape).T


# byte offsets of the fp16 scales in a block of the types gguf cannot quantize
_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
           T.IQ4_NL: (0,), T.IQ4_XS: (0,)}


def random_blocks(qt, rows: int, cols: int, rng) -> np.ndarray:
    """uint8 [rows, row bytes]: gguf's quantization of random floats where it has one, else
    random bytes with small finite fp16 scales (every code and sub-scale is then valid)."""
    if qt not in _SCALES:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        return np.ascontiguousarray(quantize(x, qt)).view(np.uint8).reshape(rows, -1)
    n, bs = gguf.GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (rows, cols // n, bs), dtype=np.uint8)
    for p in _SCALES[qt]:
        d = (rng.random((rows, cols // n)) * 0.01 + 0.001).astype(np.float16)
        b[:, :, p:p + 2] = d.view(np.uint8).reshape(rows, cols // n, 2)
    return b.reshape(rows, -1)
