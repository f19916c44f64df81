"""GGUF loading: errors on bad files, config from metadata, weights' shapes and values.

Synthetic files are written with gguf.GGUFWriter; the real SmolLM2 file is checked
against its published hyperparameters.
"""
from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvslim.gguf_loader import (
    SUPPORTED_ARCHS,
    GGUFError,
    ModelConfig,
    _check_tensor_extents,
    expected_shapes,
    load_config,
    load_weights,
    open_gguf,
    unpermute_qk,
    weight_stats,
)

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16

# Tiny llama: 2 layers, d_model 64, 4 heads of 16, 2 kv heads, ffn 96, vocab 128.
TINY = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab=128, ctx=256)


def hf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, copied: HF rows -> llama.cpp rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_arrays(seed: int = 0, qkv_bias: bool = False, tied: bool = True) -> dict[str, np.ndarray]:
    """float32 weights in torch layout ([out, in]) for TINY."""
    rng = np.random.default_rng(seed)
    d, hd, ffn, vocab = TINY["d_model"], TINY["d_model"] // TINY["n_heads"], TINY["ffn_dim"], TINY["vocab"]
    q, kv = TINY["n_heads"] * hd, TINY["n_kv_heads"] * hd
    a = {"token_embd.weight": rng.standard_normal((vocab, d)), "output_norm.weight": rng.standard_normal(d)}
    if not tied:
        a["output.weight"] = rng.standard_normal((vocab, d))
    for i in range(TINY["n_layers"]):
        p = f"blk.{i}."
        a |= {
            p + "attn_norm.weight": rng.standard_normal(d),
            p + "attn_q.weight": rng.standard_normal((q, d)),
            p + "attn_k.weight": rng.standard_normal((kv, d)),
            p + "attn_v.weight": rng.standard_normal((kv, d)),
            p + "attn_output.weight": rng.standard_normal((d, q)),
            p + "ffn_norm.weight": rng.standard_normal(d),
            p + "ffn_gate.weight": rng.standard_normal((ffn, d)),
            p + "ffn_up.weight": rng.standard_normal((ffn, d)),
            p + "ffn_down.weight": rng.standard_normal((d, ffn)),
        }
        if qkv_bias:
            a |= {p + "attn_q.bias": rng.standard_normal(q), p + "attn_k.bias": rng.standard_normal(kv),
                  p + "attn_v.bias": rng.standard_normal(kv)}
    return {k: v.astype(np.float32) for k, v in a.items()}


def storage_type(name: str) -> gguf.GGMLQuantizationType | None:
    """Mix of formats like a real file: norms F32, ffn Q8_0, embeddings F16, attention F32."""
    if "ffn_" in name and name.endswith(".weight") and "norm" not in name:
        return Q8_0
    if name.startswith(("token_embd", "output.")):
        return F16
    return None


def write_tiny(
    path: Path,
    arch: str = "llama",
    arrays: dict[str, np.ndarray] | None = None,
    skip_keys: tuple[str, ...] = (),
    extra_keys: dict | None = None,
    tokens: int | None = None,
) -> dict[str, np.ndarray]:
    arrays = tiny_arrays() if arrays is None else arrays
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        f"{arch}.block_count": TINY["n_layers"],
        f"{arch}.context_length": TINY["ctx"],
        f"{arch}.embedding_length": TINY["d_model"],
        f"{arch}.feed_forward_length": TINY["ffn_dim"],
        f"{arch}.attention.head_count": TINY["n_heads"],
        f"{arch}.attention.head_count_kv": TINY["n_kv_heads"],
        f"{arch}.vocab_size": TINY["vocab"],
    }
    for k, v in keys.items():
        if k not in skip_keys:
            w.add_uint32(k, v)
    if f"{arch}.attention.layer_norm_rms_epsilon" not in skip_keys:
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_name("tiny")
    for k, v in (extra_keys or {}).items():
        w.add_string(k, v) if isinstance(v, str) else (w.add_float32(k, v) if isinstance(v, float) else w.add_uint32(k, v))
    if tokens is not None:
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(tokens)])
    for name, arr in arrays.items():
        qtype = storage_type(name)
        if qtype is None:
            w.add_tensor(name, arr)
        elif qtype == F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


@pytest.fixture
def tiny_path(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    return path


# ---------------------------------------------------------------------------
# Bad files


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="not a file"):
        open_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04 this is a zip, not a model" * 10])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match="not a GGUF file") as e:
        open_gguf(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["version", "kv data", "tensor infos", "tensor data", "last byte"])
