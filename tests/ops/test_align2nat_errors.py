"""Bad input gets a clear error that says what was expected."""

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
    up_align2nat,
)

UNITS = dict(unit_hw=1.0, unit_vu=1.0, aligned_unit_hw=1.0, aligned_unit_vu=1.0)


def _general(x, **overrides):
    kwargs = dict(in_cells=(2, 3), out_cells=(2, 3), **UNITS)
    kwargs.update(overrides)
    return align2nat(x, **kwargs)


@pytest.mark.parametrize("shape", [(6, 4, 4), (1, 1, 6, 4, 4), (6,)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"rank 4 \(N, V\*U, H, W\)"):
        swap_align2nat(torch.zeros(shape), 2)
    with pytest.raises(ValueError, match="rank 4"):
        _general(torch.zeros(shape))
    with pytest.raises(ValueError, match="rank 4"):
        up_align2nat(torch.zeros(shape), 2, 4)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        swap_align2nat(torch.zeros(1, 9, 4, 4, dtype=torch.long), 2)


def test_channels_must_match_in_cells():
    with pytest.raises(ValueError, match=r"7 channels but in_cells=\(2, 3\) needs Vin\*Uin = 6"):
        _general(torch.zeros(1, 7, 4, 4))
    with pytest.raises(ValueError, match=r"needs Vin\*Uin = 4"):
        up_align2nat(torch.zeros(1, 9, 4, 4), 2, (4, 4))


def test_swap_needs_square_channels():
    with pytest.raises(ValueError, match="square number of channels S\\*S.*got 8"):
        swap_align2nat(torch.zeros(1, 8, 4, 4), 2)


@pytest.mark.parametrize("lam", [0, -1, 1.5, 2.0, True])
def test_swap_lambda_must_be_integer_at_least_one(lam):
    with pytest.raises(ValueError, match="lambda_val must be an integer >= 1"):
        swap_align2nat(torch.zeros(1, 9, 4, 4), lam)
    with pytest.raises(ValueError, match="lambda_val must be an integer >= 1"):
        SwapAlign2Nat(lam)


@pytest.mark.parametrize("lam", [0.5, 0, -2])
def test_up_lambda_at_least_one(lam):
    with pytest.raises(ValueError, match="lambda_val must be"):
        up_align2nat(torch.zeros(1, 4, 4, 4), lam, (4, 4))


def test_up_out_cells_divisible_by_lambda():
    with pytest.raises(ValueError, match="out_cells divisible by lambda"):
        up_align2nat(torch.zeros(1, 4, 4, 4), 3, (4, 4))


@pytest.mark.parametrize("name", ["unit_hw", "unit_vu", "aligned_unit_hw", "aligned_unit_vu"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_units_must_be_positive(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive"):
        _general(torch.zeros(1, 6, 4, 4), **{name: value})


@pytest.mark.parametrize("cells", [(0, 3), (2,), (2, -1), "ab", (2.5, 3)])
def test_cells_must_be_positive_int_pairs(cells):
    with pytest.raises(ValueError, match="in_cells must be"):
        _general(torch.zeros(1, 6, 4, 4), in_cells=cells)


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('bilinear', 'nearest'\), got 'bicubic'"):
        _general(torch.zeros(1, 6, 4, 4), mode="bicubic")
    with pytest.raises(ValueError, match="mode must be one of"):
        up_align2nat(torch.zeros(1, 4, 4, 4), 2, (4, 4), mode="linear")
    with pytest.raises(ValueError, match="mode must be one of"):
        UpAlign2Nat(2, 4, mode="area")
    with pytest.raises(ValueError, match="mode must be one of"):
        Align2Nat(in_cells=2, out_cells=2, mode="cubic", **UNITS)


def test_mismatched_devices():
    x = torch.zeros(1, 9, 4, 4)
    on_meta = torch.zeros(2, dtype=torch.long, device="meta")
    cpu = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="batch_index is on meta but x is on cpu: expected the same device"):
        swap_align2nat_at(x, 2, on_meta, cpu, cpu)
    with pytest.raises(ValueError, match="xs is on meta but x is on cpu"):
        align2nat_at(x, cpu, cpu, on_meta, in_cells=3, out_cells=3, **UNITS)


def test_bad_positions():
    x = torch.zeros(1, 9, 4, 4)
    idx = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="same length D"):
        swap_align2nat_at(x, 2, idx, idx, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ys must be a 1-D integer tensor"):
        swap_align2nat_at(x, 2, idx, idx.float(), idx)


def test_kernel_checks_its_arguments():
    """The registered op validates too (for callers of torch.ops.tensormask.* directly), raising ValueError
    like the Python wrappers (more in test_align2nat_raw_op.py)."""
    from align2nat_helpers import require_extension

    require_extension()
    x = torch.zeros(1, 6, 4, 4)
    op = torch.ops.tensormask.align2nat
    with pytest.raises(ValueError, match="x has 6 channels, in_cells \\[3, 3\\] need 9"):
        op(x, [3, 3], [3, 3], [4, 4], 1.0, 1.0, 1.0, 1.0, -6.0, "bilinear")
    with pytest.raises(ValueError, match="mode must be 'bilinear' or 'nearest', got 'cubic'"):
        op(x, [2, 3], [2, 3], [4, 4], 1.0, 1.0, 1.0, 1.0, -6.0, "cubic")
    with pytest.raises(ValueError, match="units must be positive"):
        op(x, [2, 3], [2, 3], [4, 4], 0.0, 1.0, 1.0, 1.0, -6.0, "bilinear")
    with pytest.raises(ValueError, match="must have rank 4"):
        op(x[0], [2, 3], [2, 3], [4, 4], 1.0, 1.0, 1.0, 1.0, -6.0, "bilinear")
    with pytest.raises(ValueError, match="grad_out has 6 channels, out_cells \\[3, 3\\] need 9"):
        torch.ops.tensormask.align2nat_backward(x, [2, 3], [3, 3], [4, 4], 1.0, 1.0, 1.0, 1.0, "bilinear")


def test_module_reprs():
    assert repr(SwapAlign2Nat(4)) == "SwapAlign2Nat(lambda_val=4, pad_val=-6)"
    assert repr(UpAlign2Nat(1.5, 15, mode="nearest")) == (
        "UpAlign2Nat(lambda_val=1.5, out_cells=(15, 15), pad_val=-6, mode='nearest')"
    )
    assert repr(Align2Nat(in_cells=(2, 3), out_cells=4, unit_hw=2, unit_vu=1, aligned_unit_hw=1, aligned_unit_vu=0.5)) == (
        "Align2Nat(in_cells=(2, 3), out_cells=(4, 4), unit_hw=2, unit_vu=1, aligned_unit_hw=1, aligned_unit_vu=0.5, "
        "pad_val=-6, mode='bilinear')"
    )


def test_numpy_and_tensor_integers_are_integers():
    """lambda and cell counts taken from NumPy or a 0-d integer tensor (np.arange, a config array) are
    integers like Python ints: the same result, not "must be an integer"; bools stay refused."""
    import numpy as np

    x = torch.randn(1, 9, 6, 8)
    want = swap_align2nat(x, 2)
    for lam in (np.int64(2), np.int32(2), torch.tensor(2)):
        assert torch.equal(swap_align2nat(x, lam), want)
        assert torch.equal(SwapAlign2Nat(lam)(x), want)
        assert torch.equal(swap_align2nat_at(x, lam, torch.tensor([0]), torch.tensor([1]), torch.tensor([2])),
                           swap_align2nat_at(x, 2, torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert torch.equal(up_align2nat(x, 2, np.int64(6)), up_align2nat(x, 2, 6))
    assert torch.equal(up_align2nat(x, 2, (np.int64(6), torch.tensor(6))), up_align2nat(x, 2, 6))
    general = dict(in_cells=(3, 3), out_cells=(6, 6), unit_hw=2.0, unit_vu=1.0, aligned_unit_hw=1.0, aligned_unit_vu=2.0)
    assert torch.equal(align2nat(x, **{**general, "in_cells": np.int64(3), "out_cells": [np.int16(6), 6]}),
                       align2nat(x, **general))
    for bad in (True, np.True_, torch.tensor(True), 2.0, np.float64(2.0)):
        with pytest.raises(ValueError, match="lambda_val must be an integer >= 1"):
            swap_align2nat(x, bad)
    with pytest.raises(ValueError, match="in_cells must be"):
        align2nat(x, **{**general, "in_cells": np.True_})
