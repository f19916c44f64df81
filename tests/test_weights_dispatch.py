"""QLinear's choice of path: prefill tiles spanning parts, the output head's rows in a step."""
import gguf
import numpy as np
import pytest
import torch

from kvslim import weights
from kvslim.gguf_loader import unpermute_qk
from kvslim.kernels.rowops import NumbaOps
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


def _gate_up(rng, types, f, d=256):
    """W = [gate; up] of one file: two parts of f rows (two types) or one part of 2f rows
    (one type, phi3's fused gate_up), and the float rows [2f, d]."""
    rows = [f, f] if len(types) == 2 else [2 * f]
    blocks = [random_blocks(t, r, d, rng) for t, r in zip(types, rows)]
    data = np.concatenate([np.zeros(3, np.uint8)] + [b.reshape(-1) for b in blocks])
    data.flags.writeable = False
    parts, ws, at = [], [], 3
    for t, r, b in zip(types, rows, blocks):
        parts.append(QTensor(data, at, t, (r, d)))
        ws.append(torch.from_numpy(dequantize_ref(b, t, (r, d))))
        at += b.size
    return parts, torch.cat(ws)


def _silu_mul64(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K), (T.Q6_K, T.Q8_0), (T.Q5_0,)])
@pytest.mark.parametrize("tile_floats", [1 << 22, 96 * 256, 32 * 256])
def test_gated_tiles_pair_gate_and_up_rows(monkeypatch, types, tile_floats):
    """``gated`` on prefill rows multiplies each tile's gate rows with the up rows at the
    same place (one tile, or 48 / 16 gate rows a tile, the last one short: f = 84) and
    applies the activation per tile: equal to the activation of the float64 product. Decode
    rows and a padded short prompt too; with a dequantized ``Linear`` the same."""
    monkeypatch.setattr(weights, "TILE_FLOATS", tile_floats)
    rng = np.random.default_rng()
    f = 84
    parts, w = _gate_up(rng, types, f)
    lin = QLinear(parts)
    assert sum(t[1] for t in lin.pairs) == f
    assert len(lin.pairs) == (1 if tile_floats == 1 << 22 else -(-f // (tile_floats // 256 // 2)))
    act = NumbaOps.silu_mul
    x = torch.randn(40, w.shape[1])
    ref = _silu_mul64(x.double() @ w.T.double())  # [40, f]
    tol = 1e-4 * ref.abs().max().item()
    for rows in (40, 3):  # 3: padded to GEMM_MIN_ROWS rows
        with step_rows(0):
            got = lin.gated(x[:rows], act)
        assert got.shape == (rows, f)
        torch.testing.assert_close(got.double(), ref[:rows], rtol=0, atol=tol)
    torch.testing.assert_close(lin.gated(x, act).double(), ref, rtol=0, atol=tol)  # no step
    with step_rows(2):  # decode rows: the GEMV, then the activation
        assert torch.equal(lin.gated(x[:2], act), act(lin(x[:2])))
    dense = weights.Linear(w.float())
    torch.testing.assert_close(dense.gated(x, act).double(), ref, rtol=0, atol=tol)


def test_gated_needs_gate_and_up_halves():
    """Parts of unequal rows (or three parts) have no gate / up pairing: ``gated`` is the
    activation of the whole product."""
    rng = np.random.default_rng()
    parts, w = _parts(rng)
    lin = QLinear(parts[1:])  # 128 + 192 rows
    assert lin.pairs is None and QLinear(parts).pairs is None
    x = torch.randn(40, w.shape[1])
    with step_rows(0):
        assert torch.equal(lin.gated(x, NumbaOps.silu_mul), NumbaOps.silu_mul(lin(x)))
