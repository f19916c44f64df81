"""The fused row ops (kernels/rowops.py) against their plain-torch references."""
import numpy as np
import pytest
import torch
from numba import njit

from kvslim.kernels import cpu, rowops
from kvslim.kernels.rowops import NumbaOps, TorchOps, ops

# float32 sums over a few thousand values in another order, exp in another form
ATOL, RTOL = 1e-5, 1e-5


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * scale


@pytest.mark.parametrize("n,d", [(1, 576), (3, 64), (17, 100), (5, 2048)])
def test_norm_and_add_norm_match_torch(n, d):
    x, y, w = _rand(n, d, scale=3.0), _rand(n, d + 1)[:, :d], _rand(d) + 1
    torch.testing.assert_close(NumbaOps.norm(x, w, 1e-6), TorchOps.norm(x, w, 1e-6),
                               atol=ATOL, rtol=RTOL)
    ref_x, ref_h = TorchOps.add_norm(x, y, w, 1e-5)
    x2 = x.clone()
    got_x, got_h = NumbaOps.add_norm(x2, y, w, 1e-5)  # y non-contiguous on purpose
    assert got_x is x2  # the residual stream is updated in place
    torch.testing.assert_close(got_x, ref_x, atol=0, rtol=0)
    torch.testing.assert_close(got_h, ref_h, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n,heads,rot_heads,dim,rot", [(1, 15, 12, 64, 64), (6, 5, 3, 96, 32),
                                                       (9, 4, 4, 256, 256)])
def test_rope_in_place_matches_torch(n, heads, rot_heads, dim, rot):
    x = _rand(n, heads, dim)
    ang = _rand(n, 1, rot // 2, scale=5.0)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([-ang.sin(), ang.sin()], -1)
    ref = TorchOps.rope(x.clone(), rot_heads, cos, sin)
    got = x.clone()
    assert NumbaOps.rope(got, rot_heads, cos, sin) is got
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[:, rot_heads:], x[:, rot_heads:], atol=0, rtol=0)


@pytest.mark.parametrize("n,f", [(1, 1536), (7, 33), (3, 8192)])
def test_silu_mul_matches_torch(n, f):
    gu = _rand(n, 2 * f, scale=6.0)
    gu[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp's clamped sides, and zero
    torch.testing.assert_close(NumbaOps.silu_mul(gu), TorchOps.silu_mul(gu), atol=ATOL, rtol=RTOL)


def test_exp_within_2e_7_and_clamped():
    """The vectorizable exp the sigmoids use (the attention's, for x <= 0), compiled as they
    compile it (without fast math, which would let LLVM fold its two-part ln2), against
    float64's, over its range and past its low end."""
    exp = njit(lambda v: cpu._exp(v))
    x = np.concatenate([np.linspace(-87, 0, 40001), -np.abs(_rand(999, scale=20.0).numpy())]).astype(np.float32)
    x = x[x >= -87]
    got = np.array([exp(np.float32(v)) for v in x], np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7
    assert exp(np.float32(-200.0)) == exp(np.float32(-87.0)) > 0


def test_sigmoid_within_4e_7_both_sides():
    """rowops' sigmoid (e / (1 + e) below 0, 1 / (1 + e) above) against float64's."""
    x = np.concatenate([np.linspace(-87, 88, 40001), _rand(999, scale=20.0).numpy()]).astype(np.float32)
    x = x[(x >= -87) & (x <= 88)]
    got = np.array([rowops._sigmoid(np.float32(v)) for v in x], np.float64)
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(got - ref) / ref) < 4e-7
    assert rowops._sigmoid(np.float32(200.0)) == 1 and 0 < rowops._sigmoid(np.float32(-200.0)) < 1e-37


@pytest.mark.parametrize("n,d", [(1, 640), (4, 64), (9, 100)])
def test_norm_add_norm_matches_torch(n, d):
    """gemma's post-sublayer norm into the residual, then the next norm."""
    x, y = _rand(n, d, scale=3.0), _rand(n, d + 2)[:, :d] * 40
    w_post, w_next = _rand(d + 3)[:d] + 1, _rand(d + 5)[:d] + 1
    ref_x, ref_h = TorchOps.norm_add_norm(x, y, w_post, w_next, 1e-6)
    x2 = x.clone()
    got_x, got_h = NumbaOps.norm_add_norm(x2, y, w_post, w_next, 1e-6)  # y non-contiguous
    assert got_x is x2  # the residual stream is updated in place
    torch.testing.assert_close(got_x, ref_x, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_h, ref_h, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("n,n_a,n_b,rest,dim", [(1, 4, 1, 1, 256), (5, 3, 2, 2, 64), (2, 1, 1, 0, 24)])
def test_head_norm_in_place_matches_torch(n, n_a, n_b, rest, dim):
    x = _rand(n, n_a + n_b + rest, dim, scale=7.0)
    w_a, w_b = _rand(dim) + 1, _rand(dim + 1)[:dim] - 1
    ref = TorchOps.head_norm(x.clone(), n_a, w_a, w_b, n_b, 1e-6)
    got = x.clone()
    assert NumbaOps.head_norm(got, n_a, w_a, w_b, n_b, 1e-6) is got
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[:, n_a + n_b:], x[:, n_a + n_b:], atol=0, rtol=0)  # v heads


@pytest.mark.parametrize("n,f", [(1, 2048), (6, 35), (5, 8192)])
def test_gelu_mul_matches_torch(n, f):
    gu = _rand(n, 2 * f, scale=4.0)
    gu[0, :4] = torch.tensor([-60.0, 60.0, 0.0, -3.0])  # the sigmoid's saturated sides, and zero
    torch.testing.assert_close(NumbaOps.gelu_mul(gu), TorchOps.gelu_mul(gu), atol=ATOL, rtol=RTOL)


def test_each_row_alone():
    """A row's result is the same bits whatever else is in the call (batch invariance)."""
    d, f = 576, 1536
    x, y, w, gu = _rand(33, d), _rand(33, d), _rand(d), _rand(33, 2 * f)
    _, h_all = NumbaOps.add_norm(x.clone(), y, w, 1e-5)
    _, h_one = NumbaOps.add_norm(x[5:6].clone(), y[5:6], w, 1e-5)
    assert torch.equal(h_all[5:6], h_one)
    assert torch.equal(NumbaOps.silu_mul(gu)[7:8], NumbaOps.silu_mul(gu[7:8]))
    assert torch.equal(NumbaOps.gelu_mul(gu)[7:8], NumbaOps.gelu_mul(gu[7:8]))
    _, h_all = NumbaOps.norm_add_norm(x.clone(), y, w, w + 1, 1e-6)
    _, h_one = NumbaOps.norm_add_norm(x[5:6].clone(), y[5:6], w, w + 1, 1e-6)
    assert torch.equal(h_all[5:6], h_one)
    heads = _rand(33, 3, 64)
    all_rows = NumbaOps.head_norm(heads.clone(), 2, w[:64], w[64:128], 1, 1e-6)
    assert torch.equal(all_rows[9:10], NumbaOps.head_norm(heads[9:10].clone(), 2, w[:64], w[64:128], 1, 1e-6))


def test_ops_choice():
    assert ops(torch.device("cpu"), torch.float32) is NumbaOps
    assert ops(torch.device("cpu"), torch.bfloat16) is TorchOps
    assert ops(torch.device("meta"), torch.float32) is TorchOps
