"""Orthonormal Hadamard rotation of K/V rows before they are quantized.

Outlier channels make one value dominate a 32-value block, so every other value in it
lands on a few codes. Rotating each head's vectors by an orthonormal R spreads that
energy over the block; attention is unchanged because

    scores:  (R q) . (R k) = q . k
    output:  sum_i p_i (R v_i) = R o   ->   o = R^T (R o)

R = H S: H the normalized Walsh-Hadamard matrix (symmetric, H H = I) applied in blocks
of ``size`` values, S an optional fixed diagonal of random signs (seeded, so a cache
written by one process reads the same in another). The stored blocks stay valid ggml
blocks, of rotated values. The transform is a fast Walsh-Hadamard butterfly:
log2(size) add/sub stages, once per token per head, never a dense matmul per tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Rotation", "fwht", "hadamard_size", "default_rotation"]


def hadamard_size(head_dim: int, max_size: int = 256) -> int | None:
    """Largest power of two <= max_size dividing head_dim, if it is at least 64.

    llama.cpp rotates by default only when head_dim % 64 == 0; smaller blocks mix too
    few values to help a 32-value block.
    """
    size = 1
    while head_dim % (size * 2) == 0 and size * 2 <= max_size:
        size *= 2
    return size if size >= 64 else None


def fwht(x: torch.Tensor, size: int) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of each run of ``size`` values on the last dim.

    x: [..., D] with D % size == 0 -> [..., D], same dtype. Self-inverse.
    """
    shape = x.shape
    y = x.reshape(-1, shape[-1] // size, size)
    h = 1
    while h < size:
        y = y.view(y.shape[0], y.shape[1], size // (2 * h), 2, h)
        a, b = y[:, :, :, 0], y[:, :, :, 1]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(shape) * (1.0 / math.sqrt(size))).to(x.dtype)


@dataclass(frozen=True)
class Rotation:
    """R = H S on vectors of ``dim`` values, H applied in blocks of ``size``."""

    dim: int
    size: int
    signs: torch.Tensor | None = None  # [dim] of +-1, or None for plain H

    @classmethod
    def make(cls, dim: int, size: int | None = None, random_signs: bool = False,
             seed: int = 0) -> "Rotation":
        size = hadamard_size(dim) if size is None else size
        if size is None or dim % size or size & (size - 1):
            raise ValueError(f"no Hadamard rotation of block size {size} fits head_dim {dim}")
        signs = None
        if random_signs:
            g = torch.Generator().manual_seed(seed)
            signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
        return cls(dim, size, signs)

    def _signs(self, x: torch.Tensor) -> torch.Tensor:
        return self.signs.to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """R x for x [..., dim] (applied to q, k, v before attention / storage)."""
        if self.signs is not None:
            x = x * self._signs(x)
        return fwht(x, self.size)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """R^T y (undoes the rotation of an attention output)."""
        x = fwht(y, self.size)
        return x * self._signs(x) if self.signs is not None else x

    def matrix(self) -> torch.Tensor:
        """The dense [dim, dim] R, for tests and for folding into weights."""
        return self.forward(torch.eye(self.dim)).T


def default_rotation(head_dim: int, cache_type_k: str, cache_type_v: str) -> Rotation | None:
    """The rotation used when the user leaves ``kv_rotation`` on its default (auto)."""
    from kvslim import formats

    if not (formats.is_quantized(cache_type_k) or formats.is_quantized(cache_type_v)):
        return None
    if hadamard_size(head_dim) is None:
        return None
    return Rotation.make(head_dim)
