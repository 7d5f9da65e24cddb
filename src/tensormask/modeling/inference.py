"""TensorMask's decoding (the paper's "Inference" paragraph; docs/model.md): score threshold, top-k over all
levels, per-class NMS on the boxes of an NMS strategy, the kept windows' masks pasted into the image.

    decoder = TensorMaskDecoder(num_classes=K, nms_boxes="bb", ...)
    dets = decoder(out, windows, image_sizes, orig_sizes, mask_head)   # list[Detections]

Two NMS strategies (appendix A.4, Table 5): ``RegressedBoxNMS`` ("bb", the box head's boxes) and
``MaskBoxNMS`` ("mask-bb", the boxes of the candidates' masks). Only the windows that need a mask get
one decoded (``MaskHead.natural_at``), and masks are pasted into the window box, so the dense 4D mask
tensors are never built at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from tensormask.structures import Detections

from .windows import BOX_WEIGHTS, Windows, decode_boxes, flatten_per_window


@dataclass
class Candidates:
    """The top-scoring (window, class) pairs of one image.

    scores (P,), labels (P,) int64, windows (P,) int64 index into the flattened windows.
    """

    scores: Tensor
    labels: Tensor
    windows: Tensor


@dataclass
class Kept:
    """What per-class NMS kept of one image's candidates: scores, labels, windows (D,), the NMS boxes
    (D, 4) in resized-image pixels, and the masks already decoded for NMS (D (probs, region box)
    pairs, "mask-bb") or None."""

    scores: Tensor
    labels: Tensor
    windows: Tensor
    boxes: Tensor
    masks: list[tuple[Tensor, Tensor]] | None


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


def scale_boxes_unclipped(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Boxes (D, 4) in an image of from_size (h, w) -> to_size (h0, w0) pixels, not clipped."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def binary_mask_boxes(masks: Tensor, fallback: Tensor) -> Tensor:
    """Tight xyxy boxes (D, 4) of binary masks (D, h, w); empty masks get zero-size boxes."""
    if masks.shape[0] == 0:
        return fallback
    return mask_extents(masks).float()


# -- NMS strategies -------------------------------------------------------------------------------
class RegressedBoxNMS:
    """"bb": NMS (and the reported boxes) on the box head's decoded boxes, or on the windows when the
    model has no box head. Masks are decoded after NMS, for the kept windows only."""

    name = "bb"
    masks_before_nms = False

    def nms_boxes(self, decoder: TensorMaskDecoder, image: int, c: Candidates, windows: Windows,
                  deltas: Tensor | None, masks, image_size: tuple[int, int], mask_head):
        """(boxes (P, 4) of the candidates in resized-image pixels, None)."""
        win_boxes = windows.boxes[c.windows]
        if deltas is None:
            return win_boxes, None
        return decode_boxes(win_boxes, deltas[image][c.windows].float(), decoder.box_weights), None

    def report(self, det: Detections) -> Detections:
        return det


class MaskBoxNMS:
    """"mask-bb": NMS on the bounding boxes of the candidates' thresholded cell masks; the reported
    boxes are those of the pasted masks (empty masks are dropped)."""

    name = "mask-bb"
    masks_before_nms = True

    def nms_boxes(self, decoder: TensorMaskDecoder, image: int, c: Candidates, windows: Windows,
                  deltas: Tensor | None, masks, image_size: tuple[int, int], mask_head):
        """(boxes (P, 4) of the candidates' cell masks, their P (probs, region box) pairs)."""
        probs, regions = decoder.mask_regions(mask_head, masks, image, c.windows, windows, image_size)
        pairs = list(zip(probs, regions))
        stacked = [mask_boxes(p[None], b[None], decoder.mask_threshold) for p, b in pairs]
        boxes = torch.cat(stacked) if stacked else windows.boxes[c.windows].new_zeros(0, 4)
        return boxes, pairs

    def report(self, det: Detections) -> Detections:
        # report the boxes of the pasted masks (NMS used their cell-level version)
        det.boxes = binary_mask_boxes(det.masks, det.boxes)
        keep = (det.boxes[:, 2] > det.boxes[:, 0]) & (det.boxes[:, 3] > det.boxes[:, 1])
        return Detections(det.boxes[keep], det.scores[keep], det.labels[keep], det.masks[keep],
                          det.soft_masks[keep] if det.soft_masks is not None else None)


NMS_STRATEGIES = {"bb": RegressedBoxNMS, "mask-bb": MaskBoxNMS}


class TensorMaskDecoder:
    """Head outputs -> :class:`~tensormask.structures.Detections` in original-image pixels.

    Args:
        num_classes: K. nms_boxes: "bb" or "mask-bb" (:data:`NMS_STRATEGIES`).
        box_weights: the deltas' weights. score_threshold, topk_candidates: candidates (sigmoid
            score above the threshold, the top k over all levels). nms_threshold: per-class NMS IoU.
        max_detections: per image. mask_threshold: binarises the pasted masks (and the cell masks
            of "mask-bb"). soft_masks: also return the pasted probabilities.
    """

    # windows with at most this many cells per side are decoded whole and in batches; larger ones
    # (the bipyramid's upper levels) one by one, only on the cells that overlap the image
    batch_decode_cells = 64

    def __init__(self, num_classes: int, nms_boxes: str = "bb", *, box_weights: tuple[float, ...] = BOX_WEIGHTS,
                 score_threshold: float = 0.05, topk_candidates: int = 6000, nms_threshold: float = 0.5,
                 max_detections: int = 100, mask_threshold: float = 0.5, soft_masks: bool = False):
        if nms_boxes not in NMS_STRATEGIES:
            raise ValueError(f"nms_boxes must be one of {tuple(NMS_STRATEGIES)}, got {nms_boxes!r}")
        self.num_classes = num_classes
        self.strategy = NMS_STRATEGIES[nms_boxes]()
        self.box_weights = tuple(box_weights)
        self.score_threshold, self.topk_candidates = score_threshold, topk_candidates
        self.nms_threshold, self.max_detections = nms_threshold, max_detections
        self.mask_threshold, self.soft_masks = mask_threshold, soft_masks

    @property
    def nms_boxes(self) -> str:
        return self.strategy.name

    @torch.no_grad()
    def __call__(self, out, windows: Windows, image_sizes: list[tuple[int, int]],
                 orig_sizes: list[tuple[int, int]] | None = None, mask_head=None,
                 soft_masks: bool | None = None) -> list[Detections]:
        """Detections per image of a :class:`~tensormask.modeling.tensormask.TensorMaskOutput`, boxes
        and masks scaled from image_sizes to orig_sizes; masks only with a ``mask_head``."""
        orig_sizes = image_sizes if orig_sizes is None else orig_sizes
        soft_masks = self.soft_masks if soft_masks is None else soft_masks
        candidates = self.candidates(out)
        masks = out.masks
        if mask_head is not None and masks is None and self.strategy.masks_before_nms:
            needed = torch.cat([windows.levels[c.windows] for c in candidates])
            if needed.numel() > 0:
                masks = mask_head(out.features, levels=needed.unique().tolist())
        kept = self.nms(out, windows, candidates, masks, image_sizes, mask_head)
        if mask_head is not None and not self.strategy.masks_before_nms and masks is None:  # given: an exported network's
            all_windows = torch.cat([k.windows for k in kept])
            if all_windows.numel() > 0:
                masks = mask_head(out.features, levels=windows.levels[all_windows].unique().tolist())
        return [self.detections(k, masks, i, windows, tuple(image_sizes[i]), tuple(orig_sizes[i]), mask_head,
                                soft_masks) for i, k in enumerate(kept)]

    def candidates(self, out) -> list[Candidates]:
        """Per image: the (window, class) pairs above the score threshold, the top k of them."""
        logits = flatten_per_window(out.logits, self.num_classes).float()  # (N, M, K)
        return [select_candidates(logits[i], self.score_threshold, self.topk_candidates)
                for i in range(logits.shape[0])]

    def nms(self, out, windows: Windows, candidates: list[Candidates], masks, image_sizes, mask_head) -> list[Kept]:
        """Per image: per-class NMS on the strategy's boxes, best first, at most max_detections."""
        deltas = flatten_per_window(out.deltas, 4).float() if out.deltas is not None else None
        kept = []
        for i, c in enumerate(candidates):
            boxes, pairs = self.strategy.nms_boxes(self, i, c, windows, deltas, masks, tuple(image_sizes[i]), mask_head)
            keep = nms_per_class(boxes, c.scores, c.labels, self.nms_threshold, self.max_detections)
            if pairs is not None:
                pairs = [pairs[j] for j in keep.tolist()]
            kept.append(Kept(c.scores[keep], c.labels[keep], c.windows[keep], boxes[keep], pairs))
        return kept

    def detections(self, k: Kept, masks, image: int, windows: Windows, size: tuple[int, int],
                   orig: tuple[int, int], mask_head, soft_masks: bool) -> Detections:
        """One image's kept windows in original pixels: boxes scaled and clipped (empty ones dropped),
        masks pasted over their (in-image part of the) window box and thresholded."""
        out_boxes = scale_boxes(k.boxes.float(), size, orig)
        nonempty = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
        idx = torch.nonzero(nonempty).squeeze(1)
        det = Detections(boxes=out_boxes[idx], scores=k.scores[idx].float(), labels=k.labels[idx])
        if mask_head is None:
            return det
        pairs = k.masks
        if pairs is None:
            pairs = list(zip(*self.mask_regions(mask_head, masks, image, k.windows, windows, size)))
        pairs = [pairs[j] for j in idx.tolist()]
        regions = torch.stack([r for _, r in pairs]) if pairs else out_boxes.new_zeros(0, 4)
        paste_boxes = scale_boxes_unclipped(regions, size, orig)
        soft = paste_masks([p for p, _ in pairs], paste_boxes, orig[0], orig[1])
        det.masks = soft >= self.mask_threshold
        if soft_masks:
            det.soft_masks = soft
        return self.strategy.report(det)

    def mask_regions(self, mask_head, masks, image: int, window: Tensor, windows: Windows,
                     image_size: tuple[int, int]) -> tuple[list[Tensor], Tensor]:
        """Sigmoid masks of the given windows of one image and the boxes they cover.

        window (D,) flattened window indices -> D tensors (Lv_d, Lu_d) and boxes (D, 4) xyxy in
        resized-image pixels. Large windows are restricted to the cells that overlap the image (plus
        one cell of margin for the bilinear paste); pasting these equals pasting the full masks.
        """
        h, w = image_size
        probs: list[Tensor | None] = [None] * window.numel()
        boxes = windows.boxes[window].clone()  # (D, 4)
        levels, anchors = windows.levels[window], windows.anchors[window]
        for level, a in torch.unique(torch.stack([levels, anchors], 1), dim=0).tolist():
            sel = torch.nonzero((levels == level) & (anchors == a)).squeeze(1)
            cells = mask_head.cells(level, a)
            if cells <= self.batch_decode_cells:
                chunk = max(1, (1 << 22) // (cells * cells))
                for start in range(0, sel.numel(), chunk):
                    part = sel[start:start + chunk]
                    win = window[part]
                    logits = mask_head.natural_at(masks, level, a, torch.full_like(win, image), windows.ys[win],
                                                  windows.xs[win])
                    for j, p in zip(part.tolist(), logits.float().sigmoid().view(-1, cells, cells)):
                        probs[j] = p
                continue
            for j in sel.tolist():
                wi = int(window[j])
                x0, y0, x1, y1 = windows.boxes[wi].tolist()
                cw, ch = (x1 - x0) / cells, (y1 - y0) / cells
                u0, u1 = max(0, math.floor(-x0 / cw) - 1), min(cells, math.ceil((w - x0) / cw) + 1)
                v0, v1 = max(0, math.floor(-y0 / ch) - 1), min(cells, math.ceil((h - y0) / ch) + 1)
                logits = mask_head.natural_region_at(masks, level, a, image, int(windows.ys[wi]), int(windows.xs[wi]),
                                                     (v0, v1, u0, u1))
                probs[j] = logits.float().sigmoid()
                boxes[j] = torch.tensor([x0 + u0 * cw, y0 + v0 * ch, x0 + u1 * cw, y0 + v1 * ch])
        return probs, boxes  # type: ignore[return-value]
