"""The sparse evaluation (`*_at`) equals the dense op indexed at the same windows, values and gradients."""

import pytest
import torch

from tensormask.ops import (
    Align2Nat,
    SwapAlign2Nat,
    UpAlign2Nat,
    align2nat,
    align2nat_at,
    swap_align2nat,
    swap_align2nat_at,
    swap_align2nat_region,
    up_align2nat,
    up_align2nat_at,
)
from tensormask.ops.geometry import swap_geometry
from tensormask.ops.reference import align2nat_reference

GENERAL = dict(in_cells=(2, 3), out_cells=(5, 4), unit_hw=1.5, unit_vu=0.75, aligned_unit_hw=1.0, aligned_unit_vu=2.0)


def _positions(n, h, w, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, n, (d,), generator=g), torch.randint(0, h, (d,), generator=g),
            torch.randint(0, w, (d,), generator=g))


@pytest.mark.parametrize("lam, size", [(1, (7, 5)), (2, (9, 6)), (4, (10, 13)), (8, (17, 9))])
def test_swap_at_equals_dense(lam, size):
    x = torch.randn(3, 9, *size, dtype=torch.float64, requires_grad=True)
    dense = swap_align2nat(x, lam)
    b, ys, xs = _positions(3, dense.shape[2], dense.shape[3], 20, seed=lam)
    sparse = swap_align2nat_at(x, lam, b, ys, xs)
    assert sparse.shape == (20, (3 * lam) ** 2)
    assert torch.equal(sparse, dense[b, :, ys, xs])
    weights = torch.randn_like(sparse)
    (g_sparse,) = torch.autograd.grad((sparse * weights).sum(), x)
    (g_dense,) = torch.autograd.grad((dense[b, :, ys, xs] * weights).sum(), x)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_align2nat_at_equals_dense(mode, dtype):
    x = torch.randn(2, 6, 9, 8, dtype=dtype)
    dense = align2nat(x, **GENERAL, mode=mode, pad_val=-3.0)
    b, ys, xs = _positions(2, dense.shape[2], dense.shape[3], 15, seed=1)
    sparse = align2nat_at(x, b, ys, xs, **GENERAL, mode=mode, pad_val=-3.0)
    assert torch.equal(sparse, dense[b, :, ys, xs])


def test_at_with_no_positions():
    x = torch.randn(1, 9, 4, 4)
    empty = torch.zeros(0, dtype=torch.long)
    assert swap_align2nat_at(x, 2, empty, empty, empty).shape == (0, 36)


def test_modules_run_their_functions():
    x = torch.randn(1, 9, 6, 6)
    assert torch.equal(SwapAlign2Nat(2)(x), swap_align2nat(x, 2))
    assert UpAlign2Nat(3, 9)(x).shape == (1, 81, 6, 6)
    x6 = torch.randn(1, 6, 9, 8)
    assert torch.equal(Align2Nat(**GENERAL)(x6), align2nat(x6, **GENERAL))


@pytest.mark.parametrize("lam, size", [(1, (7, 5)), (2, (9, 6)), (8, (17, 9)), (16, (20, 24))])
def test_swap_region_equals_the_reference(lam, size):
    """One window on a block of its cells equals the reference op's dense output cropped there,
    including blocks at the border of the window and windows reaching outside the input."""
    s = 3
    x = torch.randn(2, s * s, *size, dtype=torch.float64)
    geom = swap_geometry(s, lam)
    out_hw = geom.output_size(size)
    dense = align2nat_reference(x, geom, out_hw, -6.0, "bilinear")  # (2, (lam S)^2, Hout, Wout)
    cells = lam * s
    cache = {}
    for b, y, x_pos, region in [(0, 0, 0, (0, cells, 0, cells)), (1, out_hw[0] - 1, out_hw[1] - 1, (1, cells - 1, 2, cells)),
                                (1, out_hw[0] // 2, 0, (cells // 2, cells, 0, max(1, cells // 3))), (0, 0, 1, (0, 1, 0, 1))]:
        got = swap_align2nat_region(x, lam, b, y, x_pos, region, cache=cache)
        v0, v1, u0, u1 = region
        expected = dense[b, :, y, x_pos].view(cells, cells)[v0:v1, u0:u1]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert swap_align2nat_region(x, lam, 0, 0, 0, (2, 2, 0, cells)).shape == (0, cells)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("lam, out_cells", [(3.0, 15), (1.5, 15), (11 / 4, 11)])
def test_up_at_equals_dense(mode, lam, out_cells):
    s = round(out_cells / lam)
    x = torch.randn(2, s * s, 6, 7, dtype=torch.float64)
    dense = up_align2nat(x, lam, (out_cells, out_cells), -4.0, mode)
    b, ys, xs = _positions(2, 6, 7, 12, seed=3)
    sparse = up_align2nat_at(x, lam, (out_cells, out_cells), b, ys, xs, -4.0, mode)
    assert torch.equal(sparse, dense[b, :, ys, xs])
