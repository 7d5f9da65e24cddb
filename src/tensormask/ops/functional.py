"""The align2nat op family: public functions (the API of `tensormask.ops`).

Representations (the paper's natural and aligned representations; docs/ops.md): an *aligned* tensor (N, Vin*Uin, Hin, Win) stores at pixel
(y^, x^) the value of that pixel for the window centred at (y^ - alpha v^, x^ - alpha u^); the
*natural* tensor (N, Vout*Uout, Hout, Wout) stores mask cell (v, u) of the window centred at (y, x).
Channel c = v * U + u. Every function here validates its arguments, then runs the compiled kernels
(`torch.ops.tensormask.align2nat`) or the pure-PyTorch reference (see `backend.py`).
"""

from __future__ import annotations

import torch

from . import backend
from .geometry import (
    Align2NatGeometry,
    check_channels,
    check_input,
    check_lambda,
    check_mode,
    make_geometry,
    swap_cells,
    swap_geometry,
    up_geometry,
)
from .reference import align2nat_at_reference, align2nat_reference


def _run(x: torch.Tensor, geom: Align2NatGeometry, pad_val: float, mode: str) -> torch.Tensor:
    out_size = geom.output_size((x.shape[2], x.shape[3]))
    if backend.use_extension(x):
        return torch.ops.tensormask.align2nat(
            x, list(geom.in_cells), list(geom.out_cells), list(out_size), *geom.units, float(pad_val), mode
        )
    return align2nat_reference(x, geom, out_size, float(pad_val), mode)


