"""The mask-driven assignment rule (the paper's "Label assignment"; docs/model.md) and the mask targets.

A window is positive for a ground truth (GT) only if all four hold:
  (a) containment: the window contains the GT box;
  (b) scale: window side - unit <= max(scale_thresh * GT longer side, min_size) (40 px floor);
  (c) centrality: || GT centre - window centre || / unit <= spatial_thresh;
  (d) uniqueness: no second GT also satisfies (a)-(c) for this window (else it is negative).
Everything else is negative; nothing is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import roi_align


@dataclass
class Assignment:
    """Result of the assignment rule for the M windows of one image.

    matched_gt:  (M,) int64 index of the GT a window is assigned to (meaningless where negative).
    positive:    (M,) bool.
    """

    matched_gt: Tensor
    positive: Tensor

    @property
    def num_positive(self) -> int:
        return int(self.positive.sum())


def rule_matrix(
    gt_boxes: Tensor,
    windows: Tensor,
    units: Tensor,
    *,
    scale_thresh: float = 2.0,
    min_size: float = 40.0,
    spatial_thresh: float = 1.0,
) -> dict[str, Tensor]:
    """The three per-pair rules (a)-(c) as (N, M) bool matrices (for inspection and tests).

    gt_boxes (N, 4) xyxy; windows (M, 4) xyxy; units (M,) pixels.
    """
    contain = (
        (windows[None, :, 0] <= gt_boxes[:, None, 0])
        & (windows[None, :, 1] <= gt_boxes[:, None, 1])
        & (windows[None, :, 2] >= gt_boxes[:, None, 2])
        & (windows[None, :, 3] >= gt_boxes[:, None, 3])
    )
    gt_side = (gt_boxes[:, 2:] - gt_boxes[:, :2]).max(dim=1).values  # (N,)
    limit = (gt_side * scale_thresh).clamp(min=min_size)  # (N,)
    window_side = (windows[:, 2:] - windows[:, :2]).max(dim=1).values - units  # (M,)
    scale = window_side[None, :] <= limit[:, None]
    gt_centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (N, 2)
    window_centre = (windows[:, :2] + windows[:, 2:]) / 2  # (M, 2)
    offset = (gt_centre[:, None, :] - window_centre[None, :, :]) / units[None, :, None]  # (N, M, 2)
    central = (offset * offset).sum(dim=2) <= spatial_thresh * spatial_thresh
    return {"contain": contain, "scale": scale, "central": central}


@torch.no_grad()
def assign_windows(
    gt_boxes: Tensor,
    windows: Tensor,
    units: Tensor,
    *,
    scale_thresh: float = 2.0,
    min_size: float = 40.0,
    spatial_thresh: float = 1.0,
) -> Assignment:
    """Apply rules (a)-(d) to every (GT, window) pair at once.

    gt_boxes (N, 4) xyxy; windows (M, 4) xyxy; units (M,) -> :class:`Assignment` over the M windows.
    """
    m = windows.shape[0]
    if gt_boxes.shape[0] == 0:
        return Assignment(
            torch.zeros(m, dtype=torch.int64, device=windows.device), torch.zeros(m, dtype=torch.bool, device=windows.device)
        )
    rules = rule_matrix(
        gt_boxes, windows, units, scale_thresh=scale_thresh, min_size=min_size, spatial_thresh=spatial_thresh
    )
    ok = rules["contain"] & rules["scale"] & rules["central"]  # (N, M)
    count = ok.sum(dim=0)  # (M,)
    matched = ok.to(torch.uint8).argmax(dim=0)  # (M,)
    return Assignment(matched_gt=matched, positive=count == 1)


@torch.no_grad()
def mask_targets(masks: Tensor, gt_index: Tensor, windows: Tensor, cells: int) -> Tensor:
    """GT masks cropped to the WINDOW boxes and resized to the window's mask grid.

    masks (N, h, w) uint8/bool; gt_index (P,) which GT each window uses; windows (P, 4) xyxy;
    cells: side of the mask grid (V = U = cells) -> (P, cells, cells) float32 in {0, 1}.
    Parts of a window outside the image are background.
    """
    if windows.shape[0] == 0:
        return masks.new_zeros((0, cells, cells), dtype=torch.float32)
    rois = torch.cat([gt_index[:, None].to(windows.dtype), windows], dim=1)  # (P, 5)
    soft = roi_align(masks[:, None].float(), rois, output_size=(cells, cells), spatial_scale=1.0,
                     sampling_ratio=0, aligned=True)  # (P, 1, cells, cells)
    return (soft[:, 0] >= 0.5).float()
