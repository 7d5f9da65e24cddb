"""The CUDA kernels on a GPU (marked `gpu`: skipped without one; run by scripts/gpu_check.sh).

The first test asserts that the CUDA kernels are loaded at all: without them every other test here
would quietly run the pure-PyTorch reference on the GPU and pass.
"""

import os
import subprocess
import sys

import pytest
import torch

from align2nat_helpers import require_extension, run_extension, run_extension_backward, run_reference
from tensormask.ops import backend, swap_align2nat, up_align2nat
from tensormask.ops.geometry import make_geometry, swap_geometry, up_geometry

pytestmark = pytest.mark.gpu

GEOMETRIES = [
    ("swap-S3-l2", (2, 9, 11, 13), swap_geometry(3, 2)),
    ("swap-S5-l3", (1, 25, 7, 8), swap_geometry(5, 3)),
    ("swap-S3-l1", (1, 9, 6, 7), swap_geometry(3, 1)),
    ("up-l3-15", (1, 25, 5, 6), up_geometry(torch.empty(1, 25, 1, 1), 3.0, (15, 15))),
    ("general", (2, 6, 9, 8), make_geometry((2, 3), (5, 7), 1.5, 0.75, 1.0, 2.0)),
    ("au3-halves", (1, 9, 10, 9), make_geometry((3, 3), (6, 6), 1.5, 1.5, 3.0, 1.0)),
    ("au3-uvu0.7", (1, 16, 9, 10), make_geometry((4, 4), (7, 5), 1.0, 0.7, 3.0, 1.4)),
    ("au3-ties", (1, 9, 12, 11), make_geometry((3, 3), (6, 6), 1.0, 1.0, 3.0, 1.0)),  # nearest-mode ties
]
IDS = [g[0] for g in GEOMETRIES]


