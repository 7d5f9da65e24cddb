"""Shared helpers of the align2nat tests: direct calls of the extension and the reference."""

from __future__ import annotations

import math

import pytest
import torch

from tensormask.ops import backend
from tensormask.ops.geometry import Align2NatGeometry
from tensormask.ops.reference import align2nat_reference


def require_extension() -> None:
    """Skip only when the reference backend was asked for; otherwise a missing extension is a failure."""
    if backend.EXTENSION is None:
        if backend.REQUESTED == "reference":
            pytest.skip("TENSORMASK_OPS_BACKEND=reference: the extension is not loaded")
        pytest.fail(f"the compiled extension is missing: {backend.backend_summary()}")


def run_extension(x: torch.Tensor, geom: Align2NatGeometry, pad_val: float, mode: str) -> torch.Tensor:
    out_size = geom.output_size((x.shape[2], x.shape[3]))
    return torch.ops.tensormask.align2nat(
        x, list(geom.in_cells), list(geom.out_cells), list(out_size), *geom.units, float(pad_val), mode
    )


def run_extension_backward(grad_out: torch.Tensor, geom: Align2NatGeometry, in_size, mode: str) -> torch.Tensor:
    return torch.ops.tensormask.align2nat_backward(
        grad_out, list(geom.in_cells), list(geom.out_cells), list(in_size), *geom.units, mode
    )


def run_reference(x: torch.Tensor, geom: Align2NatGeometry, pad_val: float, mode: str) -> torch.Tensor:
    return align2nat_reference(x, geom, geom.output_size((x.shape[2], x.shape[3])), float(pad_val), mode)


def section4_oracle(x: torch.Tensor, lambda_val: int, pad_val: float = -6.0) -> torch.Tensor:
    """docs/ops.md's swap_align2nat (detectron2's SwapAlign2Nat) written out literally in Python floats (IEEE float64), in detectron2's
    order of operations: weight ((wy * wx) * wv) * wu, the 16 terms summed y, x, v, u.
    x: (N, S*S, H, W) float64 -> (N, (lambda S)^2, ceil(H / lambda), ceil(W / lambda))."""
    n_, c_, h_, w_ = x.shape
    s = math.isqrt(c_)
    so = lambda_val * s
    ho, wo = -(-h_ // lambda_val), -(-w_ // lambda_val)
    data = x.tolist()

    def get(n, v, u, y, xx):
        if 0 <= v < s and 0 <= u < s and 0 <= y < h_ and 0 <= xx < w_:
            return data[n][v * s + u][y][xx]
        return pad_val

    def taps(c):
        f, cc = math.floor(c), math.ceil(c)
        return ((f, 1.0 - (c - f)), (cc, c - f))

    out = torch.empty(n_, so * so, ho, wo, dtype=torch.float64)
    for n in range(n_):
        for v in range(so):
            for u in range(so):
                for y in range(ho):
                    for xx in range(wo):
                        oy = y * lambda_val + v - so / 2 + 0.5
                        ox = xx * lambda_val + u - so / 2 + 0.5
                        ov = (v + 0.5) / lambda_val - 0.5
                        ou = (u + 0.5) / lambda_val - 0.5
                        total = None
                        for yi, wy in taps(oy):
                            for xi, wx in taps(ox):
                                for vi, wv in taps(ov):
                                    for ui, wu in taps(ou):
                                        term = wy * wx * wv * wu * get(n, vi, ui, yi, xi)
                                        total = term if total is None else total + term
                        out[n, v * so + u, y, xx] = total
    return out
