"""The CPU separable fast path (float32/float16/bfloat16 bilinear with integer r_hw: swap_align2nat with
integer lambda, up_align2nat) against the pure-PyTorch reference, at the shapes where its blocking,
phase split and edge handling could go wrong."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align2nat_helpers import require_extension, run_extension, run_extension_backward, run_reference
from tensormask.ops.geometry import swap_geometry, up_geometry

FORWARD_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-2),
    torch.bfloat16: dict(rtol=8e-3, atol=6e-2),
}
BACKWARD_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (N, S, H, W, lambda): odd sizes, sizes not divisible by lambda, inputs smaller than the window
# (H or W < lambda * S) and than lambda itself, and inputs tall and wide enough for several row
# blocks per image (a block holds as many rows as two cell rows of S*W values fit in ~768 KB, ~65 rows
# for S=5, W=300; the backward recomputes the gradient row above each block).
SHAPES = [
    (1, 3, 1, 1, 1),
    (2, 5, 3, 2, 1),
    (2, 3, 41, 23, 1),
    (1, 2, 1, 3, 2),
    (2, 3, 7, 5, 2),
    (2, 4, 37, 29, 2),
    (3, 3, 50, 9, 2),
    (1, 5, 2, 3, 3),
    (1, 3, 71, 13, 3),
    (1, 2, 3, 5, 4),
    (2, 3, 45, 30, 4),
    (1, 2, 5, 7, 8),
    (1, 3, 70, 17, 8),
    (1, 1, 33, 40, 32),
    (1, 2, 5, 3, 32),
    (1, 5, 301, 300, 2),
    (2, 7, 203, 150, 4),
]


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _swap_cases():
    for n, s, h, w, lam in SHAPES:
        yield f"swap-S{s}-{h}x{w}-l{lam}", (n, s * s, h, w), swap_geometry(s, lam)
    yield "up-l3-15-tall", (1, 25, 40, 7), up_geometry(torch.empty(1, 25, 1, 1), 3.0, (15, 15))


CASES = list(_swap_cases())


@pytest.mark.parametrize("dtype", list(FORWARD_TOL), ids=str)
@pytest.mark.parametrize("name, shape, geom", CASES, ids=[c[0] for c in CASES])
def test_separable_forward_and_backward_match_reference(name, shape, geom, dtype):
    require_extension()
    x = _random(shape, dtype, seed=len(name)).requires_grad_()
    ref = run_reference(x, geom, -6.0, "bilinear")
    torch.testing.assert_close(run_extension(x.detach(), geom, -6.0, "bilinear"), ref, **FORWARD_TOL[dtype])
    grad_out = _random(ref.shape, dtype, seed=3)
    (expected,) = torch.autograd.grad(ref, x, grad_out)
    got = run_extension_backward(grad_out, geom, shape[2:], "bilinear")
    tol = BACKWARD_TOL[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("pad_val", [0.0, 2.5])
def test_separable_pad_value(pad_val):
    """Taps outside the input read pad_val (not a clamped sample) on the fast path too."""
    require_extension()
    geom = swap_geometry(3, 2)
    x = _random((1, 9, 6, 5), torch.float32, seed=11)
    torch.testing.assert_close(run_extension(x, geom, pad_val, "bilinear"), run_reference(x, geom, pad_val, "bilinear"),
                               **FORWARD_TOL[torch.float32])


@pytest.mark.parametrize("lambda_val", [1, 2, 4])
def test_separable_results_do_not_depend_on_threads(lambda_val):
    """Row blocks are split over threads; every value is summed in a fixed order regardless."""
    require_extension()
    geom = swap_geometry(3, lambda_val)
    x = _random((3, 9, 61, 19), torch.float32, seed=5)
    out_threads = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = run_extension(x, geom, -6.0, "bilinear")
            grad = run_extension_backward(torch.ones_like(out) * 0.5 + out, geom, x.shape[2:], "bilinear")
            results.append((out, grad))
    finally:
        torch.set_num_threads(out_threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(grad, results[0][1])


# (S, lambda, H, W) of float32 outputs of 8 MiB and more, written with non-temporal stores: rows of an odd
# width (staged, unaligned head and tail), and rows of whole AVX2 vectors, which the AVX2 kernels store
# straight from the registers (forward: Wout a multiple of 8; backward: W a multiple of 8 lambda), at
# lambda 1 (no phase split), 2 and 4.
STREAMING = [(3, 2, 299, 801), (3, 2, 320, 768), (3, 4, 920, 256), (2, 1, 512, 1024)]


@pytest.mark.parametrize("s, lambda_val, h, w", STREAMING, ids=[f"S{s}-l{lam}-{h}x{w}" for s, lam, h, w in STREAMING])
def test_separable_large_output_streaming_stores(s, lambda_val, h, w):
    """Outputs of 8 MiB and more are written with non-temporal stores (float32)."""
    require_extension()
    geom = swap_geometry(s, lambda_val)
    x = _random((1, s * s, h, w), torch.float32, seed=13).requires_grad_()
    ref = run_reference(x, geom, -6.0, "bilinear")
    assert ref.numel() * 4 >= 8 << 20 and x.numel() * 4 >= 8 << 20
    torch.testing.assert_close(run_extension(x.detach(), geom, -6.0, "bilinear"), ref, **FORWARD_TOL[torch.float32])
    grad_out = _random(ref.shape, torch.float32, seed=14)
    (expected,) = torch.autograd.grad(ref, x, grad_out)
    got = run_extension_backward(grad_out, geom, x.shape[2:], "bilinear")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


SIMD_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from align2nat_helpers import run_extension, run_extension_backward
from tensormask.ops.geometry import swap_geometry, up_geometry
results = []
for n, s, h, w, lam in {shapes!r}:
    geom = swap_geometry(s, lam) if lam else up_geometry(torch.empty(1, s * s, 1, 1), 2.0, (2 * s, 2 * s))
    x = torch.randn(n, s * s, h, w, generator=torch.Generator().manual_seed(h * w))
    out = run_extension(x, geom, -6.0, "bilinear")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    results.append((out, run_extension_backward(grad_out, geom, (h, w), "bilinear")))
torch.save(results, {path!r})
"""


