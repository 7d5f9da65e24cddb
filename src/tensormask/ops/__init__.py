"""The align2nat op family of TensorMask (the paper's natural / aligned representations and tensor bipyramid; appendix A.1, A.2; docs/ops.md).

Dense ops (compiled kernels `torch.ops.tensormask.*`, or the pure-PyTorch reference):
  align2nat(x, *, in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu,
            pad_val=-6.0, mode="bilinear")       aligned (N, Vin*Uin, H, W) -> natural (N, Vout*Uout, Hout, Wout)
  swap_align2nat(x, lambda_val, pad_val=-6.0)   (N, S*S, H, W) -> (N, (lambda S)^2, ceil(H/lambda), ceil(W/lambda))
  up_align2nat(x, lambda_val, out_cells, pad_val=-6.0, mode="bilinear")
                                                (N, (Vout/lambda)*(Uout/lambda), H, W) -> (N, Vout*Uout, H, W)
Sparse evaluation at D output positions (inference; pure PyTorch, differentiable):
  align2nat_at(x, batch_index, ys, xs, *, <align2nat's keywords>) -> (D, Vout*Uout)
  swap_align2nat_at(x, lambda_val, batch_index, ys, xs, pad_val=-6.0) -> (D, (lambda S)^2)
  up_align2nat_at(x, lambda_val, out_cells, batch_index, ys, xs, pad_val=-6.0, mode="bilinear") -> (D, Vout*Uout)
Sparse evaluation of one window on a block of its cells (inference of large windows):
  swap_align2nat_region(x, lambda_val, batch_index, y, x_pos, (v0, v1, u0, u1), pad_val=-6.0, cache=None)
                                                -> (v1 - v0, u1 - u0)
Modules: Align2Nat, SwapAlign2Nat, UpAlign2Nat. backend_summary() says which backend runs.
"""

from .backend import backend_summary
from .functional import (
    align2nat,
    align2nat_at,
    swap_align2nat,
    swap_align2nat_at,
    swap_align2nat_region,
    up_align2nat,
    up_align2nat_at,
)
from .modules import Align2Nat, SwapAlign2Nat, UpAlign2Nat

__all__ = [
    "Align2Nat",
    "SwapAlign2Nat",
    "UpAlign2Nat",
    "align2nat",
    "align2nat_at",
    "backend_summary",
    "swap_align2nat",
    "swap_align2nat_at",
    "swap_align2nat_region",
    "up_align2nat",
    "up_align2nat_at",
]
