"""A llama-style decode step as one kernel job (CPU, GGUF weight blocks).

``FusedLayers`` stacks what ``kernels.layer.step_job`` reads for each layer of a model
(the four ``QLinear`` parts and work lists, the norms) once, the cache's write sides
once per cache, and per step the buffers and the codec's terms, then runs every layer
in one job. It applies to steps of decode rows only (``applies``) on CPU with quantized
weights, every sequence short enough for the attention kernel; with it on, the engine
gives every decode row this path (a step with prompt rows runs them as a second
forward). ``KVSLIM_FUSED_LAYERS=0`` turns it off (``enabled``).

Shapes as in ``llama.py``: M rows, d = d_model, H / Hkv heads, D = head_dim, F = ffn_dim.
"""
from __future__ import annotations

import os
import weakref

import numpy as np
import torch

from kvslim import jit
from kvslim.attention import Attention, Step
from kvslim.kernels import cpu, cpu_write, ggml
from kvslim.kernels.layer import PHASES, Q_BAD, RES, Attn, mat, step_job
from kvslim.kernels.rowops import NumbaOps
from kvslim.kernels.threads import pool
from kvslim.weights import QLinear, decode_only

__all__ = ["FusedLayers", "ENV", "enabled"]

ENV = "KVSLIM_FUSED_LAYERS"  # "0": the separate calls; "1" or unset: decode steps as one job


