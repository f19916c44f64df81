"""QLinear's choice of path: prefill tiles spanning parts, the output head's rows in a step."""
import gguf
import numpy as np
import pytest
import torch

from kvslim import weights
from kvslim.gguf_loader import unpermute_qk
from kvslim.kernels.qmatmul_ref import dequantize_ref, random_blocks
from kvslim.weights import GEMV_MAX_ROWS, QLinear, QTensor, sampled_rows, step_rows

T = gguf.GGMLQuantizationType


def _parts(rng, d=256, hd=64):
    """q (permuted, Q4_K), k (permuted, Q6_K), v (Q8_0) of one file, and the float rows."""
    specs = ((T.Q4_K, 4 * hd, hd), (T.Q6_K, 2 * hd, hd), (T.Q8_0, 3 * hd, 0))
    blocks = [random_blocks(t, r, d, rng) for t, r, _ in specs]
    data = np.concatenate([np.zeros(5, np.uint8)] + [b.reshape(-1) for b in blocks])
    data.flags.writeable = False
    parts, ws, at = [], [], 5
    for (t, r, h), b in zip(specs, blocks):
        parts.append(QTensor(data, at, t, (r, d), hd=h))
        w = torch.from_numpy(dequantize_ref(b, t, (r, d)))
        ws.append(unpermute_qk(w, r // h) if h else w)
        at += b.size
    return parts, torch.cat(ws)


@pytest.mark.parametrize("tile_floats", [1 << 22, 80 * 256, 48 * 256])
def test_tiles_span_parts(monkeypatch, tile_floats):
    """One tile for the whole matrix (its GEMM's output returned as is) or tiles of 80 / 48
    rows that cut parts and span their boundaries: all equal the float64 reference."""
    monkeypatch.setattr(weights, "TILE_FLOATS", tile_floats)
    rng = np.random.default_rng()
    parts, w = _parts(rng)
    lin = QLinear(parts, torch.randn(w.shape[0]))
    n_tiles = -(-w.shape[0] // lin.tile_rows)
    assert len(lin.tiles) == n_tiles and sum(t[1] for t in lin.tiles) == w.shape[0]
    x = torch.randn(40, w.shape[1])
    ref = x.double() @ w.T.double() + lin.b.double()
    tol = 1e-4 * ref.abs().max().item()
    torch.testing.assert_close(lin(x).double(), ref, rtol=0, atol=tol)
    with step_rows(0):  # prefill rows only: straight to the tiles, 3 rows padded to a GEMM
        torch.testing.assert_close(lin(x).double(), ref, rtol=0, atol=tol)
        torch.testing.assert_close(lin(x[:3]).double(), ref[:3], rtol=0, atol=tol)


def test_sampled_rows_take_the_gemv_in_a_step():
    """In an engine step the head's rows (one per sampling sequence) all take the GEMV in
    groups of GEMV_MAX_ROWS: each row gets its solo decode result, whatever the step
    holds. Outside a step the path still follows the row count."""
    rng = np.random.default_rng()
    parts, w = _parts(rng)
    lin = QLinear(parts)
    x = torch.randn(GEMV_MAX_ROWS + 5, w.shape[1])
    with step_rows(0), sampled_rows(x.shape[0]):
        got = lin(x)
    for r in (0, 7, GEMV_MAX_ROWS + 4):
        assert torch.equal(got[r:r + 1], lin._gemv(x[r:r + 1]))
    with sampled_rows(x.shape[0]):  # not in a step: many rows go to the tiles
        assert torch.equal(lin(x), lin._tiled(x))