def test_avx2_kernels_equal_portable_loops(tmp_path):
    """The AVX2 inner loops (used when the CPU has AVX2) compute the same sums in the same order as the
    portable loops (TENSORMASK_CPU_SIMD=0): the same bits, at the shapes where their overlapping last
    vectors, masked tails, in-register phase splits and direct non-temporal stores could go wrong."""
    require_extension()
    shapes = [
        (2, 3, 7, 5, 2), (1, 5, 17, 33, 2), (2, 5, 34, 35, 2), (1, 4, 40, 41, 4), (1, 3, 70, 71, 4),
        (1, 2, 9, 10, 1), (1, 4, 19, 27, 1), (1, 3, 30, 31, 3), (1, 3, 8, 8, 2), (1, 3, 18, 18, 2),
        (1, 5, 100, 37, 8), (1, 3, 320, 768, 2), (1, 3, 920, 256, 4), (1, 2, 512, 1024, 1),
        (1, 3, 21, 26, 0),  # up_align2nat, lambda 2
    ]
    tests = str(Path(__file__).parent)
    runs = {}
    for simd in ("1", "0"):
        path = tmp_path / f"simd{simd}.pt"
        env = {**os.environ, "TENSORMASK_CPU_SIMD": simd, "OMP_NUM_THREADS": "2"}
        code = SIMD_CHECK.format(tests=tests, shapes=shapes, path=str(path))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[simd] = torch.load(path)
    for shape, (simd, portable) in zip(shapes, zip(runs["1"], runs["0"])):
        assert torch.equal(simd[0], portable[0]), f"forward differs at {shape}"
        assert torch.equal(simd[1], portable[1]), f"backward differs at {shape}"
