"""Argument checks and the sampling geometry shared by every align2nat implementation.

Appendix A.1, eq. (5): with r_hw = unit_hw / aligned_unit_hw, r_vu = unit_vu / aligned_unit_vu and
r_off = unit_vu / aligned_unit_hw, the natural element (v, u, y, x) reads the aligned input at

    y^ = r_hw * y + r_off * cv,          cv = v + 0.5 - Vout / 2
    v^ = r_vu * cv + Vin / 2 - 0.5       (likewise x^, u^ with u, cu, Uout, Uin)

The C++ kernels, the reference and the sparse evaluation all evaluate these positions in the same
arithmetic, written so that `swap_align2nat` reproduces detectron2's numbers exactly:

    v^ = (v + 0.5) / q_vu + off_v,       q_vu = aligned_unit_vu / unit_vu,
                                         off_v = (Vin / 2 - 0.5) - (Vout / 2) / q_vu
    y^ = r_hw * y + r_off * ((v + 0.5) - Vout / 2)

(for swap, q_vu = lambda and off_v = -0.5, i.e. detectron2's `(v + 0.5) / lambda - 0.5`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class Align2NatGeometry:
    """The constants of one align2nat transform (all Python floats, i.e. float64)."""

    in_cells: tuple[int, int]  # (Vin, Uin)
    out_cells: tuple[int, int]  # (Vout, Uout)
    r_hw: float  # unit_hw / aligned_unit_hw: output grid step in input grid steps
    r_off: float  # unit_vu / aligned_unit_hw: output cell size in input grid steps
    q_vu: float  # aligned_unit_vu / unit_vu = 1 / r_vu
    off_v: float  # (Vin / 2 - 0.5) - (Vout / 2) / q_vu
    off_u: float  # (Uin / 2 - 0.5) - (Uout / 2) / q_vu
    units: tuple[float, float, float, float]  # (unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)

    def output_size(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """(Hout, Wout) = ceil((Hin, Win) / r_hw)."""
        return tuple(_ceil_div_float(s, self.r_hw, self.units) for s in in_hw)  # type: ignore[return-value]


# The largest output size and sampling position (in input cells) accepted; the C++ entry
# (csrc/align2nat.cpp, make_params) checks the same bound.
MAX_EXTENT = 2.0**40


def _units_text(units) -> str:
    return "unit_hw={:g}, unit_vu={:g}, aligned_unit_hw={:g}, aligned_unit_vu={:g}".format(*units)


def _ceil_div_float(size: int, ratio: float, units=(1.0, 1.0, 1.0, 1.0)) -> int:
    value = size / ratio
    if not value <= MAX_EXTENT:
        raise ValueError(
            f"an input of spatial size {size} gives an output of size {value:g} with {_units_text(units)} "
            f"(more than {MAX_EXTENT:g}): the units are too far apart"
        )
    # Tolerate the last-bit error of unit ratios such as 3 * (1/3) so that 9 / 3 cells stays 3.
    return max(0, math.ceil(value - 1e-9 * max(1.0, abs(value))))


def _integer(value) -> int | None:
    """An integer argument as a Python int: int, a NumPy integer or an integer 0-d tensor (anything with
    ``__index__``); None for anything else, bools included."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _pair(name: str, value) -> tuple[int, int]:
    if _integer(value) is not None:
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints (V, U), got {value!r}") from None
    a, b = _integer(a), _integer(b)
    if a is None or b is None or a < 1 or b < 1:
        raise ValueError(f"{name} must be positive integers (V, U), got {value!r}")
    return a, b


