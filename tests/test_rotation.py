"""Hadamard rotation: orthonormal, self-inverse, and attention-preserving."""
import pytest
import torch

from kvslim.rotation import Rotation, default_rotation, fwht, hadamard_size


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


@pytest.mark.parametrize("n", [64, 128, 256])
def test_fwht_equals_dense_hadamard(n):
    x = torch.randn(10, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x, n), x @ sylvester(n).T.double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim,signs", [(64, False), (128, True), (256, True), (192, False)])
def test_rotation_is_orthonormal_and_inverts(dim, signs):
    r = Rotation.make(dim, random_signs=signs, seed=11)
    m = r.matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(4, 3, dim)
    torch.testing.assert_close(r.inverse(r.forward(x)), x, atol=1e-5, rtol=1e-5)


def test_rotation_preserves_attention_in_float32():
    r = Rotation.make(64, random_signs=True)
    q, k, v = torch.randn(9, 64), torch.randn(50, 64), torch.randn(50, 64)
    ref = torch.softmax(q @ k.T / 8, -1) @ v
    rot = r.inverse(torch.softmax(r.forward(q) @ r.forward(k).T / 8, -1) @ r.forward(v))
    torch.testing.assert_close(rot, ref, atol=2e-6, rtol=1e-5)


def test_sizes_and_defaults():
    assert hadamard_size(64) == 64 and hadamard_size(128) == 128 and hadamard_size(192) == 64
    assert hadamard_size(96) is None and hadamard_size(80) is None
    assert default_rotation(64, "f16", "f16") is None
    assert default_rotation(64, "q4_0", "f16").size == 64
    assert default_rotation(96, "q4_0", "q4_0") is None
    with pytest.raises(ValueError):
        Rotation.make(96)


@pytest.mark.parametrize("dim,signs", [(64, False), (64, True), (256, True), (96, False)])
@pytest.mark.parametrize("pre,post", [(True, False), (False, True), (True, True), (False, False)])
def test_scaled_rotation_kernel_equals_the_torch_ops_bit_for_bit(dim, signs, pre, post):
    """R (q * pre) * post in one numba call (the decode step's query transform) is the
    torch ops' result exactly, on fresh random rows; off CPU float32 it defers to them."""
    from kvslim.rotation import rotate_rows, scaled_rotate_rows

    g = torch.Generator().manual_seed(dim + 2 * signs + pre + 4 * post)
    n, heads = 5, 3
    x = torch.randn(n, heads, dim, generator=g) * 3
    rot = Rotation.make(dim, random_signs=signs, seed=dim) if hadamard_size(dim) else None
    pre_t = torch.rand(heads, dim, generator=g) + 0.5 if pre else None
    post_t = torch.rand(heads, generator=g) + 0.5 if post else None
    want = x if pre_t is None else x * pre_t
    want = rotate_rows(want, rot)
    want = want if post_t is None else want * post_t[:, None]
    got = scaled_rotate_rows(x, rot, pre_t, post_t)
    assert torch.equal(got, want)
    assert scaled_rotate_rows(x.double(), rot, pre_t, post_t) is None
