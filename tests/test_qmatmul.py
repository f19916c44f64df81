"""kernels.qmatmul and kvslim.weights against gguf's dequantization + a float64 matmul."""

import gguf
import numpy as np
import pytest
import torch

from kvslim.gguf_loader import open_gguf, unpermute_qk
from kvslim.kernels import qmatmul as qm
from kvslim.kernels.qtypes import CODES
from kvslim.kernels.qmatmul_ref import dequantize_ref, matmul_ref, random_blocks
from kvslim.weights import Embedding, QLinear, QTensor, held_bytes, linear

T = gguf.GGMLQuantizationType

def as_file(*blocks: np.ndarray, pad: int = 7) -> tuple[np.ndarray, list[int]]:
    """One read-only byte array holding the tensors at odd offsets, like a mapped GGUF."""
    parts, offsets, at = [], [], 0
    for b in blocks:
        parts += [np.zeros(pad, np.uint8), b.reshape(-1)]
        offsets.append(at + pad)
        at += pad + b.size
    data = np.concatenate(parts)
    data.flags.writeable = False
    return data, offsets


def qtensor(qt, rows, cols, rng, hd=0):
    b = random_blocks(qt, rows, cols, rng)
    data, (off,) = as_file(b)
    return QTensor(data, off, qt, (rows, cols), hd=hd), b


def _cols(qt) -> int:
    return 512 if gguf.GGML_QUANT_SIZES[qt][0] == 256 else 96 + 32 * 3  # K-quants need 256s


@pytest.mark.parametrize("qt", qm.TYPES, ids=lambda t: t.name)
def test_dequantize_rows_equals_gguf(qt):
    rng = np.random.default_rng(int(qt))
    rows, cols = 37, _cols(qt)
    q, b = qtensor(qt, rows, cols, rng)
    ref = dequantize_ref(b, qt, (rows, cols))
    got = q.dequantize().numpy()
    # ggml's float32 formulas, summed in another order at most: a few ulps
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("qt", qm.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_qlinear_matches_reference(qt, m):
    """GEMV (m <= GEMV_MAX_ROWS) and dequantized tiles + GEMM (beyond) against float64."""
    rng = np.random.default_rng(1000 * m + int(qt))
    rows, cols = 131, _cols(qt)  # rows: no multiple of the thread split
    q, b = qtensor(qt, rows, cols, rng)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    y = QLinear([q])(torch.from_numpy(x)).numpy()
    ref = matmul_ref(b, qt, (rows, cols), x)
    # float32 accumulation over `cols` products of unit-scale terms
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())



