"""kernels.qmatmul and kvslim.weights against gguf's dequantization + a float64 matmul."""

import gguf
import numpy as np
import pytest
import torch

from kvslim.gguf_loader import open_gguf, unpermute_qk
from kvslim.kernels import qmatmul as qm
from kvslim.kernels.qchoice import gemv_ints
from kvslim.kernels.qtypes import CODES
from kvslim.kernels.qmatmul_ref import dequantize_ref, matmul_ref, random_blocks
from kvslim.weights import GEMV_MAX_ROWS, Embedding, QLinear, QTensor, held_bytes, linear

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


def rounding_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[M, N]: how far x's rounding (per 32 values, quantize_rows) can move x @ w.T:
    |x - x'| <= d / 2 per value, so |(x - x') @ w.T| <= (d / 2) @ |w|.T."""
    _, d, _, _ = qm.quantize_rows(x)
    half = np.repeat(d.astype(np.float64) / 2, 32, axis=1)  # [M, K]
    return half @ np.abs(w[:, :half.shape[1]]).T


def assert_gemv_close(y, b, qt, shape, x, ints, w=None):
    """y against float64: within float32 summation error of x @ W.T (float dots), or of
    x' @ W.T and within x's rounding of x @ W.T (integer dots: x' is x's integer codes
    times their scales)."""
    w = dequantize_ref(b, qt, shape) if w is None else w
    ref = x.astype(np.float64) @ w.T
    fp = 2e-5 * np.abs(ref).max()
    if not ints:
        np.testing.assert_allclose(y, ref, rtol=0, atol=fp)
        return
    q, d, _, _ = qm.quantize_rows(x)
    xq = (x_codes(q).reshape(len(x), -1, 32) * d[:, :, None].astype(np.float64)).reshape(len(x), -1)
    np.testing.assert_allclose(y, xq @ w.T, rtol=0, atol=fp)
    assert (np.abs(y - ref) <= rounding_bound(w, x) + fp).all()


@pytest.mark.parametrize("qt", qm.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2, 7, 64])
@pytest.mark.parametrize("dots", ["float", "int"])
def test_qlinear_matches_reference(qt, m, dots):
    """GEMV (m <= GEMV_MAX_ROWS; the float or integer dots) and dequantized tiles + GEMM
    (beyond) against float64."""
    rng = np.random.default_rng(1000 * m + int(qt))
    rows, cols = 131, _cols(qt)  # rows: no multiple of the thread split
    q, b = qtensor(qt, rows, cols, rng)
    x = rng.standard_normal((m, cols)).astype(np.float32)
    lin = QLinear([q])
    lin.ints = gemv_ints(dots)
    y = lin(torch.from_numpy(x)).numpy()
    assert_gemv_close(y, b, qt, (rows, cols), x, m <= GEMV_MAX_ROWS and lin.ints[CODES[qt]])



@pytest.mark.parametrize("dots", ["float", "int"])
def test_x_prepared_inside_the_job_before_any_thread_reads_it(dots):
    """The GEMV's forms of x (codes and scales, or sums of 16) are filled by whichever
    thread enters the job first while the others wait: a stream of calls, each with a fresh
    x, on the helpers as they run between calls, every result against float64."""
    qt = T.Q4_K
    rng = np.random.default_rng(5150)
    rows, cols = 257, 512
    q, b = qtensor(qt, rows, cols, rng)
    w = dequantize_ref(b, qt, (rows, cols))
    lin = QLinear([q])
    lin.ints = gemv_ints(dots)
    for _ in range(60):
        x = rng.standard_normal((1, cols)).astype(np.float32) * rng.uniform(0.01, 100)
        y = lin(torch.from_numpy(x)).numpy()
        assert_gemv_close(y, b, qt, (rows, cols), x, dots == "int", w=w)


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


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("dots", ["float", "int"])
def test_a_decode_batch_gives_each_row_its_solo_result(qt, dots):
    """Up to GEMV_MAX_ROWS input rows (a decode batch), each output row is summed alone:
    bit-identical to computing that row by itself, so batching cannot flip a greedy token
    (the integer dots quantize each input row by itself)."""
    rng = np.random.default_rng(int(qt) + 77)
    q, _ = qtensor(qt, 131, _cols(qt), rng)
    lin = QLinear([q])
    lin.ints = gemv_ints(dots)
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
@pytest.mark.parametrize("dots", ["float", "int"])
def test_parts_and_qk_permutation(m, dots):
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
    lin.ints = gemv_ints(dots)
    y = (lin(x) - torch.cat(bias)).numpy()
    assert_gemv_close(y, None, None, None, x.numpy(), dots == "int", w=w.numpy())
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
        for dots in ("float", "int"):
            lin = QLinear([q])
            lin.ints = gemv_ints(dots)
            y = lin(torch.from_numpy(x)).numpy()
            assert_gemv_close(y, b, qt, (rows, cols), x, dots == "int")


# ---------------------------------------------------------------- integer dots


def x_codes(q: np.ndarray) -> np.ndarray:
    """int64 [M, K] codes of quantize_rows' two planes, q's first 2K bytes (per 32: high,
    then low)."""
    planes = q[:, :q.shape[1] // 2].reshape(len(q), -1, 2, 32).astype(np.int64)
    return (128 * planes[:, :, 0] + planes[:, :, 1]).reshape(len(q), -1)


def test_quantize_rows_codes_scales_and_sums():
    """x's codes per 32 values: within half a step of x, at most 127 x 128 in size, the
    step max |x| / (127 x 128), the high plane within [-127, 127], the low one [0, 127],
    the sums of each 16 the codes' (times the step); a zero block stays zero."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 32 * 5 + 7)) * rng.uniform(0.01, 100, (3, 1))).astype(np.float32)
    x[1, 32:64] = 0
    q, d, s, s16 = qm.quantize_rows(x)
    k = 32 * 5
    assert q.dtype == np.int8 and q.shape == (3, 4 * k + 28)
    planes = q[:, :2 * k].reshape(3, 5, 2, 32)
    assert np.abs(planes[:, :, 0]).max() <= 127 and planes[:, :, 1].min() >= 0 and (q[:, 4 * k:] == 0).all()
    c = x_codes(q[:, :4 * k]).reshape(3, 5, 32)
    # the same codes as int16 after the planes, each 32's even-indexed ones first
    words = q[:, 2 * k:4 * k].copy().view("<i2").reshape(3, 5, 32)
    np.testing.assert_array_equal(words, np.concatenate([c[:, :, 0::2], c[:, :, 1::2]], axis=-1))
    blocks = x[:, :k].reshape(3, 5, 32)
    np.testing.assert_allclose(d, np.abs(blocks).max(-1) / (127 * 128), rtol=1e-6)
    assert np.abs(c).max() == 127 * 128
    assert (np.abs(c * d[:, :, None].astype(np.float64) - blocks) <= d[:, :, None] * 0.501).all()
    np.testing.assert_allclose(s, d * c.sum(-1), rtol=1e-6)
    assert s16.shape == (3, 10)
    np.testing.assert_allclose(s16.reshape(3, 5, 2), d[:, :, None] * c.reshape(3, 5, 2, 16).sum(-1),
                               rtol=1e-6)
    assert (c[1, 1] == 0).all() and d[1, 1] == 0 and s[1, 1] == 0 and (s16[1, 2:4] == 0).all()


