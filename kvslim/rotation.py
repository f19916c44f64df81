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

On CPU float32 rows go through one numba kernel per call (``rotate_rows``): the torch
butterfly is ~20 small ops, which at decode (a few rows per layer) costs more in op
dispatch than the arithmetic. The kernel can also subtract / add a per-head vector in
the same pass (the cache's centering, see ``codec``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from kvslim import jit  # noqa: F401 - before any kernel compiles (kvslim.jit)

__all__ = ["Rotation", "fwht", "hadamard_size", "default_rotation", "rotate_rows",
           "scaled_rotate_rows", "butterfly", "forward_row", "rotate_kernel"]


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


@njit(inline="always")
def butterfly(buf, size):
    """Unnormalized Walsh-Hadamard of each run of ``size`` values of buf, in place.

    The stages run over the whole row: a stage of half-width below ``size`` never
    crosses a block of ``size`` values, so each block is transformed on its own.
    """
    half = 1
    while half < size:
        for start in range(0, buf.shape[0], 2 * half):
            for j in range(start, start + half):
                a, b = buf[j], buf[j + half]
                buf[j], buf[j + half] = a + b, a - b
        half *= 2


@njit(inline="always")
def forward_row(src, buf, signs, shift, size, scale):
    """buf = H(S src) * scale - shift for one row [D] (size 0: no butterfly, scale 1)."""
    for j in range(buf.shape[0]):
        buf[j] = src[j] * signs[j]
    if size > 0:
        butterfly(buf, size)
    for j in range(buf.shape[0]):
        buf[j] = buf[j] * scale - shift[j]


@njit(cache=True)
def rotate_kernel(x, out, signs, shift, size, inverse):
    """out = H(S x) - shift (forward) or S H(x + shift) (inverse), per [N, H, D] row.

    signs [D] float32; shift [H, D] float32 (zeros when there is nothing to shift).
    out may be x itself (each row is read into a buffer before it is written).
    """
    n, heads, dim = x.shape
    scale = np.float32(1.0 / np.sqrt(size))
    buf = np.empty(dim, np.float32)
    for i in range(n):
        for h in range(heads):
            if inverse:
                for j in range(dim):
                    buf[j] = x[i, h, j] + shift[h, j]
                butterfly(buf, size)
                for j in range(dim):
                    out[i, h, j] = buf[j] * scale * signs[j]
            else:
                forward_row(x[i, h], buf, signs, shift[h], size, scale)
                out[i, h, :] = buf


@njit(cache=True)
def scaled_rotate_kernel(x, out, signs, pre, post, size):
    """out = (H(S (x * pre)) * scale) * post per [N, H, D] row, in the order the separate
    torch ops round (so the result is theirs bit for bit). pre [H, D], post [H], signs
    [D] float32; size 0: no butterfly (scale 1)."""
    n, heads, dim = x.shape
    scale = np.float32(1.0 / np.sqrt(size)) if size > 0 else np.float32(1.0)
    buf = np.empty(dim, np.float32)
    for i in range(n):
        for h in range(heads):
            for j in range(dim):
                buf[j] = (x[i, h, j] * pre[h, j]) * signs[j]
            if size > 0:
                butterfly(buf, size)
            for j in range(dim):
                out[i, h, j] = (buf[j] * scale) * post[h]


def scaled_rotate_rows(x: torch.Tensor, rot: "Rotation | None", pre: torch.Tensor | None,
                       post: torch.Tensor | None) -> torch.Tensor | None:
    """R (x * pre) * post for x [N, H, D] as one kernel call: pre [H, D], post [H] (None:
    ones). None where the kernel does not apply (not CPU float32 [N, H, D]): the caller
    runs the torch ops instead."""
    if not _numba_ok(x):
        return None
    heads, dim = x.shape[1], x.shape[2]
    signs = rot.signs_np if rot is not None else _ones(dim)
    pre_np = pre.numpy() if pre is not None else _ones(heads, dim)
    post_np = post.numpy() if post is not None else _ones(heads)
    out = torch.empty(x.shape[0], heads, dim, dtype=torch.float32)
    scaled_rotate_kernel(x.detach().contiguous().numpy(), out.numpy(), signs, pre_np, post_np,
                         rot.size if rot is not None else 0)
    return out


@functools.lru_cache(maxsize=16)
def _ones(*shape: int) -> np.ndarray:
    """An array of ones, made once per shape (writable, as the scales it stands in for, so
    the kernel has one compiled signature; nothing writes it)."""
    return np.ones(shape, np.float32)


@functools.lru_cache(maxsize=16)
def _zeros(heads: int, dim: int) -> np.ndarray:
    """A read-only [heads, dim] zero shift, made once per shape (rotate_rows runs per layer)."""
    z = np.zeros((heads, dim), np.float32)
    z.flags.writeable = False
    return z


def _numba_ok(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype is torch.float32 and x.dim() == 3


def rotate_rows(x: torch.Tensor, rot: "Rotation | None", shift: torch.Tensor | None = None,
                inverse: bool = False, in_place: bool = False) -> torch.Tensor:
    """Forward: R x - shift; inverse: R^T (x + shift). x [N, H, D], shift [H, D] or None.

    A new tensor, or x itself when ``in_place`` (CPU float32 only; elsewhere a new
    tensor all the same). ``rot`` None applies only the shift.
    """
    if rot is None:
        if shift is None:
            return x
        return x + shift.to(x.dtype) if inverse else x - shift.to(x.dtype)
    if _numba_ok(x):
        xs = x.detach().numpy()
        out = x if in_place else torch.empty(x.shape[0], x.shape[1], x.shape[2], dtype=torch.float32)
        sh = shift.numpy() if shift is not None else _zeros(x.shape[1], x.shape[2])
        rotate_kernel(xs, xs if in_place else out.numpy(), rot.signs_np, sh, rot.size, inverse)
        return out
    if inverse:
        return rot.inverse(x if shift is None else x + shift.to(x.dtype))
    y = rot.forward(x)
    return y if shift is None else y - shift.to(x.dtype)


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

    @property
    def signs_np(self) -> np.ndarray:
        """The diagonal as float32 numpy (ones without random signs), for the kernel."""
        cached = self.__dict__.get("_signs_np")
        if cached is None:
            s = self.signs if self.signs is not None else torch.ones(self.dim)
            cached = s.to(torch.float32).contiguous().numpy()
            object.__setattr__(self, "_signs_np", cached)
        return cached

    def describe(self) -> str:
        """``hadamard-64`` or ``hadamard-64+signs`` (reports and logs)."""
        return f"hadamard-{self.size}" + ("+signs" if self.signs is not None else "")

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
