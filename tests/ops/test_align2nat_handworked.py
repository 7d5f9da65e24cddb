"""Hand-worked small cases: expected outputs computed on paper and written out literally.

Each runs through the public API (the active backend), the reference, and the extension.
"""

import pytest
import torch

from align2nat_helpers import require_extension, run_extension, run_reference
from tensormask.ops import align2nat, align2nat_at, swap_align2nat, swap_align2nat_at, up_align2nat
from tensormask.ops.geometry import make_geometry, swap_geometry, up_geometry

X22 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)


def _all_implementations(x, geom, pad_val, mode, public_out):
    outs = {"public": public_out, "reference": run_reference(x, geom, pad_val, mode)}
    require_extension()
    outs["extension"] = run_extension(x, geom, pad_val, mode)
    return outs


def test_swap_lambda2_single_cell():
    # S = 1, lambda = 2: Sout = 2, output grid ceil(2/2) = 1. ov = (v + 0.5)/2 - 0.5 = -0.25 or 0.25, so the
    # one real cell has weight 0.75 * 0.75 = 0.5625 and the pad cells 0.4375; oy, ox = -0.5 or 0.5 average a
    # 2x2 neighbourhood (0.25 each), outside pixels being pad = -6:
    #   (v,u)=(0,0): 0.4375*-6 + 0.5625*(0.25*1 + 0.75*-6)          = -5.015625
    #   (0,1):       0.4375*-6 + 0.5625*(0.25*(1+2) + 0.5*-6)       = -3.890625
    #   (1,0):       0.4375*-6 + 0.5625*(0.25*(1+3) + 0.5*-6)       = -3.75
    #   (1,1):       0.4375*-6 + 0.5625*(0.25*(1+2+3+4))            = -1.21875
    expected = torch.tensor([-5.015625, -3.890625, -3.75, -1.21875]).view(1, 4, 1, 1)
    out = swap_align2nat(X22, 2)
    for name, got in _all_implementations(X22, swap_geometry(1, 2), -6.0, "bilinear", out).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_swap_lambda1_is_a_shift():
    # lambda = 1, S = 3, one pixel: Y(v,u,0,0) = X(v,u, v-1, u-1) is inside only for (v,u) = (1,1).
    x = torch.arange(10.0, 19.0).view(1, 9, 1, 1)
    expected = torch.tensor([-6.0, -6.0, -6.0, -6.0, 14.0, -6.0, -6.0, -6.0, -6.0]).view(1, 9, 1, 1)
    out = swap_align2nat(x, 1)
    for name, got in _all_implementations(x, swap_geometry(3, 1), -6.0, "bilinear", out).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_swap_at_single_cell():
    # The windows (b, y, x) = (0, 0, 0) of test_swap_lambda2_single_cell, asked twice.
    idx = torch.zeros(2, dtype=torch.long)
    out = swap_align2nat_at(X22, 2, idx, idx, idx)
    expected = torch.tensor([[-5.015625, -3.890625, -3.75, -1.21875]] * 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_up_align2nat_bilinear():
    # lambda = 2, out_cells 2x2 from one aligned cell, pad 0: the real cell weighs 0.75*0.75 = 0.5625 and
    # y^ = y + v - 0.5, x^ = x + u - 0.5 average rows {y+v-1, y+v} x cols {x+u-1, x+u} (0.25 each), so
    # out = 0.140625 * (sum of the inside pixels of that 2x2 block of [[1, 2], [3, 4]]).
    expected = torch.tensor(
        [
            [[0.140625, 0.421875], [0.5625, 1.40625]],  # (v,u)=(0,0): sums 1, 3 / 4, 10
            [[0.421875, 0.28125], [1.40625, 0.84375]],  # (0,1): 3, 2 / 10, 6
            [[0.5625, 1.40625], [0.421875, 0.984375]],  # (1,0): 4, 10 / 3, 7
            [[1.40625, 0.84375], [0.984375, 0.5625]],  # (1,1): 10, 6 / 7, 4
        ]
    ).view(1, 4, 2, 2)
    out = up_align2nat(X22, 2, (2, 2), pad_val=0.0)
    geom = up_geometry(X22, 2.0, (2, 2))
    for name, got in _all_implementations(X22, geom, 0.0, "bilinear", out).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_up_align2nat_nearest():
    # Nearest (round half up): v^ = v/2 - 0.25 rounds to cell 0; y^ = y + v - 0.5 rounds to y + v, so
    # out(v,u,y,x) = X(y+v, x+u) or the pad -6 (the InstanceFCN case, A.2).
    p = -6.0
    expected = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0]],
            [[2.0, p], [4.0, p]],
            [[3.0, 4.0], [p, p]],
            [[4.0, p], [p, p]],
        ]
    ).view(1, 4, 2, 2)
    out = up_align2nat(X22, 2, 2, mode="nearest")
    geom = up_geometry(X22, 2.0, (2, 2))
    for name, got in _all_implementations(X22, geom, p, "nearest", out).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


X_GENERAL = torch.tensor(
    [[[[0.0, 1, 2], [3, 4, 5], [6, 7, 8]], [[10.0, 11, 12], [13, 14, 15], [16, 17, 18]]]]
)  # (1, 2, 3, 3): in_cells (1, 2)
GENERAL = dict(in_cells=(1, 2), out_cells=(1, 2), unit_hw=2.0, unit_vu=1.0, aligned_unit_hw=1.0, aligned_unit_vu=1.0)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # r_hw = 2, r_off = 1, same cells: v^ = v, u^ = u, y^ = 2y, x^ = 2x + u - 0.5; grid ceil(3/2) = 2; pad -2.
        # bilinear, u = 0: cols {2x-1, 2x} of rows {0, 2}: (-2+0)/2, (1+2)/2 / (-2+6)/2, (7+8)/2
        #           u = 1: cols {2x, 2x+1}:              (10+11)/2, (12-2)/2 / (16+17)/2, (18-2)/2
        ("bilinear", [[[-1.0, 1.5], [2.0, 7.5]], [[10.5, 5.0], [16.5, 8.0]]]),
        # nearest: u = 0 -> col 2x; u = 1 -> col 2x + 1 (col 3 is outside: pad -2)
        ("nearest", [[[0.0, 2.0], [6.0, 8.0]], [[11.0, -2.0], [17.0, -2.0]]]),
    ],
)
def test_align2nat_general_units(mode, expected):
    expected = torch.tensor(expected).view(1, 2, 2, 2)
    out = align2nat(X_GENERAL, **GENERAL, pad_val=-2.0, mode=mode)
    geom = make_geometry(**GENERAL)
    for name, got in _all_implementations(X_GENERAL, geom, -2.0, mode, out).items():
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    # The sparse evaluation of windows (y, x) = (1, 0) and (0, 1).
    at = align2nat_at(
        X_GENERAL, torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([0, 1]), **GENERAL, pad_val=-2.0, mode=mode
    )
    torch.testing.assert_close(at, torch.stack([expected[0, :, 1, 0], expected[0, :, 0, 1]]), rtol=0, atol=0)