def _random(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _emulate(t, geom, size, mode, backward):
    return torch.ops.tensormask._align2nat_device_emulation(
        t, list(geom.in_cells), list(geom.out_cells), list(size), *geom.units, -6.0, mode, backward, True
    )


def test_cuda_kernel_is_loaded():
    """First: the extension is built with CUDA kernels and they run (not the reference)."""
    require_extension()
    assert backend.has_kernel("cuda"), backend.backend_summary()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tensormask::align2nat_backward", "CUDA")
    x = torch.randn(1, 9, 4, 4, device="cuda")
    assert backend.use_extension(x)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", GEOMETRIES, ids=IDS)
def test_float64_forward_is_cpu_and_reference_bit_for_bit(name, shape, geom, mode):
    require_extension()
    x = _random(shape, torch.float64, seed=len(name))
    cuda = run_extension(x.cuda(), geom, -6.0, mode).cpu()
    assert torch.equal(cuda, run_reference(x, geom, -6.0, mode))
    assert torch.equal(cuda, run_extension(x, geom, -6.0, mode))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name, shape, geom", GEOMETRIES, ids=IDS)
def test_cuda_is_its_cpu_emulation_bit_for_bit(name, shape, geom, mode, dtype):
    """Forward and backward give the bits of the CPU run of the same per-element functions."""
    require_extension()
    x = _random(shape, dtype, seed=len(name))
    out_size = geom.output_size(shape[2:])
    assert torch.equal(run_extension(x.cuda(), geom, -6.0, mode).cpu(), _emulate(x, geom, out_size, mode, False))
    grad_out = _random((shape[0], geom.out_cells[0] * geom.out_cells[1], *out_size), dtype, seed=9)
    cuda_grad = run_extension_backward(grad_out.cuda(), geom, shape[2:], mode)
    assert torch.equal(cuda_grad.cpu(), _emulate(grad_out, geom, shape[2:], mode, True))
    assert torch.equal(run_extension_backward(grad_out.cuda(), geom, shape[2:], mode), cuda_grad)  # repeatable


def test_over_2_31_elements():
    """fp16, lambda 1: an output of more than 2^31 elements (64-bit indices), positions near the end."""
    require_extension()
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    geom = swap_geometry(5, 1)
    h, w = 4096, 21000  # 25 * 4096 * 21000 = 2.15e9 > 2^31
    x = torch.randn(1, 25, h, w, dtype=torch.float16, device="cuda")
    out = run_extension(x, geom, -6.0, "bilinear")
    assert out.numel() > 2**31
    # The last 8 x 8 positions depend on the last 10 x 10 inputs only (cells shift by at most 2):
    # against the CPU kernels run on the last 12 x 12 (lambda 1, odd S: copies, the same bits).
    crop = x[:, :, -12:, -12:].cpu()
    assert torch.equal(out[:, :, -8:, -8:].cpu(), run_extension(crop, geom, -6.0, "bilinear")[:, :, -8:, -8:])
    grad = run_extension_backward(out, geom, (h, w), "bilinear")
    assert grad.shape == x.shape
    out_crop = out[:, :, -12:, -12:].cpu()
    expected = run_extension_backward(out_crop, geom, (12, 12), "bilinear")[:, :, -8:, -8:]
    assert torch.equal(grad[:, :, -8:, -8:].cpu(), expected)
    del out, grad


def test_real_batch_shape():
    """The real batch case: (16, 225, 200, 304), lambda 2, forward and backward against the CPU kernels."""
    require_extension()
    x = torch.randn(16, 225, 200, 304, device="cuda")
    out = swap_align2nat(x, 2)
    assert out.shape == (16, 900, 100, 152)
    for n in (0, 15):
        torch.testing.assert_close(out[n].cpu(), swap_align2nat(x[n : n + 1].cpu(), 2)[0], rtol=1e-6, atol=1e-5)
    grad_out = torch.randn_like(out)
    grad = run_extension_backward(grad_out, swap_geometry(15, 2), (200, 304), "bilinear")
    cpu = run_extension_backward(grad_out[15:].cpu(), swap_geometry(15, 2), (200, 304), "bilinear")
    torch.testing.assert_close(grad[15:].cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_grad_out():
    require_extension()
    geom = swap_geometry(3, 2)
    base = torch.randn(2, 9, 13, 22, dtype=torch.float64, device="cuda")
    x = base[:, :, :, ::2]  # non-contiguous
    assert not x.is_contiguous()
    assert torch.equal(run_extension(x, geom, -6.0, "bilinear"), run_extension(x.contiguous(), geom, -6.0, "bilinear"))
    g_base = torch.randn(2, 36, 14, 7, dtype=torch.float64, device="cuda").transpose(2, 3)
    assert not g_base.is_contiguous()
    assert torch.equal(
        run_extension_backward(g_base, geom, (13, 27), "bilinear"),
        run_extension_backward(g_base.contiguous(), geom, (13, 27), "bilinear"),
    )


def test_non_default_stream_and_cuda_graph():
    require_extension()
    geom = swap_geometry(3, 2)
    x = torch.randn(2, 9, 12, 10, device="cuda", requires_grad=True)
    expected = swap_align2nat(x, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        on_stream = swap_align2nat(x, 2)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(on_stream, expected)
    # capture forward + backward in a CUDA graph and replay it with new data
    static_x = torch.randn(2, 9, 12, 10, device="cuda", requires_grad=True)
    static_g = torch.randn(2, 36, 6, 5, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph
            (grad,) = torch.autograd.grad(swap_align2nat(static_x, 2), static_x, static_g)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = swap_align2nat(static_x, 2)
        (static_grad,) = torch.autograd.grad(static_out, static_x, static_g)
    with torch.no_grad():
        static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
    assert torch.equal(static_grad, run_extension_backward(static_g, geom, (12, 10), "bilinear"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    require_extension()
    x = torch.randn(1, 9, 8, 8, dtype=torch.float64)
    out = swap_align2nat(x.to("cuda:1"), 2)
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), swap_align2nat(x, 2))


def test_empty_cases():
    require_extension()
    geom = swap_geometry(3, 2)
    # Hin = 0 gives Hout = 0; a non-empty out_size for it is refused as inconsistent, as on the CPU
    x = torch.empty(2, 9, 0, 5, device="cuda")
    assert run_extension(x, geom, -6.0, "bilinear").shape == (2, 36, 0, 3)
    with pytest.raises(ValueError, match=r"out_size must be ceil\(\(Hin, Win\) \* aligned_unit_hw / unit_hw\)"):
        torch.ops.tensormask.align2nat(x, [3, 3], [6, 6], [1, 3], *geom.units, -6.0, "bilinear")
    # channels of an empty batch, and an empty grad_out of the right size
    assert swap_align2nat(torch.empty(0, 9, 4, 4, device="cuda"), 2).shape == (0, 36, 2, 2)
    grad = run_extension_backward(torch.empty(2, 36, 0, 3, device="cuda"), geom, (0, 5), "bilinear")
    assert grad.shape == (2, 9, 0, 5)
    # an empty grad_out that does not fit a non-empty grad_x is refused, as on the CPU
    with pytest.raises(ValueError, match="does not fit in_size"):
        run_extension_backward(torch.empty(2, 36, 0, 3, device="cuda"), geom, (4, 5), "bilinear")
    # up_align2nat keeps H, W: an input with no rows gives an output with no rows, the pad nowhere
    assert up_align2nat(torch.empty(1, 4, 0, 3, device="cuda"), 2, 4).shape == (1, 16, 0, 3)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_gradcheck_gradgradcheck_and_opcheck(mode):
    require_extension()
    geom = make_geometry((2, 3), (5, 7), 1.5, 0.75, 1.0, 2.0)
    x = torch.randn(1, 6, 5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    out_size = list(geom.output_size((5, 4)))

    def op(t):
        return torch.ops.tensormask.align2nat(t, [2, 3], [5, 7], out_size, *geom.units, -6.0, mode)

    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))
    args = (x.detach(), [2, 3], [5, 7], out_size, *geom.units, -6.0, mode)
    torch.library.opcheck(torch.ops.tensormask.align2nat.default, args)
    grad_out = torch.randn(1, 35, *out_size, dtype=torch.float64, device="cuda")
    torch.library.opcheck(
        torch.ops.tensormask.align2nat_backward.default, (grad_out, [2, 3], [5, 7], [5, 4], *geom.units, mode)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_deterministic_fp16_bf16(dtype):
    require_extension()
    x = torch.randn(2, 25, 33, 41, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(2, 100, 17, 21, device="cuda", dtype=dtype)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            out = swap_align2nat(x, 2)
            (grad,) = torch.autograd.grad(out, x, grad_out)
            runs.append((out, grad))
    finally:
        torch.use_deterministic_algorithms(before)
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_torch_compile_fullgraph_inductor():
    require_extension()
    x = torch.randn(2, 9, 12, 10, device="cuda", requires_grad=True)

    def f(t):
        return torch.sigmoid(swap_align2nat(t, 2)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    (expected,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(value, f(x))
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_nonfinite_grad_out_like_the_cpu(mode):
    require_extension()
    geom = up_geometry(torch.empty(1, 25, 1, 1), 3.0, (15, 15))  # spatial weights (1, 0)
    grad_out = torch.randn(1, 225, 5, 6, dtype=torch.float64)
    grad_out.view(-1)[[7, 500, 3000]] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64)
    cpu = run_extension_backward(grad_out, geom, (5, 6), mode)
    cuda = run_extension_backward(grad_out.cuda(), geom, (5, 6), mode).cpu()
    assert torch.equal(torch.isnan(cuda), torch.isnan(cpu)) and torch.equal(torch.isinf(cuda), torch.isinf(cpu))
    torch.testing.assert_close(cuda[torch.isfinite(cpu)], cpu[torch.isfinite(cpu)], rtol=1e-12, atol=1e-12)


def test_cpu_only_build_fails_loudly():
    """The guard of test_cuda_kernel_is_loaded, seen from outside: a process told to use the extension
    on a GPU without CUDA kernels raises instead of falling back (backend.use_extension)."""
    code = (
        "import torch, tensormask.ops.backend as b\n"
        "b.KERNELS['cuda'] = False\n"
        "from tensormask.ops import swap_align2nat\n"
        "swap_align2nat(torch.zeros(1, 9, 4, 4, device='cuda'), 2)\n"
    )
    env = dict(os.environ, TENSORMASK_OPS_BACKEND="extension")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "has no cuda kernel" in proc.stderr
