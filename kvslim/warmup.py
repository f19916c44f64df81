"""Compile the CPU kernels a model's first tokens run, before the first token.

numba compiles each kernel on its first call and keeps it in its disk cache, so on a new
machine (or after an upgrade) the first answer would stall for the compile: the K/V
writer and attention at the first prompt, the quantized-weight matmuls and the Hadamard
rotation at the first token. ``warmup`` calls each of them once on tiny inputs of the
array types a model passes (read-only weight bytes, as mapped from the GGUF; float32
rows; a read-only or a stored shift), so the compile happens at load, where ``kvslim
run`` says so, and a later process only loads the cached code.

One compiled kernel serves every cache type (each branches on the type's code), so
``types`` only chooses which K/V block formats the attention warmup writes and reads.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from kvslim import formats
from kvslim.kernels import cpu, cpu_write, ggml, qmatmul
from kvslim.kernels.ggml import count_bad
from kvslim.kernels.rowops import NumbaOps
from kvslim.rotation import Rotation, rotate_rows, scaled_rotate_rows
from kvslim.weights import GEMV_MAX_ROWS, Embedding, QLinear, QTensor

__all__ = ["warmup", "needs_compile", "check_types", "DEFAULT_TYPES", "MESSAGE"]

DEFAULT_TYPES = ("f16", "q8_0", "q4_0")
MESSAGE = "compiling CPU kernels (once per machine, about 1.5 min on 2 cores)"


def warmup(types: tuple[str, ...] | list[str] = DEFAULT_TYPES) -> float:
    """Compile (or load from numba's cache) every CPU kernel; the seconds it took.
    ``auto`` (a pair chosen later by measured quality) warms the default types: one
    compiled kernel serves every type."""
    types = [t for t in types if t != "auto"] or list(DEFAULT_TYPES)
    check_types(types)
    t0 = time.perf_counter()
    for t in types:
        cpu.warmup(t, t)
    _long_write()
    _matmuls()
    from kvslim.models.fused import enabled
    if enabled():
        _layer_job(types[0])
    _row_ops()
    _rotation()
    _checks()
    return time.perf_counter() - t0


def check_types(types) -> None:
    bad = [t for t in types if t not in formats.TYPES]
    if bad:
        raise ValueError(f"unknown cache type {', '.join(bad)}; valid: {', '.join(formats.TYPES)}")


def _long_write() -> None:
    """A prompt's write, split over the writer's threads (each part checked first)."""
    n = 2 * cpu_write.PARALLEL_MIN_ROWS
    qk = formats.QK
    planes = ggml.tiny_planes("q8_0", n)
    rows = np.zeros((n, 1, qk), np.float32)
    cpu_write.write_arrays(rows, rows, np.arange(n, dtype=np.int64), planes, planes,
                           ggml.Geom(0, 1, 1, n, 1, 1, qk, 0), cpu_write.plain_sides(1, qk, qk))


def _matmuls() -> None:
    """The weight kernels: decode GEMV, prefill tiles, embedding rows (one type code
    serves all GGUF types, as for attention)."""
    qtype = GGMLQuantizationType.Q8_0
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = 32, block
    data = np.zeros(rows * cols // block * size, np.uint8)
    data.flags.writeable = False  # as the read-only mapped file
    w = QTensor(data, 0, int(qtype), (rows, cols))
    linear = QLinear([w])
    linear(torch.zeros(1, cols))  # GEMV
    qmatmul.quantize_rows(np.zeros((1, cols), np.float32))  # the integer dots' x, whatever runs here
    linear(torch.zeros(GEMV_MAX_ROWS + 1, cols))  # dequantized tiles + GEMM
    Embedding(w)(torch.zeros(2, dtype=torch.int64))


def _layer_job(cache_type: str) -> None:
    """A llama decode layer as one kernel job (``models.fused``): one layer of Q8_0
    blocks (head size 32, one head), one decode row on a one-page cache, through
    ``FusedLayers.run``, so the job sees a model's array types."""
    from types import SimpleNamespace

    from kvslim.attention import Attention, plan_attention
    from kvslim.cache import KVCache
    from kvslim.models.common import Rope, rope_inv_freq
    from kvslim.models.fused import FusedLayers

    qtype, d = GGMLQuantizationType.Q8_0, formats.QK
    row = d // 32 * GGML_QUANT_SIZES[qtype][1]
    data = np.zeros(8 * d * row, np.uint8)  # q, k, v, out, gate, up, down: 7 x 32 rows
    data.flags.writeable = False  # as the read-only mapped file

    def mats(first: int, n: int, hd: int = 0) -> list[QTensor]:
        return [QTensor(data, (first + i) * d * row, int(qtype), (d, d), hd) for i in range(n)]

    layer = SimpleNamespace(attn_norm=torch.ones(d), ffn_norm=torch.ones(d),
                            wqkv=QLinear(mats(0, 2, d) + mats(2, 1)), wo=QLinear(mats(3, 1)),
                            w13=QLinear(mats(4, 2)), w2=QLinear(mats(6, 1)))
    config = SimpleNamespace(d_model=d, ffn_dim=d, rms_eps=1e-5, rope_dim=0)
    model = SimpleNamespace(config=config, n_heads=1, n_kv_heads=1, head_dim=d, scale=1.0,
                            layers=[layer])
    plan = plan_attention("cpu", d, cache_type, cache_type, warn=False)
    cache = KVCache(1, 1, d, 1, page_size=16, cache_type_k=plan.effective_k,
                    cache_type_v=plan.effective_v)
    step = Attention(plan).begin(cache, [cache.new_sequence()], [1])
    cos, sin = Rope(rope_inv_freq(10000.0, d), torch.device("cpu"), torch.float32).at(
        step.positions)
    FusedLayers(model).run(torch.zeros(1, d), step, cos, sin)


def _row_ops() -> None:
    """A layer's norms, RoPE and SiLU / GELU * up (kernels.rowops, gemma's too), on a
    model's array types."""
    x, w = torch.zeros(1, 64), torch.ones(64)
    NumbaOps.norm(x, w, 1e-5)
    NumbaOps.add_norm(x, x, w, 1e-5)
    NumbaOps.norm_add_norm(x, x, w, w, 1e-6)
    NumbaOps.head_norm(torch.zeros(1, 3, 64), 1, w, w, 1, 1e-6)
    NumbaOps.rope(torch.zeros(1, 3, 64), 2, torch.zeros(1, 1, 64), torch.zeros(1, 1, 64))
    NumbaOps.silu_mul(torch.zeros(1, 128))
    NumbaOps.gelu_mul(torch.zeros(1, 128))


def _rotation() -> None:
    """The Hadamard butterfly: query rows (no shift), stored rows and outputs (a shift)."""
    rot = Rotation.make(64)
    x = torch.zeros(2, 1, 64)
    rotate_rows(x, rot)
    rotate_rows(torch.zeros(2, 1, 128)[..., :64], rot)  # q sliced out of a fused qkv output
    rotate_rows(x, rot, torch.zeros(1, 64), inverse=True, in_place=True)
    scaled_rotate_rows(x, rot, torch.ones(1, 64), torch.ones(1))  # queries: key scaling, fp8
    scaled_rotate_rows(x, rot, None, None)


def _checks() -> None:
    """The finite-query check attention runs on every call."""
    count_bad(np.zeros((1, 1, formats.QK), np.float32))


def needs_compile() -> bool:
    """Whether ``warmup`` will compile (no code of this machine in numba's disk cache for
    some kernel) rather than load cached code; True when the cache cannot be read."""
    import sys

    from numba.core.registry import CPUDispatcher

    from kvslim import rotation  # noqa: F401 - its kernel is checked
    from kvslim.kernels import qmatmul  # noqa: F401
    from kvslim.models.fused import enabled

    names = ("kvslim.kernels.cpu", "kvslim.kernels.cpu_write", "kvslim.kernels.qmatmul",
             "kvslim.kernels.ggml", "kvslim.kernels.rowops", "kvslim.rotation")
    if enabled():
        from kvslim.kernels import layer  # noqa: F401

        names += ("kvslim.kernels.layer",)
    kernels = {id(f): f for n in names for f in vars(sys.modules[n]).values()
               if isinstance(f, CPUDispatcher) and type(f._cache).__name__ != "NullCache"}
    return not all(_cached(f) for f in kernels.values())


def _cached(kernel) -> bool:
    """Some compiled code of ``kernel`` for this CPU is in its disk cache (numba's index
    keys are (signature, the codegen's CPU tuple, ...))."""
    try:
        index = kernel._cache._cache_file._load_index()
        magic = kernel.targetctx.codegen().magic_tuple()
        return any(key[1] == magic for key in index)
    except Exception:  # noqa: BLE001 - numba internals moved: say "compiling" to be safe
        return False
