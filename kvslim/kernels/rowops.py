"""A decoder layer's row-wise ops outside the matmuls: RMSNorm (with the residual add
before it; gemma's: the sublayer's output normed before the add, and the next norm after
it), RMSNorm per head (gemma 3's q and k), NEOX RoPE, SiLU(gate) * up and GELU(gate) * up.
Fused numba kernels for CPU float32, plain torch beside them (the reference, and the path
on every other device or dtype).

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
from kvslim.kernels import cpu

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


@njit(inline="always", fastmath=_FAST)
def _inv_rms(v, eps):
    """1 / sqrt(mean(v^2) + eps) of one row v [d] float32."""
    s = np.float32(0.0)
    for j in range(v.shape[0]):
        s += v[j] * v[j]
    return np.float32(1.0) / np.sqrt(s / np.float32(v.shape[0]) + np.float32(eps))


@njit(fastmath=_FAST, cache=True)
def _norm_rows(x, w, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w; x, out [N, d], w [d] float32."""
    n, d = x.shape
    for i in range(n):
        r = _inv_rms(x[i], eps)
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
def _norm_add_norm_rows(x, y, w_post, eps, w_next, out):
    """x += y normed with w_post (the residual, in place), then out = _norm_rows(x, w_next):
    gemma's post-sublayer norm, residual add and next pre-norm in one pass over the rows."""
    n, d = x.shape
    for i in range(n):
        r = _inv_rms(y[i], eps)
        for j in range(d):
            x[i, j] += y[i, j] * r * w_post[j]
    _norm_rows(x, w_next, eps, out)


@njit(fastmath=_FAST, cache=True)
def _head_norm_rows(x, n_a, w_a, w_b, n_b, eps):
    """RMSNorm in place over each head's D values: heads 0..n_a-1 of x [N, h, D] with
    w_a [D], heads n_a..n_a+n_b-1 with w_b [D] (gemma 3's q and k heads, side by side in
    the fused qkv output)."""
    n, _, dim = x.shape
    for i in range(n):
        for h in range(n_a + n_b):
            w = w_a if h < n_a else w_b
            r = _inv_rms(x[i, h], eps)
            for j in range(dim):
                x[i, h, j] = x[i, h, j] * r * w[j]


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


@njit(inline="always")
def _sigmoid(x):
    """1 / (1 + exp(-x)) for float32 x, as e / (1 + e) below 0 (e = exp(-|x|)): the
    attention's exp (``cpu._exp``, Cephes expf for x <= 0), which vectorizes where numba's
    np.exp calls libm's expf one value at a time (silu_mul ran 2-8x slower than torch's,
    measured)."""
    e = cpu._exp(-abs(x))
    s = np.float32(1.0) / (np.float32(1.0) + e)
    return s if x >= np.float32(0.0) else e * s


@njit(cache=True, error_model="numpy")  # no zero-division test: it kept the loop scalar
def _silu_mul_rows(gu, out):
    """out = silu(gate) * up for gu [N, 2F] = [gate | up], out [N, F]."""
    n, f = out.shape
    for i in range(n):
        for j in range(f):
            g = gu[i, j]
            out[i, j] = g * _sigmoid(g) * gu[i, f + j]


@njit(cache=True, error_model="numpy")  # no zero-division test: it kept the loop scalar
def _gelu_mul_rows(gu, out):
    """out = gelu(gate) * up for gu [N, 2F] = [gate | up], out [N, F]: GELU's tanh form,
    0.5 g (1 + tanh(z)) with z = sqrt(2 / pi) (g + 0.044715 g^3), computed as
    g sigmoid(2 z) (the same value; numba's tanh ran 10x slower)."""
    n, f = out.shape
    c = np.float32(2.0 * np.sqrt(2.0 / np.pi))
    for i in range(n):
        for j in range(f):
            g = gu[i, j]
            z2 = c * (g + np.float32(0.044715) * g * g * g)
            out[i, j] = g * _sigmoid(z2) * gu[i, f + j]


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

    @classmethod
    def norm_add_norm(cls, x: torch.Tensor, y: torch.Tensor, w_post: torch.Tensor,
                      w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + RMSNorm(y) with w_post, RMSNorm of that with w_next): gemma's sublayer
        output y [N, d] normed into the residual stream x, and the next sublayer's input."""
        x = x + cls.norm(y, w_post, eps)
        return x, cls.norm(x, w_next, eps)

    @staticmethod
    def head_norm(x: torch.Tensor, n_a: int, w_a: torch.Tensor, w_b: torch.Tensor,
                  n_b: int, eps: float) -> torch.Tensor:
        """x [N, h, D] with heads 0..n_a-1 RMS-normed over D with w_a [D], the next n_b
        with w_b, the rest as they were; the result holds every head."""
        a, b = x[:, :n_a], x[:, n_a:n_a + n_b]
        dim = x.shape[-1:]
        return torch.cat([F.rms_norm(a, dim, w_a, eps), F.rms_norm(b, dim, w_b, eps),
                          x[:, n_a + n_b:]], 1)

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

    @staticmethod
    def gelu_mul(gu: torch.Tensor) -> torch.Tensor:
        """[N, 2F] = [gate | up] -> gelu(gate) * up [N, F] (tanh approximation, gemma's)."""
        gate, up = gu.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh").mul_(up)


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

    @staticmethod
    def norm_add_norm(x, y, w_post, w_next, eps):
        # x is the residual stream, owned by the forward: updated in place
        out = torch.empty_like(x)
        _norm_add_norm_rows(x.numpy(), y.contiguous().numpy(), w_post.numpy(), eps,
                            w_next.numpy(), out.numpy())
        return x, out

    @staticmethod
    def head_norm(x, n_a, w_a, w_b, n_b, eps):
        x = x.contiguous()  # in place when it is (a fused qkv output)
        _head_norm_rows(x.numpy(), n_a, w_a.numpy(), w_b.numpy(), n_b, eps)
        return x

    # (cos, sin, their numpy rows) of the last two tables a step used: every layer of
    # a step uses one of them (gemma: the local and the global RoPE). One tuple, replaced
    # whole: a step on another thread at worst makes its own.
    _tables: tuple = ((None, None, None, None), (None, None, None, None))

    @classmethod
    def rope(cls, x, heads, cos, sin):
        x = x.contiguous()  # in place when it is (a fused qkv output): one compiled layout
        t = next((t for t in cls._tables if t[0] is cos and t[1] is sin), None)
        if t is None:  # a new step's: numpy rows once, not per layer
            t = (cos, sin, cos[:, 0].contiguous().numpy(), sin[:, 0].contiguous().numpy())
            cls._tables = (t, cls._tables[0])
        _rope_rows(x.numpy(), heads, t[2], t[3])
        return x

    @staticmethod
    def _gated(kernel, gu):
        """kernel(gu [N, 2F], out [N, F]) -> out."""
        gu = gu.contiguous()
        out = torch.empty(gu.shape[0], gu.shape[1] // 2)
        kernel(gu.numpy(), out.numpy())
        return out

    @classmethod
    def silu_mul(cls, gu):
        return cls._gated(_silu_mul_rows, gu)

    @classmethod
    def gelu_mul(cls, gu):
        return cls._gated(_gelu_mul_rows, gu)


def ops(device: torch.device, dtype: torch.dtype) -> type[TorchOps]:
    """The set a model on ``device`` in ``dtype`` uses, for every step it runs."""
    return NumbaOps if torch.device(device).type == "cpu" and dtype == torch.float32 else TorchOps