def enabled() -> bool:
    """Whether decode steps run as one job: ``KVSLIM_FUSED_LAYERS=1`` yes, ``=0`` no, unset
    yes where ``kvslim.jit`` keeps each kernel's own copies (not on a numba whose
    internals moved). It was opt-in while a job loaded from numba's disk cache computed
    differently from the same job compiled in the process: numba's weak copies of
    callees, which ``kvslim.jit`` makes internal to each kernel."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: 1 (decode steps as one kernel job, the default) "
                         "or 0 (the separate calls)")
    return value == "1" or (value == "" and jit.active())


def _nothing() -> None:
    return None


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays))


class FusedLayers:
    """A model's layers as one ``step_job``; ``build`` says whether the model can."""

    def __init__(self, model):
        self.model, c = model, model.config
        self.d, self.ffn, self.eps = c.d_model, c.ffn_dim, float(c.rms_eps)
        self.heads, self.kv_heads, self.dim = model.n_heads, model.n_kv_heads, model.head_dim
        mats = [[L.wqkv, L.wo, L.w13, L.w2] for L in model.layers]
        self.first = mats[0]  # each matmul kind's layer-0 QLinear (ints, data)
        self.norms = np.stack([np.stack([L.attn_norm.numpy(), L.ffn_norm.numpy()])
                               for L in model.layers])  # [L, 2, d]
        # per matmul kind: every layer's parts [L, P, 6] and work items [L, W, 3]
        self.parts = tuple(np.stack([m[j].parts for m in mats]) for j in range(4))
        self.works = tuple(np.stack([m[j].work for m in mats]) for j in range(4))
        # which forms of x each matmul needs, over every layer (types differ by layer:
        # Q4_K_M's ffn_down is Q6_K in some)
        self.inputs = [tuple(any(m[j].inputs[t] for m in mats) for t in (0, 1))
                       for j in range(4)]
        self._per_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def build(cls, model) -> "FusedLayers | None":
        """The fused layers of ``model`` (a llama-family ``Decoder``), or None where they do
        not apply: turned off (``enabled``), not CPU float32, weights dequantized, q/k/v
        biases, heads padded in the cache, a sliding window."""
        if not enabled() or model.ops is not NumbaOps:
            return None
        c = model.config
        mats = [m for L in model.layers for m in (L.wqkv, L.wo, L.w13, L.w2)]
        if not all(isinstance(m, QLinear) and m.b is None for m in mats):
            return None
        if model.cache_head_dim != model.head_dim or any(model.layer_windows()):
            return None
        if (c.v_head_dim or model.head_dim) != model.head_dim or c.attn_softcap:
            return None
        shapes = {(j, m.parts.shape, m.work.shape, m.ints.tobytes())
                  for L in model.layers for j, m in enumerate((L.wqkv, L.wo, L.w13, L.w2))}
        if len(shapes) != 4:  # the layers' matmuls alike: stacked per kind
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

    def _terms(self, cache) -> tuple:
        """(side_k, side_v of layer 0, (K signs, K shift, K scales, V signs, V shift, V
        scales) [L, ...], the codec's per-layer query and output terms (q signs, pre, post,
        out signs, mul, shift) [L, ...], the two rotation sizes) for ``cache``: stacked
        copies of what ``cpu_write.sides`` and ``cpu.coding`` give the separate calls, kept
        per cache while its codec's ``version`` stays. ``KVCodec.set_means`` changes the
        shifts in place, which the separate calls read at their next call: so does this."""
        version = -1 if cache.codec is None else cache.codec.version
        got = self._per_cache.get(cache)
        if got is None or got[0] != version:
            n = len(self.norms)
            sides = [cpu_write.sides(cache, i) for i in range(n)]
            codes = [cpu.coding(cache, i, self.heads) for i in range(n)]
            if len({(c[3], c[7]) for c in codes}) != 1:
                raise ValueError("layers with different rotation sizes")
            got = self._per_cache[cache] = (version, (
                *sides[0], tuple(_stack([sd[k][f] for sd in sides]) for k in (0, 1) for f in (0, 2, 5)),
                tuple(_stack([c[f] for c in codes]) for f in (0, 1, 2, 4, 5, 6)),
                codes[0][3], codes[0][7]))
        return got[1]

    def run(self, x: torch.Tensor, step: Step, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer on x [M, d] (the embedded tokens; cos / sin [M, 1, R] the step's
        RoPE tables) -> (x, y): the residual stream before the last layer's output y is
        added, as the separate calls' loop leaves them. One kernel job for the step."""
        m, d, f = x.shape[0], self.d, self.ffn
        hq, hkv, dim = self.heads, self.kv_heads, self.dim
        cache, st = step.cache, step.scratch
        xn = ggml.dense(x).numpy().copy()  # [M, d] the residual stream, updated in place
        h, s = np.empty((m, d), np.float32), np.empty((m, f), np.float32)
        qkv_out = np.empty((m, (hq + 2 * hkv) * dim), np.float32)
        outs = (qkv_out, np.empty((m, d), np.float32), np.empty((m, 2 * f), np.float32),
                np.empty((m, d), np.float32))  # y: the last, each layer's output
        ins = (d, hq * dim, d, f)
        mats = tuple(mat(q.parts, q.work, q.ints, inputs, m, k, out)
                     for q, inputs, k, out in zip(self.first, self.inputs, ins, outs))
        at = Attn(np.empty((m, hq, dim), np.float32), np.empty((m, hkv, dim), np.float32),
                  np.empty((m, hkv, dim), np.float32),
                  cpu_write.rows(step.layer_slots(0), torch.int64),
                  np.empty((m, hq, dim), np.float32), np.float32(self.model.scale),
                  np.float32(0.0))
        cos_rows = ggml.dense(cos[:, 0]).numpy()  # [M, R]
        sin_rows = ggml.dense(sin[:, 0]).numpy()
        kplanes, vplanes = ggml.plane_views(cache, 0)
        side_k, side_v, sides, coding, qsize, osize = self._terms(cache)
        n = len(self.norms)
        ctr, res = np.zeros((n, PHASES, 8), np.int64), np.zeros(RES, np.int64)
        helpers = pool()
        helpers.run(step_job, (
            ctr, res, self.first[0].data, self.eps, xn, h, s, self.norms, mats, self.parts,
            self.works, qkv_out.reshape(m, hq + 2 * hkv, dim), hq + hkv, cos_rows, sin_rows, at,
            kplanes, vplanes, ggml.geom(cache, 0, cpu._tile_tokens(dim, dim)),
            st.job(hq // hkv, dim), side_k, side_v, sides, cpu_write.SHRINKS, coding, qsize,
            osize), helpers.n, _nothing, ())
        if res[Q_BAD]:
            raise ValueError(f"query holds {int(res[Q_BAD])} non-finite values (NaN or inf)")
        ggml.raise_for(int(res[0]), cache)
        return torch.from_numpy(xn), torch.from_numpy(outs[3])
