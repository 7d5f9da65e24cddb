"""Inference: score threshold, top-k over all levels, box decode, per-class NMS, mask paste.

Only the windows that survive NMS get their masks decoded (``MaskHead.natural_at``), and masks are
pasted into the window box, so the dense 4D mask tensors are never built at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass
class Candidates:
    """The top-scoring (window, class) pairs of one image.

    scores (P,), labels (P,) int64, windows (P,) int64 index into the flattened windows.
    """

    scores: Tensor
    labels: Tensor
    windows: Tensor


def flatten_per_window(per_level: list[Tensor], channels: int) -> Tensor:
    """Per level (N, A*C, H, W) -> (N, sum_k H_k*W_k*A, C), windows ordered (level, y, x, a)."""
    flat = []
    for x in per_level:
        n, _, h, w = x.shape
        flat.append(x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(flat, dim=1)


def select_candidates(logits: Tensor, score_threshold: float, topk: int) -> Candidates:
    """logits (M, K) of one image -> sigmoid scores above the threshold, the top ``topk`` of them."""
    num_classes = logits.shape[1]
    scores = logits.flatten().sigmoid()
    keep = torch.nonzero(scores > score_threshold).squeeze(1)
    scores = scores[keep]
    if scores.numel() > topk:
        scores, order = scores.topk(topk)
        keep = keep[order]
    else:
        scores, order = scores.sort(descending=True)
        keep = keep[order]
    return Candidates(scores=scores, labels=keep % num_classes, windows=keep // num_classes)


def nms_per_class(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, max_detections: int) -> Tensor:
    """Indices kept by per-class NMS, best first, at most ``max_detections``."""
    keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)
    return keep[:max_detections]


def mask_extents(masks: Tensor) -> Tensor:
    """Tight extents (D, 4) xyxy, int64, of boolean masks (D, H, W) in cells / pixels: the first
    foreground column and row and one past the last; an empty mask gives (0, 0, 0, 0)."""
    d, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (D, H), (D, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h + 1, 0).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w + 1, 0).max(dim=1).values
    extents = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(rows.any(dim=1)[:, None], extents, torch.zeros_like(extents))


def mask_boxes(probs: Tensor, windows: Tensor, threshold: float = 0.5) -> Tensor:
    """Bounding boxes of thresholded cell masks, in pixels ("mask-bb").

    probs (D, V, U) mask probabilities on the window's cell grid; windows (D, 4) xyxy window boxes
    -> (D, 4) xyxy; an empty mask gives a zero-size box at the window's corner.
    """
    _, v, u = probs.shape
    x0, y0, x1, y1 = mask_extents(probs >= threshold).unbind(dim=1)
    cell_w = (windows[:, 2] - windows[:, 0]) / u
    cell_h = (windows[:, 3] - windows[:, 1]) / v
    return torch.stack(
        [windows[:, 0] + x0 * cell_w, windows[:, 1] + y0 * cell_h, windows[:, 0] + x1 * cell_w,
         windows[:, 1] + y1 * cell_h], dim=1)


def paste_masks(probs: list[Tensor], boxes: Tensor, height: int, width: int) -> Tensor:
    """Paste soft masks into an image, each stretched over its box (bilinear, outside = 0).

    probs: D tensors (V_d, U_d) in [0, 1] (sizes may differ); boxes (D, 4) xyxy in the target
    image's pixels -> (D, height, width) float32. Only the box's pixel extent is computed.
    """
    out = torch.zeros(len(probs), height, width, dtype=torch.float32, device=boxes.device)
    for i, (prob, box) in enumerate(zip(probs, boxes.tolist())):
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            continue
        px0, py0 = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        px1, py1 = min(int(x1) + 2, width), min(int(y1) + 2, height)
        if px1 <= px0 or py1 <= py0:
            continue
        ys = (torch.arange(py0, py1, device=boxes.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        xs = (torch.arange(px0, px1, device=boxes.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]  # (1, h, w, 2) as (x, y)
        pasted = F.grid_sample(prob[None, None].float(), grid, mode="bilinear", align_corners=False)
        out[i, py0:py1, px0:px1] = pasted[0, 0]
    return out


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Boxes (D, 4) in an image of from_size (h, w) -> to_size (h0, w0) pixels, clipped to it."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    scaled = boxes * boxes.new_tensor([sx, sy, sx, sy])
    scaled[:, 0::2] = scaled[:, 0::2].clamp(0, to_size[1])
    scaled[:, 1::2] = scaled[:, 1::2].clamp(0, to_size[0])
    return scaled
