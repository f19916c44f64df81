"""A llama-style decode step as one kernel job per layer (CPU, GGUF weight blocks).

``FusedLayers`` gathers what ``kernels.layer.layer_job`` reads for each layer of a
model (the four ``QLinear`` parts and work lists, the norms) once, and per step the
buffers, the cache's views and the codec's terms, then runs the layers one job each.
It applies to steps of decode rows only (``applies``) on CPU with quantized weights,
every sequence short enough for the attention kernel; its results equal the separate
calls' up to float32 rounding (``kernels.layer``), and the engine gives every decode
row this path (a step with prompt rows runs them as a second forward).

Shapes as in ``llama.py``: M rows, d = d_model, H / Hkv heads, D = head_dim, F = ffn_dim.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from kvslim.attention import Attention, Step
from kvslim.kernels import cpu, cpu_write, ggml
from kvslim.kernels.layer import PHASES, Q_BAD, Attn, Mat, layer_job, mat
from kvslim.kernels.rowops import NumbaOps
from kvslim.kernels.threads import pool
from kvslim.weights import QLinear, decode_only

__all__ = ["FusedLayers", "ENV"]

ENV = "KVSLIM_FUSED_LAYERS"  # "0": the separate calls (for comparisons)


def _nothing() -> None:
    return None


class FusedLayers:
    """A model's layers as ``layer_job``s; ``build`` says whether the model can."""

    def __init__(self, model):
        self.model, c = model, model.config
        self.d, self.ffn, self.eps = c.d_model, c.ffn_dim, float(c.rms_eps)
        self.heads, self.kv_heads, self.dim = model.n_heads, model.n_kv_heads, model.head_dim
        self.rot = min(c.rope_dim or self.dim, self.dim)
        self.layers = [(L.attn_norm.numpy(), L.ffn_norm.numpy(), L.wqkv, L.wo, L.w13, L.w2)
                       for L in model.layers]
        # which forms of x each matmul needs, over every layer (types differ by layer:
        # Q4_K_M's ffn_down is Q6_K in some)
        self.inputs = [tuple(any(L[j].inputs[t] for L in self.layers) for t in (0, 1))
                       for j in range(2, 6)]

    @classmethod
    def build(cls, model) -> "FusedLayers | None":
        """The fused layers of ``model`` (a llama-family ``Decoder``), or None where they do
        not apply: not CPU float32, weights dequantized, q/k/v biases, heads padded in the
        cache, a sliding window, or ``KVSLIM_FUSED_LAYERS=0``."""
        if os.environ.get(ENV, "1").strip() == "0" or model.ops is not NumbaOps:
            return None
        c = model.config
        mats = [m for L in model.layers for m in (L.wqkv, L.wo, L.w13, L.w2)]
        if not all(isinstance(m, QLinear) and m.b is None for m in mats):
            return None
        if model.cache_head_dim != model.head_dim or any(model.layer_windows()):
            return None
        if (c.v_head_dim or model.head_dim) != model.head_dim or c.attn_softcap:
            return None
        return cls(model)

    def applies(self, step: Step, n: int) -> bool:
        """Whether this step's n rows run fused: decode rows only (``weights.decode_only``),
        every sequence within the CPU attention kernel (no long chunk), and the step's
        ``Attention`` is the plain one (a subclass that watches or changes its calls,
        as calibration's, gets them)."""
        if not decode_only(n) or type(step.attn).__call__ is not Attention.__call__:
            return False
        if not isinstance(step.attn.backend, cpu.Backend):
            return False
        st = step.scratch
        return not st.tiled and len(st.work) > 0 and len(step.cache.groups) == 1

    def run(self, x: torch.Tensor, step: Step, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer on x [M, d] (the embedded tokens; cos / sin [M, 1, R] the step's
        RoPE tables) -> (x, y): the residual stream before the last layer's output y is
        added, as the separate calls' loop leaves them."""
        m, d, f = x.shape[0], self.d, self.ffn
        hq, hkv, dim = self.heads, self.kv_heads, self.dim
        cache, st = step.cache, step.scratch
        xn = ggml.dense(x).numpy().copy()  # [M, d] the residual stream, updated in place
        h, s = np.empty((m, d), np.float32), np.empty((m, f), np.float32)
        qkv_out = np.empty((m, (hq + 2 * hkv) * dim), np.float32)
        outs = (qkv_out, np.empty((m, d), np.float32), np.empty((m, 2 * f), np.float32),
                np.empty((m, d), np.float32))  # y: the last, each layer's output
        ins = (d, hq * dim, d, f)
        forms = [mat(q.parts, q.work, q.ints, inputs, m, k, out)
                 for q, inputs, k, out in zip(self.layers[0][2:], self.inputs, ins, outs)]
        at = Attn(np.empty((m, hq, dim), np.float32), np.empty((m, hkv, dim), np.float32),
                  np.empty((m, hkv, dim), np.float32),
                  cpu_write.rows(step.layer_slots(0), torch.int64),
                  np.empty((m, hq, dim), np.float32), np.float32(self.model.scale),
                  np.float32(0.0))
        cos_rows = ggml.dense(cos[:, 0]).numpy()  # [M, R]
        sin_rows = ggml.dense(sin[:, 0]).numpy()
        job = st.job(hq // hkv, dim)
        kplanes, vplanes = ggml.plane_views(cache, 0)
        tile = cpu._tile_tokens(dim, dim)
        helpers = pool()
        for i, (attn_norm, ffn_norm, *qls) in enumerate(self.layers):
            mats = [Mat(q.parts, q.work, *fm[2:7], fm.out, q.ints) for q, fm in zip(qls, forms)]
            geom = ggml.geom(cache, i, tile)
            code = cpu.coding(cache, i, hq)
            ctr, res = np.zeros((PHASES, 8), np.int64), np.zeros(2, np.int64)
            helpers.run(layer_job, (
                ctr, res, qls[0].data, self.eps, xn, int(i > 0), h, attn_norm, ffn_norm,
                mats[0], mats[1], mats[2], s, mats[3], qkv_out.reshape(m, hq + 2 * hkv, dim),
                hq + hkv, cos_rows, sin_rows, at, kplanes, vplanes, geom, job,
                *cpu_write.sides(cache, i), cpu_write.SHRINKS, *code),
                helpers.n, _nothing, ())
            if res[Q_BAD]:
                raise ValueError(f"query holds {int(res[Q_BAD])} non-finite values (NaN or inf)")
            ggml.raise_for(int(res[0]), cache)
        return torch.from_numpy(xn), torch.from_numpy(outs[3])
