"""A tiny random llama-family model written as a real GGUF (gguf.GGUFWriter), for fast tests.

The vocabulary is SentencePiece-style: <unk>, <s>, </s>, 256 byte tokens and a few
pieces, so any text encodes and any generated ids decode. Weights are float32 with
small variance so activations stay well scaled through the layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

PIECES = ["▁", "a", "b", "c", "▁a", "▁b", "ab", "▁the", "e", "h", "t", "th", "he"]


@dataclass(frozen=True)
class Tiny:
    arch: str = "llama"
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 96
    ctx: int = 256
    rope_base: float = 10000.0
    qkv_bias: bool = False
    tied: bool = True
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)  # unknown, control, byte, normal
    return tokens, scores, types


def arrays(t: Tiny, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights in torch layout ([out, in]), in the file's (llama.cpp) row order."""
    rng = np.random.default_rng(seed)
    d, hd, f = t.d_model, t.head_dim, t.ffn_dim
    n_vocab = len(vocab()[0])

    def mat(rows, cols):
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)

    a = {"token_embd.weight": rng.standard_normal((n_vocab, d)),
         "output_norm.weight": 1 + 0.1 * rng.standard_normal(d)}
    if not t.tied:
        a["output.weight"] = mat(n_vocab, d)
    for i in range(t.n_layers):
        p = f"blk.{i}."
        a |= {
            p + "attn_norm.weight": 1 + 0.1 * rng.standard_normal(d),
            p + "attn_q.weight": mat(t.n_heads * hd, d),
            p + "attn_k.weight": mat(t.n_kv_heads * hd, d),
            p + "attn_v.weight": mat(t.n_kv_heads * hd, d),
            p + "attn_output.weight": mat(d, t.n_heads * hd),
            p + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(d),
            p + "ffn_gate.weight": mat(f, d),
            p + "ffn_up.weight": mat(f, d),
            p + "ffn_down.weight": mat(d, f),
        }
        if t.qkv_bias:
            a |= {p + "attn_q.bias": 0.1 * rng.standard_normal(t.n_heads * hd),
                  p + "attn_k.bias": 0.1 * rng.standard_normal(t.n_kv_heads * hd),
                  p + "attn_v.bias": 0.1 * rng.standard_normal(t.n_kv_heads * hd)}
    return {k: v.astype(np.float32) for k, v in a.items()}


def write(path: Path, t: Tiny = Tiny(), seed: int = 0, chat_template: str | None = None) -> dict:
    """Write the model to ``path``; return its arrays."""
    w = gguf.GGUFWriter(str(path), t.arch)
    common_keys(w, t)
    if chat_template:
        w.add_chat_template(chat_template)
    a = arrays(t, seed)
    finish(w, a)
    return a


def common_keys(w: gguf.GGUFWriter, t: Tiny) -> None:
    """The hyperparameters and the vocabulary every tiny model writes."""
    arch = t.arch
    for key, value in {"block_count": t.n_layers, "context_length": t.ctx,
                       "embedding_length": t.d_model, "feed_forward_length": t.ffn_dim,
                       "attention.head_count": t.n_heads,
                       "attention.head_count_kv": t.n_kv_heads}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", t.eps)
    w.add_float32(f"{arch}.rope.freq_base", t.rope_base)
    w.add_name("tiny")
    tokens, scores, types = vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def finish(w: gguf.GGUFWriter, a: dict[str, np.ndarray]) -> None:
    """Add the tensors and write the file."""
    for name, arr in a.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load(path: Path):
    """(model, tokenizer) of a GGUF written by ``write``, on CPU."""
    from kvslim.gguf_loader import ModelConfig, open_gguf
    from kvslim.models import load_model
    from kvslim.tokenizer import Tokenizer

    reader = open_gguf(path)
    return load_model(reader, ModelConfig.from_gguf(reader), progress=False), Tokenizer.from_gguf(reader)