def test_truncated_file(tiny_path, where):
    data = tiny_path.read_bytes()
    reader = open_gguf(tiny_path)
    n = {
        "version": 6,
        "kv data": 40,
        "tensor infos": reader.tensors[3].field.offset + 5,
        "tensor data": (reader.data_offset + len(data)) // 2,
        "last byte": len(data) - 1,
    }[where]
    cut = tiny_path.with_name("cut.gguf")
    cut.write_bytes(data[:n])
    with pytest.raises(GGUFError, match="truncated") as e:
        open_gguf(cut)
    assert str(cut) in str(e.value)


def test_tensor_extent_check_names_tensor(tiny_path, tmp_path):
    # The reader of this gguf version already fails on short data; the extent check
    # guards readers that map lazily. Check it on a full reader against a shorter file.
    reader = open_gguf(tiny_path)
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_path.read_bytes()[:-100])
    last = max(reader.tensors, key=lambda t: t.data_offset + t.n_bytes)
    with pytest.raises(GGUFError, match=f"tensor '{last.name}'"):
        _check_tensor_extents(reader, short)


def test_corrupt_header(tiny_path):
    data = bytearray(tiny_path.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # kv_count: absurd
    tiny_path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        open_gguf(tiny_path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny(path, arch="gpt2")
    with pytest.raises(GGUFError, match="unsupported architecture 'gpt2'") as e:
        load_config(path)
    for arch in SUPPORTED_ARCHS:
        assert arch in str(e.value)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.context_length",
                                 "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon"])
def test_missing_required_key(tmp_path, key):
    path = tmp_path / "nokey.gguf"
    write_tiny(path, skip_keys=(key,))
    with pytest.raises(GGUFError, match=f"missing required metadata key '{key}'") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_tensor(tmp_path):
    arrays = tiny_arrays()
    del arrays["blk.1.ffn_up.weight"]
    path = tmp_path / "notensor.gguf"
    write_tiny(path, arrays=arrays)
    reader = open_gguf(path)
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_weights(reader, ModelConfig.from_gguf(reader), progress=False)


def test_tensor_shape_mismatch(tmp_path):
    arrays = tiny_arrays()
    arrays["blk.0.attn_k.weight"] = arrays["blk.0.attn_q.weight"]  # 4 heads of rows, metadata says 2
    path = tmp_path / "badshape.gguf"
    write_tiny(path, arrays=arrays)
    reader = open_gguf(path)
    with pytest.raises(GGUFError, match=r"'blk.0.attn_k.weight' has shape \[64, 64\], expected \[32, 64\]"):
        load_weights(reader, ModelConfig.from_gguf(reader), progress=False)


# ---------------------------------------------------------------------------
# Config


def test_tiny_config(tiny_path):
    c = load_config(tiny_path)
    assert (c.arch, c.name, c.n_layers, c.d_model) == ("llama", "tiny", 2, 64)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim, c.n_rep) == (4, 2, 16, 16, 2)
    assert (c.ffn_dim, c.vocab_size, c.context_length) == (96, 128, 256)
    assert c.rope_base == 500000.0 and c.rope_dim == 16 and c.rope_style == "normal"
    assert c.rms_eps == pytest.approx(1e-6)
    assert c.tied_output and not c.qkv_bias and c.rope_scaling_type is None


def test_config_optional_keys(tmp_path):
    path = tmp_path / "opt.gguf"
    write_tiny(path, arrays=tiny_arrays(tied=False), skip_keys=("llama.vocab_size",), tokens=TINY["vocab"],
               extra_keys={"llama.attention.key_length": 16, "llama.rope.scaling.type": "linear",
                           "llama.rope.scaling.factor": 4.0})
    c = load_config(path)
    assert c.vocab_size == 128  # from the token list
    assert not c.tied_output
    assert (c.rope_scaling_type, c.rope_scaling_factor) == ("linear", 4.0)


def test_qwen2_config_uses_neox_and_bias(tmp_path):
    path = tmp_path / "qwen2.gguf"
    write_tiny(path, arch="qwen2", arrays=tiny_arrays(qkv_bias=True))
    c = load_config(path)
    assert c.rope_style == "neox" and c.qkv_bias
    w = load_weights(open_gguf(path), c, progress=False)
    assert w["blk.1.attn_k.bias"].shape == (32,)


