"""Blocks shared by the architectures beside the llama family: RoPE tables per base.

The llama family keeps its own copy inside ``llama.py``; families whose layers use
different RoPE bases (gemma's windowed and global layers) hold one ``Rope`` per base.
"""
from __future__ import annotations

import torch

from kvslim.models.llama import apply_rope

__all__ = ["Rope", "rope_inv_freq"]


def rope_inv_freq(base: float, dim: int, linear_factor: float | None = None) -> torch.Tensor:
    """Inverse frequencies [dim/2] float64 for RoPE over ``dim`` dims of a head; a linear
    scaling divides positions (hence frequencies) by its factor."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return inv / linear_factor if linear_factor else inv


class Rope:
    """NEOX RoPE tables for one set of frequencies, grown by doubling as positions grow."""

    def __init__(self, inv_freq: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.inv_freq, self.device, self.dtype = inv_freq, device, dtype
        r = 2 * inv_freq.shape[0]
        self._cos = self._sin = torch.empty(0, 1, r, device=device, dtype=dtype)

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n', 1, R] for positions < n' (n' >= n); sin carries rotate_half's sign."""
        if self._cos.shape[0] < n:
            size = max(n, 2 * self._cos.shape[0], 256)
            ang = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq  # [n', R/2]
            cos, sin = ang.cos(), ang.sin()
            self._cos = torch.cat([cos, cos], -1)[:, None].to(self.device, self.dtype)
            self._sin = torch.cat([-sin, sin], -1)[:, None].to(self.device, self.dtype)
        return self._cos, self._sin

    def at(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, R] at positions pos [N]."""
        cos, sin = self.tables(int(pos.max()) + 1 if pos.numel() else 1)
        return cos[pos], sin[pos]

    def unrope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Undo the rotation: x [N, h, D] at positions pos [N]."""
        cos, sin = self.at(pos)
        return apply_rope(x, cos, -sin)

    def mean(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Mean over positions 0..n-1 of the rotation of fixed vectors x [..., h, D]
        (RoPE is linear in cos/sin, so it is the rotation by the averaged tables)."""
        cos, sin = self.tables(n)
        return apply_rope(x.to(self.dtype), cos[:n].mean(0), sin[:n].mean(0))