@pytest.mark.parametrize("qt", [qm.TYPES[c] for c in qm.IDOT_BLOCKS], ids=lambda t: t.name)
def test_integer_dots_every_length(qt):
    """The integer dots over 1, 3, 7 and 33 blocks of 32 values (the unrolled loop and its
    remainder) or 1 and 3 blocks of 256, three input rows, fresh random blocks, odd row
    counts: exact on x's integer codes, and within their rounding of float64 x @ W.T."""
    n = gguf.GGML_QUANT_SIZES[qt][0]
    rng = np.random.default_rng(int(qt) + 500)
    for cols in ([32, 96, 224, 1056] if n == 32 else [256, 768]):
        rows = 37
        q, b = qtensor(qt, rows, cols, rng)
        lin = QLinear([q])
        x = (rng.standard_normal((3, cols)) * rng.uniform(0.1, 10, (3, 1))).astype(np.float32)
        y = np.empty((3, rows), np.float32)
        qm.gemv(lin.data, lin.parts, lin.work, x, y, ints=qm.INT_DOTS)
        assert_gemv_close(y, b, qt, (rows, cols), x, True)


@pytest.mark.parametrize("qt", [qm.TYPES[c] for c in qm.IDOT_BLOCKS], ids=lambda t: t.name)
def test_integer_dots_portable_ir_equals_the_avx2_one(qt):
    """The plain vector IR (CPUs without AVX2) gives what vpmaddubsw / vpmaddwd (or, on a
    CPU with VNNI, vpdpbusd) give."""
    from numba import njit

    code = CODES[qt]
    fast, portable = qm._make_idot(*qm.IDOT_BLOCKS[code]), qm._make_idot(*qm.IDOT_BLOCKS[code], portable=True)

    @njit
    def both(d, rb, nb, xq, xd, xs, xs16, out):
        for j in range(out.shape[1]):
            out[0, j] = fast(d, j * rb, nb, xq, xd, xs, xs16)
            out[1, j] = portable(d, j * rb, nb, xq, xd, xs, xs16)

    rng = np.random.default_rng(int(qt) + 900)
    n = gguf.GGML_QUANT_SIZES[qt][0]
    cols = 7 * n
    q, _ = qtensor(qt, 19, cols, rng)
    xq, xd, xs, xs16 = qm.quantize_rows(rng.standard_normal((1, cols)).astype(np.float32))
    out = np.empty((2, 19), np.float32)
    both(q.data[q.offset:], q.row_bytes, cols // n, xq[0], xd[0], xs[0], xs16[0], out)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6, atol=1e-6 * np.abs(out[0]).max())


def test_vnni_cpu_runs_vpdpbusd():
    """Where numba targets a CPU with VNNI, the byte-plane dots are vpdpbusd (not the
    AVX2 sequence by a silent fallback); elsewhere none is emitted (it would fault)."""
    from numba import njit
    from numba.core.registry import cpu_target

    dot = qm._make_idot(*qm.IDOT_BLOCKS[CODES[gguf.GGMLQuantizationType.Q6_K]])

    @njit
    def one(d, nb, xq, xd, xs, xs16):
        return dot(d, 0, nb, xq, xd, xs, xs16)

    rng = np.random.default_rng(77)
    q, _ = qtensor(gguf.GGMLQuantizationType.Q6_K, 1, 256, rng)
    xq, xd, xs, xs16 = qm.quantize_rows(rng.standard_normal((1, 256)).astype(np.float32))
    one(q.data[q.offset:], 1, xq[0], xd[0], xs[0], xs16[0])
    asm = "".join(one.inspect_asm().values())
    assert ("vpdpbusd" in asm) == qm._vnni(cpu_target.target_context)
    assert ("vpmaddubsw" in asm) != qm._vnni(cpu_target.target_context)


def test_q4_k_words_dot_equals_the_planes_dot():
    """q4_K's dot on x's int16 codes (its nibbles as 16-bit words) gives the byte planes'
    dot: the same integer sums in the same lanes, the same float steps, up to the order
    LLVM gives the float additions (fast math lets it reassociate them; compiling for an
    AVX-512 CPU, a Zen 4, it orders the two loops' differently, with or without vpdpbusd:
    a few float32 ulps; 10cbfd7's exact check fails there too. Bit for bit on a Zen 3)."""
    from numba import njit

    planes = qm._make_idot(144, 256, lambda b, base, blk, x: qm._iemit_k4(b, base, blk, x, False))
    words = qm._I_Q4_K

    @njit
    def both(d, rb, nb, xq, xd, xs, xs16, out):
        for j in range(out.shape[1]):
            out[0, j] = planes(d, j * rb, nb, xq, xd, xs, xs16)
            out[1, j] = words(d, j * rb, nb, xq, xd, xs, xs16)

    rng = np.random.default_rng(913)
    q, _ = qtensor(gguf.GGMLQuantizationType.Q4_K, 23, 5 * 256, rng)
    x = (rng.standard_normal((1, 5 * 256)) * rng.uniform(0.1, 50, (1, 5 * 256))).astype(np.float32)
    xq, xd, xs, xs16 = qm.quantize_rows(x)
    out = np.empty((2, 23), np.float32)
    both(q.data[q.offset:], q.row_bytes, 5, xq[0], xd[0], xs[0], xs16[0], out)
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6, atol=1e-6 * np.abs(out[0]).max())