def test_inconsistent_heads_rejected(tmp_path):
    path = tmp_path / "heads.gguf"
    write_tiny(path, skip_keys=("llama.attention.head_count_kv",), extra_keys={"llama.attention.head_count_kv": 3})
    with pytest.raises(GGUFError, match="not a multiple of n_kv_heads 3"):
        load_config(path)


def test_weight_stats_counts_without_dequantizing(tiny_path):
    arrays = tiny_arrays()
    stats = weight_stats(open_gguf(tiny_path))
    assert stats.n_params == sum(a.size for a in arrays.values())
    expect_bytes = sum(
        a.size * {None: 4, F16: 2, Q8_0: 34 / 32}[storage_type(n)] for n, a in arrays.items()
    )
    assert stats.n_bytes == expect_bytes and stats.n_tensors == len(arrays)


# ---------------------------------------------------------------------------
# Weights


def test_weights_shapes_and_values(tiny_path):
    arrays = tiny_arrays()
    reader = open_gguf(tiny_path)
    # ggml order on disk: a [out, in] matrix has ne = [in, out].
    ne = {t.name: t.shape.tolist() for t in reader.tensors}
    assert ne["blk.0.attn_k.weight"] == [64, 32]
    config = ModelConfig.from_gguf(reader)
    w = load_weights(reader, config, progress=False)
    assert set(w) == set(arrays) == set(expected_shapes(config))
    for name, ref in arrays.items():
        got = w[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == ref.shape, name
        qtype = storage_type(name)
        if qtype is None:  # F32: bit exact, same orientation
            assert np.array_equal(got.numpy(), ref), name
        elif qtype == F16:
            assert np.array_equal(got.numpy(), ref.astype(np.float16).astype(np.float32)), name
        else:  # Q8_0: half a step of rounding, plus the fp16 scale's error times |q| <= 127
            step = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            err = np.abs(got.numpy().reshape(-1, 32) - ref.reshape(-1, 32))
            assert (err <= step * (0.5 + 127 * 2.0**-11)).all(), name
            assert (err.max(axis=1) > 0).any(), name  # really quantized


def test_weights_dtype_and_writable(tiny_path):
    reader = open_gguf(tiny_path)
    w = load_weights(reader, ModelConfig.from_gguf(reader), dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    w32 = load_weights(reader, ModelConfig.from_gguf(reader), progress=False)
    w32["output_norm.weight"].add_(1)  # own memory, not the read-only map
    assert not np.array_equal(w32["output_norm.weight"].numpy(), tiny_arrays()["output_norm.weight"])


def rope(x: torch.Tensor, style: str, base: float = 10000.0) -> torch.Tensor:
    """x: [S, H, D] at positions 0..S-1, rotated the llama.cpp 'normal' or 'neox' way."""
    s, _, d = x.shape
    theta = torch.arange(s, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]  # [S, 1, D/2]
    if style == "neox":
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def test_rope_styles_match_hf_attention(tmp_path):
    """Llama-arch file weights + 'normal' RoPE == HF weights + NEOX RoPE; neox_qk=True restores HF rows."""
    hf = tiny_arrays(seed=3)  # read as Hugging Face q_proj / k_proj
    in_file = dict(hf)
    for i in range(TINY["n_layers"]):
        in_file[f"blk.{i}.attn_q.weight"] = hf_permute(hf[f"blk.{i}.attn_q.weight"], TINY["n_heads"])
        in_file[f"blk.{i}.attn_k.weight"] = hf_permute(hf[f"blk.{i}.attn_k.weight"], TINY["n_kv_heads"])
    path = tmp_path / "perm.gguf"
    write_tiny(path, arrays=in_file)
    reader = open_gguf(path)
    config = ModelConfig.from_gguf(reader)
    w_file = load_weights(reader, config, dtype=torch.float64, progress=False)
    w_neox = load_weights(reader, config, dtype=torch.float64, progress=False, neox_qk=True)

    x = torch.randn(7, TINY["d_model"], dtype=torch.float64)
    hd = config.head_dim

    def scores(wq, wk, style):  # [H_kv, S, S] for the first query head of each group
        q = rope((x @ wq.T).view(7, config.n_heads, hd), style)[:, :: config.n_rep]
        k = rope((x @ wk.T).view(7, config.n_kv_heads, hd), style)
        return torch.einsum("shd,thd->hst", q, k)

    ref = scores(torch.from_numpy(hf["blk.0.attn_q.weight"]).double(),
                 torch.from_numpy(hf["blk.0.attn_k.weight"]).double(), "neox")
    got_normal = scores(w_file["blk.0.attn_q.weight"], w_file["blk.0.attn_k.weight"], config.rope_style)
    got_neox = scores(w_neox["blk.0.attn_q.weight"], w_neox["blk.0.attn_k.weight"], "neox")
    assert config.rope_style == "normal"
    torch.testing.assert_close(got_normal, ref)
    torch.testing.assert_close(got_neox, ref)
    assert torch.equal(w_neox["blk.1.attn_k.weight"], torch.from_numpy(hf["blk.1.attn_k.weight"]).double())


def test_unpermute_inverts_converter_permute_for_bias():
    b = torch.arange(2 * 16, dtype=torch.float32)
    assert torch.equal(unpermute_qk(torch.from_numpy(hf_permute(b.numpy(), 2)), 2), b)


# ---------------------------------------------------------------------------
# Real model


@pytest.mark.slow
def test_smollm2_config(smollm2_gguf):
    c = load_config(smollm2_gguf)
    assert (c.arch, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.d_model, c.ffn_dim, c.vocab_size, c.context_length) == (576, 1536, 49152, 8192)
    assert c.tied_output and not c.qkv_bias and c.rope_style == "normal"
    assert c.rope_base == 100000.0 and c.file_type_name == "Q4_1"
    assert c.n_params == 134_515_008
    assert c.weights_bytes < smollm2_gguf.stat().st_size


@pytest.mark.slow
def test_smollm2_weights(smollm2_gguf):
    reader = open_gguf(smollm2_gguf)
    config = ModelConfig.from_gguf(reader)
    w = load_weights(reader, config, progress=False)
    assert "output.weight" not in w and w["token_embd.weight"].shape == (49152, 576)
    assert w["blk.29.ffn_down.weight"].shape == (576, 1536)
    assert all(torch.isfinite(t).all() for t in w.values())
    # RMSNorm gains of a trained model sit around 1, not noise around 0.
    assert 0.1 < w["output_norm.weight"].abs().mean() < 10
    assert math.isclose(sum(t.numel() for t in w.values()), config.n_params)


def _same_as_gguf_reader(path):
    """open_gguf's reader (its own header slicing) holds what gguf.GGUFReader holds."""
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, a in theirs.fields.items():
        b = ours.fields[name]
        assert (b.offset, b.types, list(b.data), len(b.parts)) == (a.offset, a.types, a.data, len(a.parts)), name
        assert all(b.contents(i) == a.contents(i) for i in (0, -1)) if a.data else True, name
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(b.parts, a.parts)), name
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(theirs.tensors, ours.tensors):
        assert (b.tensor_type, b.data_offset, b.n_bytes) == (a.tensor_type, a.data_offset, a.n_bytes)
        assert b.data.dtype == a.data.dtype and np.array_equal(b.data, a.data), a.name
    assert ours.data_offset == theirs.data_offset and ours.alignment == theirs.alignment


def test_reader_equals_gguf_reader(tiny_path):
    _same_as_gguf_reader(tiny_path)


@pytest.mark.slow
def test_reader_equals_gguf_reader_on_smollm2(smollm2_gguf):
    _same_as_gguf_reader(smollm2_gguf)



def test_array_values_in_bulk_equal_gguf_contents(tmp_path):
    """array_values (the bulk read of an array field) gives what gguf's own reader gives,
    and gguf's contents() works on open_gguf's lazily made parts."""
    from kvslim.gguf_loader import array_values

    path = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["a", "", "héllo ▁x", "<0x0A>"] * 50)
    w.add_array("t.ints", list(range(-5, 300)))
    w.add_array("t.floats", [0.5 * i for i in range(77)])
    w.add_array("t.bools", [True, False, True])
    w.add_tensor("x", np.zeros((2, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same_as_gguf_reader(path)
    ours, theirs = open_gguf(path), gguf.GGUFReader(path)
    for key in ("t.strings", "t.ints", "t.floats", "t.bools"):
        expected = theirs.fields[key].contents()
        assert ours.fields[key].contents() == expected, key
        got = array_values(ours.fields[key])
        assert (got if isinstance(got, list) else got.tolist()) == expected, key
    assert array_values(ours.fields["general.architecture"]) is None
