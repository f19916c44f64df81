"""The oracle for ``kernels.qmatmul``: gguf's own dequantization and a float64 matmul."""
from __future__ import annotations

import numpy as np
from gguf.quants import dequantize


def dequantize_ref(blocks: np.ndarray, qtype, shape: tuple[int, int]) -> np.ndarray:
    """float64 [out, in] of a weight's stored rows (blocks: uint8 [out, row bytes])."""
    return dequantize(np.ascontiguousarray(blocks).view(np.uint8), qtype).reshape(shape).astype(np.float64)


def matmul_ref(blocks: np.ndarray, qtype, shape: tuple[int, int], x: np.ndarray) -> np.ndarray:
    """float64 [M, out] = x [M, in] @ W.T."""
    return x.astype(np.float64) @ dequantize_ref(blocks, qtype, shape).T