def _positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (value > 0.0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_input(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 (N, V*U, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_lambda(lambda_val, integer: bool) -> float:
    if integer:
        value = _integer(lambda_val)
        if value is None or value < 1:
            raise ValueError(f"lambda_val must be an integer >= 1, got {lambda_val!r}")
        return float(value)
    value = _positive("lambda_val", lambda_val)
    if value < 1.0:
        raise ValueError(f"lambda_val must be >= 1, got {lambda_val!r}")
    return value


def make_geometry(
    in_cells, out_cells, unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu
) -> Align2NatGeometry:
    """Validate the cells and units of eq. (5) and derive the sampling constants."""
    vin, uin = _pair("in_cells", in_cells)
    vout, uout = _pair("out_cells", out_cells)
    unit_hw = _positive("unit_hw", unit_hw)
    unit_vu = _positive("unit_vu", unit_vu)
    aligned_unit_hw = _positive("aligned_unit_hw", aligned_unit_hw)
    aligned_unit_vu = _positive("aligned_unit_vu", aligned_unit_vu)
    q_vu = aligned_unit_vu / unit_vu
    units = (unit_hw, unit_vu, aligned_unit_hw, aligned_unit_vu)
    ratios = (unit_hw / aligned_unit_hw, unit_vu / aligned_unit_hw, q_vu, 1.0 / q_vu)
    if not all(0.0 < r < math.inf for r in ratios):
        raise ValueError(
            f"the unit ratios unit_hw/aligned_unit_hw, unit_vu/aligned_unit_hw and aligned_unit_vu/unit_vu must "
            f"be positive finite numbers, got {ratios[0]:g}, {ratios[1]:g}, {ratios[2]:g} ({_units_text(units)})"
        )
    off_v = (vin / 2 - 0.5) - (vout / 2) / q_vu
    off_u = (uin / 2 - 0.5) - (uout / 2) / q_vu
    reach = ratios[0] + ratios[1] * max(vout, uout) + max(vout, uout) / q_vu + abs(off_v) + abs(off_u)
    if not reach <= MAX_EXTENT:
        raise ValueError(
            f"{_units_text(units)} put sampling positions up to {reach:g} cells away (more than {MAX_EXTENT:g}): "
            "the units are too far apart"
        )
    return Align2NatGeometry(
        in_cells=(vin, uin),
        out_cells=(vout, uout),
        r_hw=unit_hw / aligned_unit_hw,
        r_off=unit_vu / aligned_unit_hw,
        q_vu=q_vu,
        off_v=off_v,
        off_u=off_u,
        units=units,
    )


def check_channels(x: torch.Tensor, geom: Align2NatGeometry) -> None:
    vin, uin = geom.in_cells
    if x.shape[1] != vin * uin:
        raise ValueError(
            f"x has {x.shape[1]} channels but in_cells={geom.in_cells} needs Vin*Uin = {vin * uin}"
        )


def swap_cells(x: torch.Tensor) -> int:
    """S for x of shape (N, S*S, H, W); raises if the channels are not a square number."""
    channels = x.shape[1]
    side = math.isqrt(channels)
    if side * side != channels or side == 0:
        raise ValueError(
            f"swap_align2nat needs a square number of channels S*S (the S x S window cells), got {channels}"
        )
    return side


def swap_geometry(side: int, lambda_val: int) -> Align2NatGeometry:
    """swap_align2nat as eq. (5): unit_hw = lambda, aligned_unit_hw = 1, unit_vu = 1, aligned_unit_vu = lambda."""
    return make_geometry((side, side), (lambda_val * side,) * 2, lambda_val, 1.0, 1.0, lambda_val)


def up_geometry(x: torch.Tensor, lambda_val: float, out_cells) -> Align2NatGeometry:
    """up_align2nat as eq. (5): same HW grid, aligned cells lambda times coarser than the natural cells."""
    vout, uout = _pair("out_cells", out_cells)
    in_cells = []
    for name, size in (("Vout", vout), ("Uout", uout)):
        cells = size / lambda_val
        if abs(cells - round(cells)) > 1e-6 or round(cells) < 1:
            raise ValueError(
                f"up_align2nat needs out_cells divisible by lambda: {name}={size} / lambda={lambda_val} = {cells:g}"
            )
        in_cells.append(int(round(cells)))
    geom = make_geometry(tuple(in_cells), (vout, uout), 1.0, 1.0, 1.0, lambda_val)
    check_channels(x, geom)
    return geom
