"""A decoder layer's row-wise ops outside the matmuls: RMSNorm (with the residual add
before it), NEOX RoPE, SiLU(gate) * up. Fused numba kernels for CPU float32, plain torch
beside them (the reference, and the path on every other device or dtype).

On CPU a decode step is dominated by per-op dispatch, not arithmetic: torch's
``F.rms_norm`` on one 576-value row runs several ATen ops, each with its own dispatch
and allocation (benchmarks/README.md, "Per-token overhead"). Each kernel here is one call
doing the whole op, in place where the caller allows it.

Every kernel computes each row alone, with the same code whatever the row count, so a
row's result does not depend on what else is in the step (batch invariance, as the
quantized matmuls). ``ops(device, dtype)`` picks the set once per model, never per step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from kvslim import jit  # noqa: F401 - before any kernel compiles (kvslim.jit)

__all__ = ["TorchOps", "NumbaOps", "ops", "apply_rope"]

_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX rotation of the first R dims of each head. x [N, h, D], cos/sin [N, 1, R].

    cos = [cos θ, cos θ], sin = [-sin θ, sin θ] per row, so rotate_half is one roll.
    """
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, torch.roll(x, r // 2, dims=-1), sin)
    rot, rest = x[..., :r], x[..., r:]  # partial rotary: the tail passes through
    return torch.cat([torch.addcmul(rot * cos, torch.roll(rot, r // 2, dims=-1), sin), rest], -1)


# ---------------------------------------------------------------- numba kernels


@njit(fastmath=_FAST, cache=True)
def _norm_rows(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w; x, out [N, d], w [d] float32."""
    n, d = x.shape
    for i in range(n):
        s = np.float32(0.0)
        for j in range(d):
            s += x[i, j] * x[i, j]
        r = np.float32(1.0) / np.sqrt(s / np.float32(d) + np.float32(eps))
        for j in range(d):
            out[i, j] = x[i, j] * r * w[j]


@njit(fastmath=_FAST, cache=True)
def _add_norm_rows(x, y, w, eps, out):
    """x += y (the residual, in place), then out = _norm_rows(x)."""
    n, d = x.shape
    for i in range(n):
        for j in range(d):
            x[i, j] += y[i, j]
    _norm_rows(x, w, eps, out)


@njit(fastmath=_FAST, cache=True)
def _rope_rows(x, heads, cos, sin):
    """NEOX rotation in place of the first R dims of heads 0..heads-1: x [N, h, D],
    cos / sin [N, R] (as ``apply_rope``'s tables: sin carries rotate_half's sign)."""
    n, r = cos.shape
    half = r // 2
    for i in range(n):
        for h in range(heads):
            for j in range(half):
                a, b = x[i, h, j], x[i, h, j + half]
                x[i, h, j] = a * cos[i, j] + b * sin[i, j]
                x[i, h, j + half] = b * cos[i, j + half] + a * sin[i, j + half]


@njit(fastmath=_FAST, cache=True)
def _silu_mul_rows(gu, out):
    """out = silu(gate) * up for gu [N, 2F] = [gate | up], out [N, F]."""
    n, f = out.shape
    for i in range(n):
        for j in range(f):
            g = gu[i, j]
            out[i, j] = g / (np.float32(1.0) + np.exp(-g)) * gu[i, f + j]


# ---------------------------------------------------------------- the two sets


class TorchOps:
    """Plain torch: the reference, and the path off CPU float32."""

    @staticmethod
    def norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of each row: x [N, d] -> [N, d]."""
        return F.rms_norm(x, x.shape[-1:], w, eps)

    @classmethod
    def add_norm(cls, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, RMSNorm of it): the residual stream and the next sublayer's input."""
        x = x + y
        return x, cls.norm(x, w, eps)

    @staticmethod
    def rope(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, h, D] with its first ``heads`` heads rotated (cos / sin [N, 1, R]);
        the result holds every head."""
        return torch.cat([apply_rope(x[:, :heads], cos, sin), x[:, heads:]], 1)

    @staticmethod
    def silu_mul(gu: torch.Tensor) -> torch.Tensor:
        """[N, 2F] = [gate | up] -> silu(gate) * up [N, F]."""
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)


class NumbaOps(TorchOps):
    """CPU float32: one numba call per op, the residual and the rotation in place."""

    @staticmethod
    def norm(x, w, eps):
        x = x.contiguous()
        out = torch.empty_like(x)
        _norm_rows(x.numpy(), w.numpy(), eps, out.numpy())
        return out

    @staticmethod
    def add_norm(x, y, w, eps):
        # x is the residual stream, owned by the forward: updated in place
        out = torch.empty_like(x)
        _add_norm_rows(x.numpy(), y.contiguous().numpy(), w.numpy(), eps, out.numpy())
        return x, out

    # (cos, sin, their numpy rows): the last step's tables, which its every layer uses.
    # One tuple, replaced whole: a step on another thread at worst makes its own.
    _tables: tuple = (None, None, None, None)

    @classmethod
    def rope(cls, x, heads, cos, sin):
        x = x.contiguous()  # in place when it is (a fused qkv output): one compiled layout
        t = cls._tables
        if t[0] is not cos or t[1] is not sin:  # a new step's: numpy rows once, not per layer
            t = cls._tables = (cos, sin, cos[:, 0].contiguous().numpy(), sin[:, 0].contiguous().numpy())
        _rope_rows(x.numpy(), heads, t[2], t[3])
        return x

    @staticmethod
    def silu_mul(gu):
        gu = gu.contiguous()
        out = torch.empty(gu.shape[0], gu.shape[1] // 2)
        _silu_mul_rows(gu.numpy(), out.numpy())
        return out


def ops(device: torch.device, dtype: torch.dtype) -> type[TorchOps]:
    """The set a model on ``device`` in ``dtype`` uses, for every step it runs."""
    return NumbaOps if torch.device(device).type == "cpu" and dtype == torch.float32 else TorchOps
