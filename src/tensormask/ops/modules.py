"""nn.Module wrappers of the align2nat op family (no parameters; they hold the op's settings)."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .geometry import check_lambda, check_mode, make_geometry


class Align2Nat(nn.Module):
    """General align2nat (eq. (5)): aligned (N, Vin*Uin, H, W) -> natural (N, Vout*Uout, Hout, Wout)."""

    def __init__(self, *, in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu,
                 pad_val: float = -6.0, mode: str = "bilinear"):
        super().__init__()
        geom = make_geometry(in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)
        self.in_cells, self.out_cells = geom.in_cells, geom.out_cells
        self.unit_hw, self.unit_vu, self.aligned_unit_hw, self.aligned_unit_vu = geom.units
        self.pad_val = float(pad_val)
        self.mode = check_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.align2nat(
            x, in_cells=self.in_cells, out_cells=self.out_cells, unit_hw=self.unit_hw, unit_vu=self.unit_vu,
            aligned_unit_hw=self.aligned_unit_hw, aligned_unit_vu=self.aligned_unit_vu, pad_val=self.pad_val,
            mode=self.mode,
        )

    def extra_repr(self) -> str:
        return (
            f"in_cells={self.in_cells}, out_cells={self.out_cells}, unit_hw={self.unit_hw:g}, "
            f"unit_vu={self.unit_vu:g}, aligned_unit_hw={self.aligned_unit_hw:g}, "
            f"aligned_unit_vu={self.aligned_unit_vu:g}, pad_val={self.pad_val:g}, mode={self.mode!r}"
        )


class SwapAlign2Nat(nn.Module):
    """Tensor-bipyramid swap: aligned (N, S*S, H, W) -> natural (N, (lambda*S)^2, ceil(H/lambda), ceil(W/lambda))."""

    def __init__(self, lambda_val: int, pad_val: float = -6.0):
        super().__init__()
        check_lambda(lambda_val, integer=True)
        self.lambda_val = int(lambda_val)
        self.pad_val = float(pad_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.swap_align2nat(x, self.lambda_val, self.pad_val)

    def extra_repr(self) -> str:
        return f"lambda_val={self.lambda_val}, pad_val={self.pad_val:g}"


class UpAlign2Nat(nn.Module):
    """Aligned upscaling head: aligned (N, (Vout/lambda)*(Uout/lambda), H, W) -> natural (N, Vout*Uout, H, W)."""

    def __init__(self, lambda_val: float, out_cells, pad_val: float = -6.0, mode: str = "bilinear"):
        super().__init__()
        self.lambda_val = check_lambda(lambda_val, integer=False)
        self.out_cells = make_geometry(1, out_cells, 1, 1, 1, 1).out_cells
        self.pad_val = float(pad_val)
        self.mode = check_mode(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.up_align2nat(x, self.lambda_val, self.out_cells, self.pad_val, self.mode)

    def extra_repr(self) -> str:
        return f"lambda_val={self.lambda_val:g}, out_cells={self.out_cells}, pad_val={self.pad_val:g}, mode={self.mode!r}"
