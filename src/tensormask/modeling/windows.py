"""The sliding-window layout: square windows of S cells centred on every position of every level.

At level k (stride = unit sigma_HW), window a of ``window_sizes[a]`` = S cells is the square of side
S * stride pixels centred at (stride * x, stride * y) (the paper's 11x11 and 15x15 windows: 44 and 60 px at P2; docs/model.md).
Windows are enumerated (y, x, a) within a level and levels are concatenated, which is also the order
of the class logits (channel a*K + k) and box deltas (channel a*4 + j) once permuted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Windows:
    """Every window of one image layout, flattened over (level, y, x, a).

    boxes:   (M, 4) float32 xyxy in input-image pixels.
    units:   (M,) float32 unit of the window's level (its stride, in pixels).
    levels:  (M,) int64 level index (0 = P2).
    ys, xs:  (M,) int64 position on the level's grid.
    anchors: (M,) int64 window-size index a.
    level_starts: offsets of each level in the flattened order (len = num_levels + 1).
    """

    boxes: Tensor
    units: Tensor
    levels: Tensor
    ys: Tensor
    xs: Tensor
    anchors: Tensor
    level_starts: list[int]

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def make_windows(
    grid_sizes: list[tuple[int, int]],
    strides: list[int] | tuple[int, ...],
    window_sizes: list[int] | tuple[int, ...],
    device: torch.device | str = "cpu",
) -> Windows:
    """Windows for feature maps of the given (H_k, W_k) sizes.

    grid_sizes: per level (H_k, W_k); strides: per level pixels per grid step;
    window_sizes: window side in cells (unit = level stride), shared by all levels.
    """
    boxes, units, levels, ys, xs, anchors, starts = [], [], [], [], [], [], [0]
    sizes = torch.tensor(window_sizes, dtype=torch.float32, device=device)  # (A,)
    num_windows = len(window_sizes)
    for level, ((h, w), stride) in enumerate(zip(grid_sizes, strides)):
        gy, gx, ga = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), torch.arange(num_windows, device=device),
            indexing="ij",
        )  # (H, W, A)
        gy, gx, ga = gy.reshape(-1), gx.reshape(-1), ga.reshape(-1)
        cy, cx = gy.float() * stride, gx.float() * stride
        half = sizes[ga] * stride / 2
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        units.append(torch.full((gy.numel(),), float(stride), device=device))
        levels.append(torch.full((gy.numel(),), level, dtype=torch.int64, device=device))
        ys.append(gy)
        xs.append(gx)
        anchors.append(ga)
        starts.append(starts[-1] + gy.numel())
    return Windows(
        boxes=torch.cat(boxes),
        units=torch.cat(units),
        levels=torch.cat(levels),
        ys=torch.cat(ys),
        xs=torch.cat(xs),
        anchors=torch.cat(anchors),
        level_starts=starts,
    )


def flatten_per_window(per_level: list[Tensor], channels: int) -> Tensor:
    """Head outputs per level (N, A*C, H_k, W_k) -> (N, M, C), M = sum_k H_k*W_k*A windows in the
    order of :func:`make_windows` (level, y, x, a); channel a*C + c of a level is window a's c."""
    flat = []
    for x in per_level:
        n, _, h, w = x.shape
        flat.append(x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(flat, dim=1)


BOX_WEIGHTS = (1.5, 1.5, 0.75, 0.75)
SCALE_CLAMP = float(torch.log(torch.tensor(1000.0 / 16)))


def encode_boxes(windows: Tensor, boxes: Tensor, weights: tuple[float, ...] = BOX_WEIGHTS) -> Tensor:
    """Box deltas (dx, dy, dw, dh) that take window boxes (P, 4) to target boxes (P, 4), xyxy."""
    wx, wy, ww, wh = weights
    w_w, w_h = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    w_cx, w_cy = windows[:, 0] + 0.5 * w_w, windows[:, 1] + 0.5 * w_h
    b_w, b_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    b_cx, b_cy = boxes[:, 0] + 0.5 * b_w, boxes[:, 1] + 0.5 * b_h
    return torch.stack(
        [wx * (b_cx - w_cx) / w_w, wy * (b_cy - w_cy) / w_h, ww * torch.log(b_w / w_w), wh * torch.log(b_h / w_h)],
        dim=1,
    )


def decode_boxes(windows: Tensor, deltas: Tensor, weights: tuple[float, ...] = BOX_WEIGHTS) -> Tensor:
    """Inverse of :func:`encode_boxes`: windows (P, 4) + deltas (P, 4) -> boxes (P, 4) xyxy."""
    wx, wy, ww, wh = weights
    w_w, w_h = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    w_cx, w_cy = windows[:, 0] + 0.5 * w_w, windows[:, 1] + 0.5 * w_h
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw, dh = (deltas[:, 2] / ww).clamp(max=SCALE_CLAMP), (deltas[:, 3] / wh).clamp(max=SCALE_CLAMP)
    cx, cy = dx * w_w + w_cx, dy * w_h + w_cy
    w, h = torch.exp(dw) * w_w, torch.exp(dh) * w_h
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)
