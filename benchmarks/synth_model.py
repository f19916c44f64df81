"""Write a random-weight GGUF of a real model layout, for speed and memory work offline.

    python benchmarks/synth_model.py llama-3.2-1b q4_k_m /work/models/synth/llama-3.2-1b-q4_k_m.gguf
    python benchmarks/synth_model.py smollm2-135m q8_0 /tmp/smollm2-q8_0.gguf

Layouts: smollm2-135m, llama-3.2-1b, llama-3.1-8b (their shapes, SmolLM2's tokenizer and
vocabulary so kvslim can run them: the text is garbage, the cost is real). Type mixes:
q4_0, q8_0 (every matrix, through gguf.quants.quantize of random floats), q4_k_m (Q4_K
for most matrices; Q6_K for attn_v and ffn_down of the first and last eighth and every
third layer, as llama.cpp's Q4_K_M does, and for the output head or a tied embedding;
Q5_0 and Q8_0 instead where rows are not whole 256-value superblocks, as llama.cpp does;
written as random K-quant blocks whose fp16 scales are set to small finite values, so
every weight has the magnitude of a trained one, about 0.02). Tensors are streamed to
the file one at a time: an 8B file never sits in memory. Keep outputs out of the repo.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T = gguf.GGMLQuantizationType
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Layout:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    tied: bool
    rope_base: float
    context_length: int = 8192


LAYOUTS = {
    "smollm2-135m": Layout(576, 30, 9, 3, 1536, tied=True, rope_base=100000.0),
    "llama-3.2-1b": Layout(2048, 16, 32, 8, 8192, tied=True, rope_base=500000.0),
    "llama-3.1-8b": Layout(4096, 32, 32, 8, 14336, tied=False, rope_base=500000.0),
}
MIXES = ("q4_0", "q8_0", "q4_k_m")

# byte offsets of a K-quant block's fp16 scales, and the scale that gives weights of about
# WEIGHT_STD with random codes and sub-scales
_K_SCALES = {T.Q4_K: ((0, 2), WEIGHT_STD / 32 / 8), T.Q6_K: ((208,), WEIGHT_STD / 64 / 16)}


def tensor_types(layout: Layout, mix: str) -> dict[str, T]:
    """GGUF type of every matrix of the layout under ``mix``."""
    names = ["token_embd.weight"] + ([] if layout.tied else ["output.weight"])
    for i in range(layout.n_layers):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate", "ffn_up", "ffn_down")]
    if mix != "q4_k_m":
        return dict.fromkeys(names, {"q4_0": T.Q4_0, "q8_0": T.Q8_0}[mix])
    n = layout.n_layers
    more_bits = {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}
    types = {}
    for name in names:
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        head = name == "output.weight" or (name == "token_embd.weight" and layout.tied)
        bits = layer in more_bits and name.endswith(("attn_v.weight", "ffn_down.weight"))
        types[name] = T.Q6_K if head or bits else T.Q4_K
    return types


def random_matrix(qt: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes] of ``qt`` blocks (quantized random floats, or random K-quant
    blocks with set scales), generated in slices to bound memory."""
    n, size = gguf.GGML_QUANT_SIZES[qt]
    out = np.empty((rows, cols // n * size), dtype=np.uint8)
    step = max(1, (1 << 24) // cols)
    for r in range(0, rows, step):
        m = min(step, rows - r)
        if qt in _K_SCALES:
            offsets, scale = _K_SCALES[qt]
            b = rng.integers(0, 256, (m, cols // n, size), dtype=np.uint8)
            for off in offsets:
                d = (scale * (0.5 + rng.random((m, cols // n)))).astype(np.float16)
                b[:, :, off:off + 2] = d.view(np.uint8).reshape(m, cols // n, 2)
            out[r:r + m] = b.reshape(m, -1)
        else:
            x = (rng.standard_normal((m, cols), dtype=np.float32) * WEIGHT_STD)
            out[r:r + m] = quantize(x, qt).view(np.uint8).reshape(m, -1)
    return out


def copy_tokenizer(w: gguf.GGUFWriter, source: Path) -> int:
    """SmolLM2's tokenizer.* metadata into ``w``; returns the vocabulary size."""
    reader = gguf.GGUFReader(source)
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def write(layout_name: str, mix: str, path: Path, seed: int = 0, layers: int | None = None) -> Path:
    """The GGUF of ``layout_name`` in ``mix`` at ``path`` (``layers``: fewer layers, for tests)."""
    from dataclasses import replace

    from kvslim import store

    lay = LAYOUTS[layout_name]
    lay = replace(lay, n_layers=layers) if layers else lay
    rng = np.random.default_rng(seed)
    hd = lay.d_model // lay.n_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic {layout_name} {mix}")
    vocab = copy_tokenizer(w, store.resolve("smollm2", pull_missing=True))
    for key, value in {"block_count": lay.n_layers, "context_length": lay.context_length,
                       "embedding_length": lay.d_model, "feed_forward_length": lay.ffn_dim,
                       "attention.head_count": lay.n_heads, "attention.head_count_kv": lay.n_kv_heads,
                       "vocab_size": vocab, "rope.dimension_count": hd}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", lay.rope_base)
    w.add_file_type({"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[mix])
    types = tensor_types(lay, mix)
    q, kv = lay.n_heads * hd, lay.n_kv_heads * hd
    shapes = {"token_embd.weight": (vocab, lay.d_model), "output.weight": (vocab, lay.d_model)}
    for i in range(lay.n_layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_q.weight": (q, lay.d_model), p + "attn_k.weight": (kv, lay.d_model),
                   p + "attn_v.weight": (kv, lay.d_model), p + "attn_output.weight": (lay.d_model, q),
                   p + "ffn_gate.weight": (lay.ffn_dim, lay.d_model),
                   p + "ffn_up.weight": (lay.ffn_dim, lay.d_model),
                   p + "ffn_down.weight": (lay.d_model, lay.ffn_dim)}
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(lay.n_layers)
                                      for n in ("attn", "ffn")]
    order = [(n, types[n]) for n in types] + [(n, None) for n in norms]
    # a row that whole 256-value superblocks do not cover gets llama.cpp's fallback type
    fallback = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}
    order = [(n, fallback[qt] if qt in fallback and shapes[n][1] % 256 else qt) for n, qt in order]
    for name, qt in order:
        if qt is None:
            w.add_tensor_info(name, (lay.d_model,), np.dtype(np.float32), 4 * lay.d_model)
        else:
            rows, cols = shapes[name]
            n, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(name, (rows, cols // n * size), np.dtype(np.uint8),
                              rows * cols // n * size, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, qt in order:
        if qt is None:
            w.write_tensor_data(np.ones(lay.d_model, dtype=np.float32))
        else:
            w.write_tensor_data(random_matrix(qt, *shapes[name], rng))
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layout", choices=sorted(LAYOUTS))
    ap.add_argument("mix", choices=MIXES)
    ap.add_argument("out", type=Path, help="the .gguf to write (under /tmp or /work/models, not the repo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, help="fewer layers than the layout (a small test file)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = write(args.layout, args.mix, args.out, args.seed, args.layers)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
