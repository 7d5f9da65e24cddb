"""The compiled kernels against the pure-PyTorch reference (and the reference against detectron2's SwapAlign2Nat arithmetic, docs/ops.md)."""

import pytest
import torch

from align2nat_helpers import (
    require_extension,
    run_extension,
    run_extension_backward,
    run_reference,
    section4_oracle,
)
from tensormask.ops import align2nat, swap_align2nat, up_align2nat
from tensormask.ops.geometry import make_geometry, swap_geometry, up_geometry

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FORWARD_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-2),  # one float16 ulp at |value| <= 8
    torch.bfloat16: dict(rtol=8e-3, atol=6e-2),  # one bfloat16 ulp at |value| <= 8
}

# (N, S, H, W, lambda): odd sizes, sizes not divisible by lambda, lambda 1/2/4/8/32
SWAP_SHAPES = [
    (2, 3, 7, 5, 1),
    (1, 4, 9, 6, 2),
    (2, 3, 11, 13, 2),
    (1, 2, 10, 7, 4),
    (1, 3, 17, 9, 8),
    (1, 1, 33, 40, 32),
    (1, 5, 5, 3, 3),
]
# (N, in_cells, out_cells, H, W, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu): non-square cells,
# fractional ratios, up- and down-sampling grids
GENERAL_CASES = [
    (2, (2, 3), (5, 7), 9, 8, 1.5, 0.75, 1.0, 2.0),
    (1, (3, 2), (3, 2), 6, 7, 1.0, 1.0, 1.0, 1.0),
    (1, (4, 4), (2, 3), 8, 5, 0.5, 2.0, 1.0, 1.0),
    (2, (1, 3), (6, 4), 5, 9, 3.0, 1.0, 2.0, 0.5),
]


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _cases():
    for n, s, h, w, lam in SWAP_SHAPES:
        yield f"swap-S{s}-{h}x{w}-l{lam}", (n, s * s, h, w), swap_geometry(s, lam)
    for n, cin, cout, h, w, *units in GENERAL_CASES:
        yield f"general-{cin}-{cout}-{h}x{w}", (n, cin[0] * cin[1], h, w), make_geometry(cin, cout, *units)
    x_up = torch.empty(1, 25, 1, 1)
    yield "up-l3-15", (2, 25, 6, 5), up_geometry(x_up, 3.0, (15, 15))
    yield "up-l1.5-15", (1, 100, 4, 7), up_geometry(torch.empty(1, 100, 1, 1), 1.5, (15, 15))


CASES = list(_cases())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(name, shape, geom, mode, dtype):
    require_extension()
    x = _random(shape, dtype, seed=len(name))
    got, expected = run_extension(x, geom, -6.0, mode), run_reference(x, geom, -6.0, mode)
    if dtype == torch.float64:
        # float64 runs the 16 terms in the reference's (detectron2's) order: equal bit for bit.
        assert torch.equal(got, expected)
    else:
        # float32/16 may take the separable CPU path (same terms, reassociated), then round once.
        torch.testing.assert_close(got, expected, **FORWARD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(name, shape, geom, mode, dtype):
    require_extension()
    x = _random(shape, dtype, seed=1 + len(name)).requires_grad_()
    ref = run_reference(x, geom, -6.0, mode)
    grad_out = _random(ref.shape, dtype, seed=2)
    (expected,) = torch.autograd.grad(ref, x, grad_out)
    got = run_extension_backward(grad_out, geom, shape[2:], mode)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("lambda_val", [1, 2, 3, 4])
def test_swap_is_section4_bit_for_bit(lambda_val):
    """float64 swap_align2nat equals detectron2's arithmetic (docs/ops.md) exactly."""
    x = _random((2, 9, 7, 5), torch.float64, seed=lambda_val)
    expected = section4_oracle(x, lambda_val)
    assert torch.equal(swap_align2nat(x, lambda_val), expected)
    assert torch.equal(run_reference(x, swap_geometry(3, lambda_val), -6.0, "bilinear"), expected)
    require_extension()
    assert torch.equal(run_extension(x, swap_geometry(3, lambda_val), -6.0, "bilinear"), expected)


def test_non_contiguous_inputs():
    require_extension()
    base = _random((2, 9, 8, 11), torch.float32, seed=3)
    for x in (base.transpose(2, 3), base[:, :, ::2, 1:], base.to(memory_format=torch.channels_last)):
        x.requires_grad_()
        out = swap_align2nat(x, 2)
        expected = run_reference(x.contiguous(), swap_geometry(3, 2), -6.0, "bilinear")
        torch.testing.assert_close(out, expected, **FORWARD_TOL[torch.float32])
        grad_out = torch.randn_like(out).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous gradient
        (got,) = torch.autograd.grad(out, x, grad_out)
        (expected,) = torch.autograd.grad(run_reference(x, swap_geometry(3, 2), -6.0, "bilinear"), x, grad_out)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 9, 5, 5), (2, 9, 0, 4), (1, 9, 3, 0)])
