"""The CUDA kernels' arithmetic, run on the CPU.

`torch.ops.tensormask._align2nat_device_emulation` runs the per-element functions of the CUDA kernels
(csrc/align2nat_elements.h: forward_element, backward_element) on the CPU, one loop iteration per CUDA
thread. nvcc compiles them without contracted multiply-adds (--fmad=false) and with IEEE division, the
host compiler with -ffp-contract=off, so these are the bits the GPU computes (docs/ops.md, "CUDA"); the
GPU tests (test_align2nat_gpu.py) check that on a GPU.
"""

import math
from fractions import Fraction

import pytest
import torch

from align2nat_helpers import require_extension, run_extension, run_extension_backward, run_reference
from tensormask.ops.geometry import make_geometry, swap_geometry, up_geometry
from tensormask.ops.reference import align2nat_reference

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def emulate(t, geom, size, mode, backward, index32=True, pad_val=-6.0):
    return torch.ops.tensormask._align2nat_device_emulation(
        t, list(geom.in_cells), list(geom.out_cells), list(size), *geom.units, float(pad_val), mode, backward, index32
    )


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# (name, x shape, geometry): powers of two, and units whose ratios are not (aligned_unit_hw 3, unit_vu 0.7)
CASES = [
    ("swap-S3-l2", (2, 9, 11, 13), swap_geometry(3, 2)),
    ("swap-S5-l3", (1, 25, 7, 8), swap_geometry(5, 3)),
    ("swap-S2-l1", (1, 4, 6, 5), swap_geometry(2, 1)),
    ("up-l3-15", (1, 25, 5, 6), up_geometry(torch.empty(1, 25, 1, 1), 3.0, (15, 15))),
    ("general", (2, 6, 9, 8), make_geometry((2, 3), (5, 7), 1.5, 0.75, 1.0, 2.0)),
    # aligned_unit_hw 3: r_hw = 1/2, r_off = 1/2, positions on multiples of 1/4, many of them half-integers
    ("au3-halves", (1, 9, 10, 9), make_geometry((3, 3), (6, 6), 1.5, 1.5, 3.0, 1.0)),
    # aligned_unit_hw 3 with r_hw = r_off = 1/3: positions (y + v + 0.5 - 3) / 3, on a half-integer
    # whenever y + v = 3 k + 1, computed with the inexact 1/3 (the ties of nearest mode)
    ("au3-ties", (1, 9, 12, 11), make_geometry((3, 3), (6, 6), 1.0, 1.0, 3.0, 1.0)),
    # aligned_unit_hw 3, unit_vu 0.7: ratios with no short binary expansion
    ("au3-uvu0.7", (1, 16, 9, 10), make_geometry((4, 4), (7, 5), 1.0, 0.7, 3.0, 1.4)),
    ("au3-uvu0.7-up", (1, 6, 8, 7), make_geometry((2, 3), (6, 9), 3.0, 0.7, 3.0, 0.35)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", CASES, ids=IDS)
def test_forward_is_the_reference_bit_for_bit(name, shape, geom, mode, dtype):
    """Same arithmetic in the same order: equal to the reference in every dtype, in both index widths."""
    require_extension()
    x = _random(shape, dtype, seed=len(name))
    out_size = geom.output_size(shape[2:])
    expected = run_reference(x, geom, -6.0, mode)
    got = emulate(x, geom, out_size, mode, backward=False, index32=True)
    assert torch.equal(got, expected)
    assert torch.equal(emulate(x, geom, out_size, mode, backward=False, index32=False), got)
    if dtype == torch.float64 or mode == "nearest":  # the CPU exact path: also the same bits
        assert torch.equal(run_extension(x, geom, -6.0, mode), got)


def test_half_integer_positions_are_covered():
    """The au3-ties case sits on ties of nearest mode: exact positions on half-integers, which float64
    misses by a rounding error for some (y, v), so where they round depends on every operation's rounding
    (a fused multiply-add would move some to the neighbouring pixel)."""
    geom = dict((c[0], c[2]) for c in CASES)["au3-ties"]
    vout = geom.out_cells[0]
    ties = off_by_rounding = 0
    for v in range(vout):
        for y in range(36):
            exact = (Fraction(y) + Fraction(2 * v + 1, 2) - Fraction(vout, 2)) / 3
            if (exact + Fraction(1, 2)).denominator == 1:
                ties += 1
                c = geom.r_hw * y + geom.r_off * ((v + 0.5) - vout / 2)  # as the kernels compute it
                off_by_rounding += Fraction(c) != exact
    assert ties >= 50 and off_by_rounding >= 5, (ties, off_by_rounding)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", CASES, ids=IDS)
def test_backward_gather_matches_the_reference(name, shape, geom, mode, dtype):
    """The gather (tightened tap ranges, (x, weight) pairs per u) finds every term: equal to the
    reference's autograd up to the order of the sum."""
    require_extension()
    # the reference in the same dtype: positions in the same precision (float32 for float32 and bfloat16)
    x = _random(shape, dtype, seed=len(name)).requires_grad_()
    out = align2nat_reference(x, geom, geom.output_size(shape[2:]), -6.0, mode)
    grad_out = _random(out.shape, dtype, seed=3)
    (expected,) = torch.autograd.grad(out, x, grad_out)
    got = emulate(grad_out, geom, shape[2:], mode, backward=True)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.equal(emulate(grad_out, geom, shape[2:], mode, backward=True, index32=False), got)
    if dtype != torch.bfloat16:
        cpu = run_extension_backward(grad_out, geom, shape[2:], mode)
        torch.testing.assert_close(got, cpu, rtol=tol, atol=tol)


def test_empty_cases():
    require_extension()
    geom = swap_geometry(3, 2)
    # an input with no rows: every tap reads pad, as in the CPU kernel
    x = torch.empty(1, 9, 0, 5, dtype=torch.float64)
    got = emulate(x, geom, (0, 3), "bilinear", backward=False)
    assert got.shape == (1, 36, 0, 3)
    # Hin = 0 for the backward, and an empty grad_out with a non-empty grad_x (zeros)
    assert emulate(torch.empty(1, 36, 0, 3), geom, (0, 5), "bilinear", backward=True).shape == (1, 9, 0, 5)
    up = up_geometry(torch.empty(1, 4, 1, 1), 2.0, (4, 4))
    x = torch.empty(1, 4, 0, 3)
    out = emulate(x, up, (0, 3), "bilinear", backward=False)
    assert out.shape == (1, 16, 0, 3)
    # an empty grad_out can only come with an empty grad_x now: any other in_size does not fit it
    with pytest.raises(ValueError, match=r"grad_out of spatial size \(0, 3\) does not fit in_size \[4, 5\]"):
        emulate(torch.empty(1, 36, 0, 3), geom, (4, 5), "bilinear", backward=True)


# Non-finite values in grad_out: every backend passes a NaN / inf back only through taps of nonzero
# weight, so the gradients agree position by position (docs/ops.md, "Non-finite values").
NONFINITE_CASES = [
    ("swap-S3-l1-shift", (1, 9, 6, 7), swap_geometry(3, 1)),  # CPU shift path
    ("swap-S2-l1", (1, 4, 6, 5), swap_geometry(2, 1)),  # separable, weights 1/2, cell weights (1, 0)
    ("swap-S3-l3", (1, 9, 7, 8), swap_geometry(3, 3)),  # separable, spatial weights (1, 0)
    ("swap-S3-l2", (1, 9, 7, 8), swap_geometry(3, 2)),  # separable
    ("up-l3-15", (1, 25, 5, 6), up_geometry(torch.empty(1, 25, 1, 1), 3.0, (15, 15))),  # separable, (1, 0)
    ("au3-uvu0.7", (1, 16, 9, 10), make_geometry((4, 4), (7, 5), 1.0, 0.7, 3.0, 1.4)),  # exact path
    ("au3-halves", (1, 9, 10, 9), make_geometry((3, 3), (6, 6), 1.5, 1.5, 3.0, 1.0)),
    # aligned_unit_hw 3 with r_hw = r_off = 1/3: positions (y + v + 0.5 - 3) / 3, on a half-integer
    # whenever y + v = 3 k + 1, computed with the inexact 1/3 (the ties of nearest mode)
    ("au3-ties", (1, 9, 12, 11), make_geometry((3, 3), (6, 6), 1.0, 1.0, 3.0, 1.0)),  # exact path
]


def _nonfinite_grad(in_shape, geom, mode, dtype):
    """grad_out with +-inf and NaN at outputs that read the input (not pad only), spread over them."""
    out_size = geom.output_size(in_shape[2:])
    reads_input = align2nat_reference(torch.zeros(in_shape, dtype=torch.float64), geom, out_size, 1.0, mode) < 1
    grad = _random(reads_input.shape, torch.float64, seed=5)
    where = reads_input.view(-1).nonzero().view(-1)
    flat = grad.view(-1)
    for k, value in enumerate([math.inf, -math.inf, math.nan, math.inf, -math.inf, math.inf]):
        flat[where[(k * len(where)) // 6]] = value
    return grad.to(dtype)


def _pattern(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_nonfinite_grad_out_same_in_every_backend(name, shape, geom, mode, dtype):
    require_extension()
    out_size = geom.output_size(shape[2:])
    grad_out = _nonfinite_grad(shape, geom, mode, dtype)
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    (reference,) = torch.autograd.grad(align2nat_reference(x, geom, out_size, -6.0, mode), x, grad_out)
    cpu = run_extension_backward(grad_out, geom, shape[2:], mode)
    device = emulate(grad_out, geom, shape[2:], mode, backward=True)
    nonfinite = ~torch.isfinite(reference)
    assert nonfinite.any()  # the case does test something
    # inf reaches inputs as inf (not NaN through a tap of weight 0); NaN where +inf and -inf or NaN meet
    for got in (cpu, device):
        for a, b in zip(_pattern(got), _pattern(reference)):
            assert torch.equal(a, b), name
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got[~nonfinite], reference[~nonfinite], rtol=tol, atol=tol)