def test_gemv_choice_env_measure_and_disk(monkeypatch, tmp_path):
    """KVSLIM_QDOT forces a dot; auto measures once, keeps the choice on disk keyed by the
    machine, and a later process reads it instead of measuring; a bad value is an error."""
    from kvslim.kernels import qchoice

    monkeypatch.setenv("KVSLIM_QDOT", "int")
    assert (gemv_ints() == qm.INT_DOTS).all()
    monkeypatch.setenv("KVSLIM_QDOT", "float")
    assert not gemv_ints().any()
    monkeypatch.setenv("KVSLIM_QDOT", "fast")
    with pytest.raises(ValueError, match="KVSLIM_QDOT"):
        gemv_ints()
    monkeypatch.delenv("KVSLIM_QDOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(qchoice, "_MEASURED", {})
    monkeypatch.setattr(qchoice, "measure", lambda: {"Q4_K": "int", "Q6_K": "int", "Q8_0": "float"})
    got = gemv_ints()
    assert [qm.TYPES[c].name for c in np.flatnonzero(got)] == ["Q4_K", "Q6_K"]
    path = qchoice.cache_path(qchoice.machine_key())
    assert path.parent == tmp_path / "kvslim" / "kernels" and path.exists()
    monkeypatch.setattr(qchoice, "_MEASURED", {})  # a new process: read, not measured

    def no_measure():
        raise AssertionError("measured again")
    monkeypatch.setattr(qchoice, "measure", no_measure)
    assert (gemv_ints() == got).all()
    path.write_text("{not json")  # a damaged file is measured again
    monkeypatch.setattr(qchoice, "_MEASURED", {})
    monkeypatch.setattr(qchoice, "measure", lambda: {"Q4_0": "int"})
    assert [qm.TYPES[c].name for c in np.flatnonzero(gemv_ints())] == ["Q4_0"]


def test_measure_times_every_integer_dot():
    """The measurement itself, on a small matrix: one verdict per type with an integer dot."""
    from kvslim.kernels import qchoice

    got = qchoice.measure(rows=64, cols=512, repeat=2)
    assert set(got) == {qm.TYPES[c].name for c in qm.IDOT_BLOCKS}
    assert set(got.values()) <= {"int", "float"}