@pytest.mark.parametrize("qt", [T.Q4_0, T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_fused_dots_and_row_buffer_agree_with_reference(qt):
    """The fused block dots (default) and the row-buffer GEMV (fused=False, the baseline
    benchmarks/weights.py times) both match float64, on a q/k-permuted part."""
    rng = np.random.default_rng(int(qt) + 31)
    rows, cols, hd = 128, _cols(qt) * 2, 64
    q, b = qtensor(qt, rows, cols, rng, hd=hd)
    lin = QLinear([q])
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ unpermute_qk(torch.from_numpy(dequantize_ref(b, qt, (rows, cols))),
                                               rows // hd).numpy().T
    for fused in (True, False):
        y = np.empty((3, rows), np.float32)
        qm.gemv(lin.data, lin.parts, lin.work, x, y, fused=fused)
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=f"{fused=}")


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_decode_batch_gives_each_row_its_solo_result(qt):
    """Up to GEMV_MAX_ROWS input rows (a decode batch), each output row is summed alone:
    bit-identical to computing that row by itself, so batching cannot flip a greedy token."""
    from kvslim.weights import GEMV_MAX_ROWS

    rng = np.random.default_rng(int(qt) + 77)
    q, _ = qtensor(qt, 131, _cols(qt), rng)
    lin = QLinear([q])
    x = torch.from_numpy(rng.standard_normal((GEMV_MAX_ROWS, _cols(qt))).astype(np.float32))
    batched = lin(x)
    for r in range(GEMV_MAX_ROWS):
        assert torch.equal(lin(x[r:r + 1]), batched[r:r + 1]), f"row {r} differs when batched"



@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_in_a_step_each_row_gets_its_result_whatever_shares_the_step(qt):
    """Inside ``step_rows(d)`` the first d rows (decode) give what each gives alone, in
    any number (groups of GEMV_MAX_ROWS), and a prefill row gives the same bits whether it
    shares its GEMM with 0, 4 or 40 other rows (torch's GEMM from GEMM_MIN_ROWS rows on:
    this checks that the BLAS of the machine that runs keeps a row's sums the same)."""
    from kvslim.weights import GEMV_MAX_ROWS, step_rows

    rng = np.random.default_rng()
    cols = _cols(qt)
    q, _ = qtensor(qt, 131, cols, rng)
    lin = QLinear([q])
    decode = GEMV_MAX_ROWS + 3
    x = torch.from_numpy(rng.standard_normal((decode + 41, cols)).astype(np.float32))
    with step_rows(decode):
        mixed = lin(x)  # 19 decode rows, then 41 prefill rows
        for r in (0, 5, decode - 1):
            assert torch.equal(mixed[r:r + 1], lin(x[r:r + 1])), f"decode row {r}"
    with step_rows(0):  # prefill rows only, alone or with a few others
        prefill = x[decode:]
        for rows in (slice(0, 1), slice(3, 8), slice(0, 41)):
            assert torch.equal(mixed[decode:][rows], lin(prefill[rows])), f"prefill rows {rows}"


@pytest.mark.parametrize("m", [1, 9])
def test_parts_and_qk_permutation(m):
    """q (permuted, Q4_K), k (permuted, Q6_K) and v (Q8_0) as one matmul equal the
    un-permuted float weights stacked, biases included; the tiled path too."""
    rng = np.random.default_rng(7)
    hd, d = 64, 256
    (bq, bk, bv) = (random_blocks(t, r, d, rng) for t, r in ((T.Q4_K, 4 * hd), (T.Q6_K, 2 * hd),
                                                             (T.Q8_0, 2 * hd)))
    data, offs = as_file(bq, bk, bv)
    parts = [QTensor(data, offs[0], T.Q4_K, (4 * hd, d), hd=hd),
             QTensor(data, offs[1], T.Q6_K, (2 * hd, d), hd=hd),
             QTensor(data, offs[2], T.Q8_0, (2 * hd, d))]
    w = torch.cat([unpermute_qk(torch.from_numpy(dequantize_ref(bq, T.Q4_K, (4 * hd, d))), 4),
                   unpermute_qk(torch.from_numpy(dequantize_ref(bk, T.Q6_K, (2 * hd, d))), 2),
                   torch.from_numpy(dequantize_ref(bv, T.Q8_0, (2 * hd, d)))])
    bias = [torch.randn(4 * hd), torch.randn(2 * hd), torch.randn(2 * hd)]
    x = torch.randn(m, d)
    lin = linear(parts, bias)
    assert isinstance(lin, QLinear)
    ref = x.double() @ w.T + torch.cat(bias).double()
    torch.testing.assert_close(lin(x).double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(parts[0].dequantize().double(), w[:4 * hd], rtol=1e-6, atol=1e-7)


def test_embedding_rows_and_tied_head_counted_once():
    rng = np.random.default_rng(3)
    q, b = qtensor(T.Q6_K, 50, 256, rng)
    ids = torch.tensor([0, 49, 7, 7])
    ref = dequantize_ref(b, T.Q6_K, (50, 256))[ids.numpy()]
    emb = Embedding(q)
    np.testing.assert_allclose(emb(ids).numpy(), ref, rtol=1e-6, atol=1e-7)
    head = linear([q])
    assert held_bytes(emb.tensors + head.tensors) == q.nbytes == 50 * 210


def test_unsupported_parts_are_dequantized_dense():
    """A float tensor among the parts (a type without a kernel, dequantized at load) makes
    the whole matmul dense, still equal to the reference."""
    rng = np.random.default_rng(4)
    q, b = qtensor(T.Q4_0, 32, 64, rng)
    dense = torch.randn(16, 64)
    lin = linear([q, dense])
    x = torch.randn(3, 64)
    ref = x.double() @ torch.cat([torch.from_numpy(dequantize_ref(b, T.Q4_0, (32, 64))), dense.double()]).T
    torch.testing.assert_close(lin(x).double(), ref, rtol=0, atol=1e-4)


def test_real_k_quant_tensors(gemma3_gguf):
    """Real Q4_K, Q6_K, Q5_0, Q8_0 data (Gemma 3 270M): a slice of rows of each type."""
    reader = open_gguf(gemma3_gguf)
    data = reader.data.view(np.ndarray)
    seen = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.tensor_type in CODES and t.tensor_type not in seen:
            seen[t.tensor_type] = t
    assert {T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0} <= set(seen)
    rng = np.random.default_rng(5)
    for qt, t in seen.items():
        rows, cols = 97, int(t.shape[0])
        q = QTensor(data, int(t.data_offset), qt, (rows, cols), name=t.name)
        b = np.asarray(t.data[:rows])
        x = rng.standard_normal((2, cols)).astype(np.float32)
        ref = matmul_ref(b, qt, (rows, cols), x)
        y = QLinear([q])(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=t.name)
