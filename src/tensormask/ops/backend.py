"""Which implementation runs the ops: the compiled extension `tensormask._C` or the reference.

TENSORMASK_OPS_BACKEND (read once, at import):
  auto       the extension if it imports, else the pure-PyTorch reference with one warning (default)
  extension  the extension; an error if it is missing
  reference  the pure-PyTorch reference; the extension is never loaded

The extension declares its schemas with TORCH_LIBRARY(tensormask, m) and registers CPU (and, when
built with TENSORMASK_CUDA=1, CUDA) kernels; this file adds what lives in Python beside them: fake
kernels for torch.compile and autograd, whose backward is itself the registered op
`tensormask::align2nat_backward` (and whose double backward is the forward again, the op being
affine in x).
"""

from __future__ import annotations

import os
import warnings

import torch

ENV_VAR = "TENSORMASK_OPS_BACKEND"
CHOICES = ("auto", "extension", "reference")
OPS = ("tensormask::align2nat", "tensormask::align2nat_backward")


def _requested() -> str:
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r}: expected one of {CHOICES}")
    return choice


def _load_extension(choice: str):
    """(module or None, why not) for the requested backend."""
    if choice == "reference":
        return None, f"{ENV_VAR}=reference"
    try:
        from tensormask import _C  # noqa: F401  (importing registers the ops)
    except ImportError as error:
        if choice == "extension":
            raise ImportError(
                f"{ENV_VAR}=extension but the compiled extension tensormask._C is not importable ({error}). "
                "Build it with `pip install --no-build-isolation -e .` (see scripts/setup.sh)."
            ) from error
        why = f"tensormask._C is not importable ({error})"
        warnings.warn(
            f"tensormask.ops: {why}; using the pure-PyTorch reference implementation of align2nat, which is "
            f"much slower. Build the extension (scripts/setup.sh) or set {ENV_VAR}=reference to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, why
    return _C, ""


REQUESTED = _requested()
EXTENSION, _WHY_NOT = _load_extension(REQUESTED)


def _compiled_kernels() -> dict[str, bool]:
    if EXTENSION is None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {"cpu": has("tensormask::align2nat", "CPU"), "cuda": has("tensormask::align2nat", "CUDA")}


KERNELS = _compiled_kernels()  # fixed once loaded; a dict lookup is also what torch.compile can trace


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for this device type ("cpu", "cuda")."""
    return KERNELS.get(device_type, False)


_warned_devices: set[str] = set()


def use_extension(x: torch.Tensor) -> bool:
    """True when the extension runs x's device; False means the reference runs it."""
    if EXTENSION is None:
        return False
    if has_kernel(x.device.type):
        return True
    if REQUESTED == "extension":
        raise RuntimeError(
            f"{ENV_VAR}=extension but tensormask._C has no {x.device.type} kernel "
            "(build with TENSORMASK_CUDA=1 and a TORCH_CUDA_ARCH_LIST for CUDA kernels)"
        )
    if x.device.type not in _warned_devices:
        _warned_devices.add(x.device.type)
        warnings.warn(
            f"tensormask._C was built without {x.device.type} kernels; align2nat uses the pure-PyTorch reference there",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def backend_summary() -> str:
    """One line: which backend is active and which kernels are compiled."""
    if EXTENSION is None:
        return f"tensormask.ops backend: reference (pure PyTorch) [{ENV_VAR}={REQUESTED}; {_WHY_NOT}]"
    kernels = ", ".join(f"{d.upper()} kernels {'yes' if has_kernel(d) else 'no'}" for d in ("cpu", "cuda"))
    return f"tensormask.ops backend: extension tensormask._C ({kernels}) [{ENV_VAR}={REQUESTED}]"


def _register_python_parts() -> None:
    """Fake kernels and autograd for the extension's ops."""

    @torch.library.register_fake("tensormask::align2nat")
    def _align2nat_fake(x, in_cells, out_cells, out_size, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu,
                        pad_val, mode):
        torch._check(x.dim() == 4, lambda: f"align2nat: x must have rank 4, got {x.dim()}")
        return x.new_empty((x.shape[0], out_cells[0] * out_cells[1], out_size[0], out_size[1]))

    @torch.library.register_fake("tensormask::align2nat_backward")
    def _align2nat_backward_fake(grad_out, in_cells, out_cells, in_size, unit_hw, unit_vu, aligned_unit_hw,
                                 aligned_unit_vu, mode):
        torch._check(grad_out.dim() == 4, lambda: f"align2nat_backward: grad_out must have rank 4, got {grad_out.dim()}")
        return grad_out.new_empty((grad_out.shape[0], in_cells[0] * in_cells[1], in_size[0], in_size[1]))

    def _forward_setup(ctx, inputs, output):
        x, in_cells, out_cells, _, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu, _, mode = inputs
        ctx.args = (in_cells, out_cells, [x.shape[2], x.shape[3]], unit_hw, unit_vu, aligned_unit_hw,
                    aligned_unit_vu, mode)

    def _forward_backward(ctx, grad_out):
        grad_x = torch.ops.tensormask.align2nat_backward(grad_out, *ctx.args)
        return (grad_x,) + (None,) * 9

    torch.library.register_autograd("tensormask::align2nat", _forward_backward, setup_context=_forward_setup)

    def _backward_setup(ctx, inputs, output):
        grad_out, in_cells, out_cells, _, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu, mode = inputs
        ctx.args = (in_cells, out_cells, [grad_out.shape[2], grad_out.shape[3]], unit_hw, unit_vu,
                    aligned_unit_hw, aligned_unit_vu)
        ctx.mode = mode

    def _backward_backward(ctx, grad_grad_x):
        # align2nat(x) = A x + pad * b, its backward is A^T; the adjoint of A^T is A: the forward, pad 0.
        grad_grad_out = torch.ops.tensormask.align2nat(grad_grad_x, *ctx.args, 0.0, ctx.mode)
        return (grad_grad_out,) + (None,) * 8

    torch.library.register_autograd(
        "tensormask::align2nat_backward", _backward_backward, setup_context=_backward_setup
    )


if EXTENSION is not None:
    _register_python_parts()