def test_empty_inputs(shape):
    x = torch.randn(shape, requires_grad=True)
    out = swap_align2nat(x, 2)
    expected_shape = (shape[0], 36, -(-shape[2] // 2), -(-shape[3] // 2))
    assert out.shape == expected_shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    require_extension()
    assert run_extension(x.detach(), swap_geometry(3, 2), -6.0, "bilinear").shape == expected_shape


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gradcheck(seed, mode):
    require_extension()
    x = _random((1, 6, 5, 4), torch.float64, seed=seed).requires_grad_()
    general = lambda t: align2nat(  # noqa: E731
        t, in_cells=(2, 3), out_cells=(3, 4), unit_hw=1.5, unit_vu=0.75, aligned_unit_hw=1.0, aligned_unit_vu=1.5,
        mode=mode,
    )
    assert torch.autograd.gradcheck(general, (x,))
    assert torch.autograd.gradgradcheck(general, (x,))
    x9 = _random((2, 9, 5, 3), torch.float64, seed=seed).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: swap_align2nat(t, 2), (x9,))
    x4 = _random((1, 4, 3, 4), torch.float64, seed=seed).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: up_align2nat(t, 2, (4, 4), mode=mode), (x4,))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_opcheck(mode):
    require_extension()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    geom = make_geometry((2, 3), (3, 4), 1.5, 0.75, 1.0, 1.5)
    out_size = geom.output_size((5, 4))
    args = (x, [2, 3], [3, 4], list(out_size), *geom.units, -6.0, mode)
    torch.library.opcheck(torch.ops.tensormask.align2nat.default, args)
    grad_out = torch.randn(2, 12, *out_size, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.tensormask.align2nat_backward.default, (grad_out, [2, 3], [3, 4], [5, 4], *geom.units, mode)
    )


def test_torch_compile_fullgraph():
    require_extension()

    def head(t):
        return torch.sigmoid(swap_align2nat(t * 2.0, 2)).sum()

    x = torch.randn(1, 9, 6, 5, requires_grad=True)
    compiled = torch.compile(head, fullgraph=True, dynamic=False, backend="aot_eager")
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    x2 = x.detach().clone().requires_grad_()
    expected = head(x2)
    expected.backward()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, x2.grad)


def test_special_cases_agree_with_general_op():
    x = _random((2, 9, 7, 6), torch.float64, seed=5)
    for lam in (1, 2, 4):
        general = align2nat(
            x, in_cells=3, out_cells=3 * lam, unit_hw=lam, unit_vu=1, aligned_unit_hw=1, aligned_unit_vu=lam
        )
        assert torch.equal(swap_align2nat(x, lam), general)
    x25 = _random((1, 25, 6, 5), torch.float64, seed=6)
    for mode in ("bilinear", "nearest"):
        general = align2nat(
            x25, in_cells=5, out_cells=15, unit_hw=1, unit_vu=1, aligned_unit_hw=1, aligned_unit_vu=3, mode=mode
        )
        assert torch.equal(up_align2nat(x25, 3, (15, 15), mode=mode), general)
    # lambda = 1 swap is the plain align2nat of the paper (alpha = 1): a shift by (v - (S-1)/2, u - (S-1)/2).
    shifted = swap_align2nat(x, 1)
    assert torch.equal(shifted[:, 4], x[:, 4])  # the centre cell does not move
    assert torch.equal(shifted[:, 0, 1:, 1:], x[:, 0, :-1, :-1])  # cell (0, 0) reads (y - 1, x - 1)


def test_backward_is_deterministic():
    require_extension()
    x = _random((2, 9, 13, 11), torch.float32, seed=7).requires_grad_()
    grad_out = torch.randn(2, 36, 7, 6)
    first = run_extension_backward(grad_out, swap_geometry(3, 2), (13, 11), "bilinear")
    for _ in range(3):
        assert torch.equal(run_extension_backward(grad_out, swap_geometry(3, 2), (13, 11), "bilinear"), first)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", CASES, ids=[c[0] for c in CASES])
def test_cuda_matches_cpu(name, shape, geom, mode, dtype):
    require_extension()
    x = _random(shape, dtype, seed=len(name))
    expected = run_reference(x, geom, -6.0, mode)
    got = run_extension(x.cuda(), geom, -6.0, mode).cpu()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    grad_out = _random(expected.shape, dtype, seed=9)
    cpu_grad = run_extension_backward(grad_out, geom, shape[2:], mode)
    cuda_grad = run_extension_backward(grad_out.cuda(), geom, shape[2:], mode)
    torch.testing.assert_close(cuda_grad.cpu(), cpu_grad, rtol=tol * 10, atol=tol * 10)
    assert torch.equal(run_extension_backward(grad_out.cuda(), geom, shape[2:], mode), cuda_grad)  # deterministic


@pytest.mark.gpu
def test_cuda_gradcheck_and_opcheck():
    require_extension()
    x = torch.randn(1, 9, 5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: swap_align2nat(t, 2), (x,))
    geom = swap_geometry(3, 2)
    torch.library.opcheck(
        torch.ops.tensormask.align2nat.default, (x, [3, 3], [6, 6], [3, 2], *geom.units, -6.0, "bilinear")
    )
    assert swap_align2nat(torch.empty(0, 9, 4, 4, device="cuda"), 2).shape == (0, 36, 2, 2)