def align2nat(
    x: torch.Tensor,
    *,
    in_cells,
    out_cells,
    unit_hw: float,
    unit_vu: float,
    aligned_unit_hw: float,
    aligned_unit_vu: float,
    pad_val: float = -6.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """General align2nat, appendix A.1 eq. (5).

    x: aligned (N, Vin*Uin, Hin, Win) with in_cells = (Vin, Uin) (an int means square).
    Returns natural (N, Vout*Uout, Hout, Wout), out_cells = (Vout, Uout),
    Hout = ceil(Hin * aligned_unit_hw / unit_hw) (likewise Wout).
    Units are image pixels per step: unit_hw / aligned_unit_hw of the output / input (y, x) grids,
    unit_vu / aligned_unit_vu of the output / input mask cells. mode: "bilinear" (16 taps) or
    "nearest" (round half up; InstanceFCN, A.2). Taps outside the input read pad_val (no gradient).
    """
    check_input(x)
    check_mode(mode)
    geom = make_geometry(in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)
    check_channels(x, geom)
    return _run(x, geom, pad_val, mode)


def swap_align2nat(x: torch.Tensor, lambda_val: int, pad_val: float = -6.0) -> torch.Tensor:
    """Tensor-bipyramid swap: up_align2nat by lambda then HW subsampling by lambda, in one pass.

    x: aligned (N, S*S, Hin, Win); lambda_val: int >= 1. Returns natural
    (N, (lambda*S)^2, ceil(Hin / lambda), ceil(Win / lambda)), bilinear, equal to detectron2's
    SwapAlign2Nat (docs/ops.md).
    """
    check_input(x)
    check_lambda(lambda_val, integer=True)
    geom = swap_geometry(swap_cells(x), int(lambda_val))
    return _run(x, geom, pad_val, "bilinear")


def up_align2nat(
    x: torch.Tensor, lambda_val: float, out_cells, pad_val: float = -6.0, mode: str = "bilinear"
) -> torch.Tensor:
    """Aligned upscaling head (Table 2a/2b): upsample VU by lambda, then align2nat; same HW grid.

    x: aligned (N, (Vout/lambda)*(Uout/lambda), H, W); lambda_val >= 1 (may be fractional, e.g. 1.5,
    as long as out_cells / lambda are integers). Returns natural (N, Vout*Uout, H, W).
    """
    check_input(x)
    check_mode(mode)
    geom = up_geometry(x, check_lambda(lambda_val, integer=False), out_cells)
    return _run(x, geom, pad_val, mode)


def _check_positions(x: torch.Tensor, batch_index, ys, xs) -> None:
    for name, t in (("batch_index", batch_index), ("ys", ys), ("xs", xs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor of output positions (D,)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: expected the same device")
    if not (batch_index.shape[0] == ys.shape[0] == xs.shape[0]):
        raise ValueError(
            f"batch_index, ys, xs must have the same length D, got {batch_index.shape[0]}, {ys.shape[0]}, {xs.shape[0]}"
        )


def align2nat_at(
    x: torch.Tensor,
    batch_index: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    *,
    in_cells,
    out_cells,
    unit_hw: float,
    unit_vu: float,
    aligned_unit_hw: float,
    aligned_unit_vu: float,
    pad_val: float = -6.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """`align2nat` evaluated at D output positions only (sparse inference; pure PyTorch, differentiable).

    x: aligned (N, Vin*Uin, Hin, Win); batch_index, ys, xs: int (D,) positions in the output grid
    (0 <= ys < Hout, 0 <= xs < Wout). Returns (D, Vout*Uout) =
    align2nat(x, ...)[batch_index, :, ys, xs] without computing the other windows.
    """
    check_input(x)
    check_mode(mode)
    geom = make_geometry(in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)
    check_channels(x, geom)
    _check_positions(x, batch_index, ys, xs)
    return align2nat_at_reference(x, geom, batch_index.long(), ys.long(), xs.long(), float(pad_val), mode)


def swap_align2nat_at(
    x: torch.Tensor,
    lambda_val: int,
    batch_index: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_val: float = -6.0,
) -> torch.Tensor:
    """`swap_align2nat` evaluated at D output positions only.

    x: aligned (N, S*S, Hin, Win); batch_index, ys, xs: int (D,) positions in the output grid
    (ceil(Hin / lambda), ceil(Win / lambda)). Returns (D, (lambda*S)^2) =
    swap_align2nat(x, lambda_val)[batch_index, :, ys, xs].
    """
    check_input(x)
    check_lambda(lambda_val, integer=True)
    geom = swap_geometry(swap_cells(x), int(lambda_val))
    _check_positions(x, batch_index, ys, xs)
    return align2nat_at_reference(x, geom, batch_index.long(), ys.long(), xs.long(), float(pad_val), "bilinear")


def up_align2nat_at(
    x: torch.Tensor,
    lambda_val: float,
    out_cells,
    batch_index: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_val: float = -6.0,
    mode: str = "bilinear",
) -> torch.Tensor:
    """`up_align2nat` evaluated at D output positions only.

    x: aligned (N, (Vout/lambda)*(Uout/lambda), H, W); batch_index, ys, xs: int (D,) positions on the
    (H, W) grid. Returns (D, Vout*Uout) = up_align2nat(x, lambda_val, out_cells)[batch_index, :, ys, xs].
    """
    check_input(x)
    check_mode(mode)
    geom = up_geometry(x, check_lambda(lambda_val, integer=False), out_cells)
    _check_positions(x, batch_index, ys, xs)
    return align2nat_at_reference(x, geom, batch_index.long(), ys.long(), xs.long(), float(pad_val), mode)


def swap_align2nat_region(
    x: torch.Tensor,
    lambda_val: int,
    batch_index: int,
    y: int,
    x_pos: int,
    region: tuple[int, int, int, int],
    pad_val: float = -6.0,
    cache: dict | None = None,
) -> torch.Tensor:
    """`swap_align2nat` of ONE window, only on its cells [v0, v1) x [u0, u1).

    x: aligned (N, S*S, Hin, Win); (batch_index, y, x_pos): the window's position on the output grid;
    region = (v0, v1, u0, u1) within [0, lambda*S). Returns (v1 - v0, u1 - u0) =
    swap_align2nat(x, lambda_val)[batch_index, :, y, x_pos].view(lambda*S, lambda*S)[v0:v1, u0:u1],
    equal up to float summation order. Inference asks only for the cells that land in the image
    (the bipyramid's large windows reach far outside it). ``cache``: a dict reused across calls on
    the same x (holds the pad-bordered image of batch_index).

    The 16-tap interpolation (appendix A.1 eq. (5); docs/ops.md) is separable: the row tap and the
    V-cell tap depend only on v, the column tap and the U-cell tap only on u. So it is evaluated as
    two small gathers (v side, then u side) on x padded by one pad-valued border in every axis (a
    tap outside the input is clamped onto that border and reads the pad value).
    """
    v0, v1, u0, u1 = region
    x_al = x[batch_index]  # (S*S, H2, W2)
    if v1 <= v0 or u1 <= u0:
        return x_al.new_zeros(max(v1 - v0, 0), max(u1 - u0, 0))
    s = swap_cells(x)
    lam = int(lambda_val)
    out_cells = lam * s
    _, h2, w2 = x_al.shape
    cache = {} if cache is None else cache
    key = ("padded", batch_index)
    if key not in cache:
        padded = torch.nn.functional.pad(x_al.reshape(s, s, h2, w2), (1, 1, 1, 1, 1, 1, 1, 1), value=pad_val)
        # rows of (U-cell, column) slabs indexed by (V-cell, grid row): one index_select per tap
        cache[key] = padded.permute(0, 2, 1, 3).reshape((s + 2) * (h2 + 2), s + 2, w2 + 2)
    slabs = cache[key]  # ((S+2)*(H2+2), S+2, W2+2)

    def taps(pos: int, first: int, last: int, size: int):
        """Grid and cell taps (indices into the padded tensor) and weights for cells [first, last)."""
        c = torch.arange(first, last, device=x_al.device, dtype=torch.float32)
        grid = lam * pos + c - out_cells / 2 + 0.5  # position on the aligned grid
        cell = (c + 0.5) / lam - 0.5  # position among the S aligned cells
        g0, k0 = torch.floor(grid), torch.floor(cell)
        wg, wk = grid - g0, cell - k0
        g0, k0 = g0.long() + 1, k0.long() + 1  # +1: the pad border
        gi = [g0.clamp(0, size + 1), (g0 + 1).clamp(0, size + 1)]
        ki = [k0.clamp(0, s + 1), (k0 + 1).clamp(0, s + 1)]
        return gi, [1 - wg, wg], ki, [1 - wk, wk]

    rows, w_rows, vcells, w_v = taps(y, v0, v1, h2)
    cols, w_cols, ucells, w_u = taps(x_pos, u0, u1, w2)
    c_lo, c_hi = int(cols[0].min()), int(cols[1].max()) + 1
    stage = None  # (Lv, S+2, Wc): v side contracted
    for r, wr in zip(rows, w_rows):
        for k, wk in zip(vcells, w_v):
            band = slabs.index_select(0, k * (h2 + 2) + r)[:, :, c_lo:c_hi]  # (Lv, S+2, Wc)
            term = (wr * wk)[:, None, None] * band
            stage = term if stage is None else stage + term
    out = None  # (Lv, Lu)
    for c, wc in zip(cols, w_cols):
        for k, wk in zip(ucells, w_u):
            term = (wc * wk)[None, :] * stage[:, k, c - c_lo]
            out = term if out is None else out + term
    return out
