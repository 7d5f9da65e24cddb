"""Pure-PyTorch reference of the align2nat op family (the fallback and the test oracle).

Everything is one function, `sample_natural`, that evaluates eq. (5) of appendix A.1 at any set of
output positions by gathering the 16 (bilinear) or 1 (nearest) taps from the aligned input; taps
outside the input read `pad_val` and get no gradient. The dense ops evaluate it on the full output
grid, the sparse `*_at` functions on the requested windows only. It is differentiable through
autograd (the gathers' backward is an index-add).

The arithmetic follows detectron2's SwapAlign2Nat kernel term by term (positions in the
accumulation type, weight ((wy * wx) * wv) * wu, the 16 terms summed in y, x, v, u order), so in
float64 it equals that kernel's formulas bit for bit. float16 / bfloat16 inputs are computed in
float32 and rounded once at the end.
"""

from __future__ import annotations

import torch

from .geometry import Align2NatGeometry


class _Weighted(torch.autograd.Function):
    """weight * values, whose backward passes nothing through a weight of zero: the gradient of values
    is weight * grad where weight != 0 and exactly 0 where weight == 0, not 0 * grad (which is NaN for an
    infinite grad). So a NaN / inf in grad_out reaches exactly the inputs its output depends on, as in
    every backend (docs/ops.md, "Non-finite values"). Differentiable again (the backward is linear in grad)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight * values

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return None, torch.where(weight != 0, grad * weight, torch.zeros((), dtype=grad.dtype, device=grad.device))


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_taps(coord: torch.Tensor, nearest: bool):
    """[(index int64, weight)] for one axis: floor/ceil with linear weights, or round-half-up."""
    if nearest:
        return [(torch.floor(coord + 0.5).long(), None)]
    low = torch.floor(coord)
    high = torch.ceil(coord)
    w_high = coord - low
    w_low = 1.0 - w_high
    return [(low.long(), w_low), (high.long(), w_high)]


def sample_natural(
    x: torch.Tensor,
    geom: Align2NatGeometry,
    batch: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    y: torch.Tensor,
    x_pos: torch.Tensor,
    pad_val: float,
    mode: str,
) -> torch.Tensor:
    """Natural-mask values at output positions (batch, v, u, y, x_pos).

    x: aligned input (N, Vin*Uin, Hin, Win). batch, v, u, y, x_pos: int64 output indices (image,
    window cell, window position), broadcastable to one shape P. Returns shape P in x's dtype.
    """
    _, _, hin, win = x.shape
    vin, uin = geom.in_cells
    vout, uout = geom.out_cells
    acc = accumulate_dtype(x.dtype)
    shape = torch.broadcast_shapes(batch.shape, v.shape, u.shape, y.shape, x_pos.shape)
    if x.numel() == 0 or any(s == 0 for s in shape):
        # Nothing to compute, or an empty input where every tap would be padding; `x.sum() * 0` keeps the
        # result in x's autograd graph (its gradient is zero).
        return x.new_full(shape, pad_val) + x.sum() * 0

    def const(value: float) -> torch.Tensor:
        # Scalars as tensors of the accumulation dtype: tensor-tensor arithmetic, no scalar fast paths.
        return torch.tensor(value, dtype=acc, device=x.device)

    half = const(0.5)
    cv = v.to(acc) + half
    cu = u.to(acc) + half
    v_hat = cv / const(geom.q_vu) + const(geom.off_v)
    u_hat = cu / const(geom.q_vu) + const(geom.off_u)
    y_hat = const(geom.r_hw) * y.to(acc) + const(geom.r_off) * (cv - const(vout / 2))
    x_hat = const(geom.r_hw) * x_pos.to(acc) + const(geom.r_off) * (cu - const(uout / 2))

    nearest = mode == "nearest"
    flat_x = x.reshape(-1).to(acc)
    pad = torch.tensor(pad_val, dtype=x.dtype).to(acc)
    batch_base = batch * (vin * uin)

    def tap(yi, xi, vi, ui) -> torch.Tensor:
        inside = (yi >= 0) & (yi < hin) & (xi >= 0) & (xi < win)
        inside = inside & (vi >= 0) & (vi < vin) & (ui >= 0) & (ui < uin)
        index = ((batch_base + vi * uin + ui) * hin + yi) * win + xi
        values = flat_x[torch.where(inside, index, 0)]
        return torch.where(inside, values, pad)

    taps_y, taps_x = _axis_taps(y_hat, nearest), _axis_taps(x_hat, nearest)
    taps_v, taps_u = _axis_taps(v_hat, nearest), _axis_taps(u_hat, nearest)
    if nearest:
        out = tap(taps_y[0][0], taps_x[0][0], taps_v[0][0], taps_u[0][0])
        return out.expand(shape).to(x.dtype)

    out = None
    for yi, wy in taps_y:  # the 16 terms in detectron2's order: y, then x, then v, then u
        for xi, wx in taps_x:
            for vi, wv in taps_v:
                for ui, wu in taps_u:
                    term = _Weighted.apply(((wy * wx) * wv) * wu, tap(yi, xi, vi, ui))
                    out = term if out is None else out + term
    return out.expand(shape).to(x.dtype)


def align2nat_reference(
    x: torch.Tensor, geom: Align2NatGeometry, out_size: tuple[int, int], pad_val: float, mode: str
) -> torch.Tensor:
    """Dense align2nat: aligned x (N, Vin*Uin, Hin, Win) -> natural (N, Vout*Uout, Hout, Wout)."""
    n = x.shape[0]
    vout, uout = geom.out_cells
    hout, wout = out_size
    dev = x.device
    ar = lambda k: torch.arange(k, device=dev)  # noqa: E731
    out = sample_natural(
        x,
        geom,
        ar(n).view(n, 1, 1, 1, 1),
        ar(vout).view(1, vout, 1, 1, 1),
        ar(uout).view(1, 1, uout, 1, 1),
        ar(hout).view(1, 1, 1, hout, 1),
        ar(wout).view(1, 1, 1, 1, wout),
        pad_val,
        mode,
    )  # (N, Vout, Uout, Hout, Wout)
    return out.reshape(n, vout * uout, hout, wout)


def align2nat_at_reference(
    x: torch.Tensor,
    geom: Align2NatGeometry,
    batch_index: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_val: float,
    mode: str,
) -> torch.Tensor:
    """Sparse align2nat: the natural masks of output positions (batch_index[d], ys[d], xs[d]).

    batch_index, ys, xs: int64 (D,). Returns (D, Vout*Uout), equal to the dense output
    `[batch_index, :, ys, xs]`, without computing any other window.
    """
    vout, uout = geom.out_cells
    d = batch_index.shape[0]
    dev = x.device
    out = sample_natural(
        x,
        geom,
        batch_index.view(d, 1, 1),
        torch.arange(vout, device=dev).view(1, vout, 1),
        torch.arange(uout, device=dev).view(1, 1, uout),
        ys.view(d, 1, 1),
        xs.view(d, 1, 1),
        pad_val,
        mode,
    )  # (D, Vout, Uout)
    return out.reshape(d, vout * uout)
