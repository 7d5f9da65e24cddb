"""The TensorMask model: backbone -> class / box / mask heads -> (train) assignment + losses,
(test) inference. Modes (appendix A.3, A.4): "full", "box_only" (no mask branch), "mask_only" (no box
head: windows serve as boxes and NMS uses the masks' bounding boxes).

    model = TensorMask(backbone=ResNetFPN(...), mask_head=BipyramidMaskHead(...), num_classes=K)
    out = model(batch.images)                                      # TensorMaskOutput
    losses = model.losses(out, batch.targets, batch.image_sizes)   # {"loss_cls", "loss_box", "loss_mask"}
    dets = model.predict(out, batch.image_sizes, batch.orig_sizes) # list[Detections]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tensormask.structures import Detections

from .assignment import assign_windows, mask_targets
from .heads import BoxHead, ClassHead, MaskHead, MaskPrediction
from .inference import (
    flatten_per_window, mask_boxes, mask_extents, nms_per_class, paste_masks, scale_boxes, select_candidates,
)
from .losses import box_l1_loss, mask_bce_loss, sigmoid_focal_loss_star
from .windows import BOX_WEIGHTS, Windows, decode_boxes, encode_boxes, make_windows

MODES = ("full", "box_only", "mask_only")
NMS_BOXES = ("bb", "mask-bb")


@dataclass
class TensorMaskOutput:
    """What ``TensorMask.forward`` returns.

    features: FPN levels P2.. (N, C, H_k, W_k).
    logits:   per level (N, A*K, H_k, W_k), channel a*K + k.
    deltas:   per level (N, A*4, H_k, W_k), channel a*4 + j; None in mask_only mode.
    masks:    the mask head's raw prediction (training mode), or None (box_only mode, or eval mode,
              where ``predict`` computes only what the surviving detections need).
    """

    features: list[Tensor]
    logits: list[Tensor]
    deltas: list[Tensor] | None
    masks: MaskPrediction | None


class TensorMask(nn.Module):
    """TensorMask (Chen et al., ICCV 2019).

    Args:
        backbone: module mapping images (N, 3, H, W) to a list of levels; needs ``out_channels``
            and ``strides`` attributes (e.g. :class:`~tensormask.modeling.backbone.ResNetFPN`).
        mask_head: one of the mask-head designs in :mod:`tensormask.modeling.heads` (ignored in
            box_only mode).
        num_classes: K foreground classes (labels 0..K-1).
        window_sizes: window sides in cells at each level's unit (must match the mask head's).
        mode: "full", "box_only" or "mask_only".
        nms_boxes: "bb" (regressed boxes) or "mask-bb" (bounding boxes of the masks); these boxes
            are also the reported ones. Default: "bb", or "mask-bb" in mask_only mode.
        class_channels, box_channels, num_convs: class / box tower widths and depth.
        prior_prob: initial class probability.
        focal_alpha, focal_gamma, focal_shift: FL* parameters (shift 0: detectron2's FL*; see
            :func:`~tensormask.modeling.losses.sigmoid_focal_loss_star`). box_weights: delta weights.
        mask_loss_weight, mask_pos_weight: mask BCE weight and foreground weight.
        scale_thresh, min_size, spatial_thresh: the assignment rule (min_size None = smallest
            window at the finest level minus its unit, 40 px for the reference).
        score_threshold, topk_candidates, nms_threshold, max_detections, mask_threshold: inference.
        soft_masks: also return soft masks in ``Detections``.
        size_divisibility: what the input padding must be a multiple of.
        pixel_mean, pixel_std, input_format: the normalisation the weights expect (for the data
            pipeline; the model itself takes normalised images).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mask_head: MaskHead | None = None,
        num_classes: int = 80,
        window_sizes: tuple[int, ...] = (11, 15),
        mode: str = "full",
        nms_boxes: str | None = None,
        class_channels: int = 256,
        box_channels: int = 128,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.3,
        focal_gamma: float = 3.0,
        focal_shift: float = 0.0,
        box_weights: tuple[float, ...] = BOX_WEIGHTS,
        mask_loss_weight: float = 2.0,
        mask_pos_weight: float = 1.5,
        scale_thresh: float = 2.0,
        min_size: float | None = None,
        spatial_thresh: float = 1.0,
        score_threshold: float = 0.05,
        topk_candidates: int = 6000,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        mask_threshold: float = 0.5,
        soft_masks: bool = False,
        size_divisibility: int = 32,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if nms_boxes is None:
            nms_boxes = "mask-bb" if mode == "mask_only" else "bb"
        if nms_boxes not in NMS_BOXES:
            raise ValueError(f"nms_boxes must be one of {NMS_BOXES}, got {nms_boxes!r}")
        if mode == "mask_only" and nms_boxes != "mask-bb":
            raise ValueError("mask_only mode has no box head: nms_boxes must be 'mask-bb'")
        if mode == "box_only" and nms_boxes != "bb":
            raise ValueError("box_only mode has no masks: nms_boxes must be 'bb'")
        if mode != "box_only":
            if mask_head is None:
                raise ValueError(f"mode {mode!r} needs a mask_head")
            if tuple(mask_head.window_sizes) != tuple(window_sizes):
                raise ValueError(
                    f"mask_head.window_sizes={tuple(mask_head.window_sizes)} != window_sizes={tuple(window_sizes)}")
            if mask_head.num_levels != len(backbone.strides):
                raise ValueError(f"mask_head.num_levels={mask_head.num_levels} but the backbone has "
                                 f"{len(backbone.strides)} levels")
        self.mode, self.nms_boxes = mode, nms_boxes
        self.backbone = backbone
        self.num_classes = num_classes
        self.window_sizes = tuple(int(s) for s in window_sizes)
        self.strides = tuple(backbone.strides)
        channels = backbone.out_channels
        num_windows = len(self.window_sizes)
        self.class_head = ClassHead(channels, num_classes, num_windows, class_channels, num_convs, prior_prob)
        self.box_head = BoxHead(channels, num_windows, box_channels, num_convs) if mode != "mask_only" else None
        self.mask_head = mask_head if mode != "box_only" else None
        self.focal_alpha, self.focal_gamma, self.focal_shift = focal_alpha, focal_gamma, focal_shift
        self.box_weights = tuple(box_weights)
        self.mask_loss_weight, self.mask_pos_weight = mask_loss_weight, mask_pos_weight
        self.scale_thresh, self.spatial_thresh = scale_thresh, spatial_thresh
        self.min_size = float(min(self.window_sizes) * self.strides[0] - self.strides[0]) if min_size is None else min_size
        self.score_threshold, self.topk_candidates = score_threshold, topk_candidates
        self.nms_threshold, self.max_detections = nms_threshold, max_detections
        self.mask_threshold, self.soft_masks = mask_threshold, soft_masks
        self.size_divisibility = size_divisibility
        self.pixel_mean, self.pixel_std, self.input_format = tuple(pixel_mean), tuple(pixel_std), input_format
        self._windows_cache: dict = {}

    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> TensorMaskOutput:
        """images (N, 3, Hp, Wp), normalised and padded to ``size_divisibility``."""
        features = self.backbone(images)
        logits = self.class_head(features)
        deltas = self.box_head(features) if self.box_head is not None else None
        masks = self.mask_head(features) if (self.mask_head is not None and self.training) else None
        return TensorMaskOutput(features, logits, deltas, masks)

    def windows(self, out: TensorMaskOutput) -> Windows:
        """The windows of the output's grids (cached per grid sizes and device)."""
        grids = tuple(tuple(x.shape[-2:]) for x in out.logits)
        key = (grids, str(out.logits[0].device))
        if key not in self._windows_cache:
            self._windows_cache = {key: make_windows(list(grids), self.strides, self.window_sizes, out.logits[0].device)}
        return self._windows_cache[key]

    # ----------------------------------------------------------------------------------------
    def losses(self, out: TensorMaskOutput, targets: list[dict[str, Tensor]],
               image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """FL* classification, L1 box and weighted-BCE mask losses, each / max(1, #positives).

        targets: per image ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``masks`` (N, h, w) uint8, in
        resized-image pixels. Returns {"loss_cls", "loss_box" (not in mask_only), "loss_mask"
        (not in box_only)}.
        """
        windows = self.windows(out)
        logits = flatten_per_window(out.logits, self.num_classes).float()  # (N, M, K); losses in float32 under AMP
        cls_targets = torch.zeros_like(logits)
        pos_image, pos_window, pos_gt = [], [], []
        for i, target in enumerate(targets):
            assignment = assign_windows(
                target["boxes"].to(windows.boxes), windows.boxes, windows.units, scale_thresh=self.scale_thresh,
                min_size=self.min_size, spatial_thresh=self.spatial_thresh)
            pos = torch.nonzero(assignment.positive).squeeze(1)
            gt = assignment.matched_gt[pos]
            cls_targets[i, pos, target["labels"][gt]] = 1.0
            pos_image.append(torch.full_like(pos, i))
            pos_window.append(pos)
            pos_gt.append(gt)
        pos_image, pos_window, pos_gt = torch.cat(pos_image), torch.cat(pos_window), torch.cat(pos_gt)
        num_pos = pos_window.numel()
        normaliser = float(max(1, num_pos))
        losses = {"loss_cls": sigmoid_focal_loss_star(logits, cls_targets, self.focal_alpha, self.focal_gamma,
                                                      self.focal_shift) / normaliser}

        if self.box_head is not None:
            deltas = flatten_per_window(out.deltas, 4).float()  # (N, M, 4)
            if num_pos == 0:
                losses["loss_box"] = deltas.sum() * 0.0
            else:
                counts = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=pos_gt.device)
                all_boxes = torch.cat([t["boxes"] for t in targets]).to(deltas)
                gt_boxes = all_boxes[counts.cumsum(0)[pos_image] + pos_gt]
                target_deltas = encode_boxes(windows.boxes[pos_window], gt_boxes.to(deltas), self.box_weights)
                losses["loss_box"] = box_l1_loss(deltas[pos_image, pos_window], target_deltas) / normaliser

        if self.mask_head is not None:
            masks = out.masks if out.masks is not None else self.mask_head(out.features)
            # keeps every mask parameter in the graph when there are no positives (DDP-friendly)
            loss_mask = sum(r.sum() * 0.0 for level in masks.raw for r in level if r is not None)
            levels, anchors = windows.levels[pos_window], windows.anchors[pos_window]
            for level in range(len(self.strides)):
                for a in range(len(self.window_sizes)):
                    sel = torch.nonzero((levels == level) & (anchors == a)).squeeze(1)
                    if sel.numel() == 0:
                        continue
                    cells = self.mask_head.cells(level, a)
                    win = pos_window[sel]
                    grid = (out.logits[level].shape[0], *out.logits[level].shape[-2:])
                    pred = self._positive_masks(masks, level, a, pos_image[sel], windows.ys[win], windows.xs[win], grid)
                    target = torch.zeros_like(pred)
                    for i in pos_image[sel].unique().tolist():
                        mine = pos_image[sel] == i
                        target[mine] = mask_targets(targets[i]["masks"], pos_gt[sel][mine], windows.boxes[win[mine]],
                                                    cells).flatten(1).to(pred)
                    loss_mask = loss_mask + mask_bce_loss(pred, target, self.mask_pos_weight, self.mask_loss_weight)
            losses["loss_mask"] = loss_mask / normaliser
        return losses

    # Sparse decoding of positives costs about this many dense outputs per mask cell; with more
    # positives than (N * H_k * W_k) / this, the dense op (compiled kernel) plus a gather is cheaper.
    dense_decode_factor = 16

    def _positive_masks(self, masks: MaskPrediction, level: int, a: int, image: Tensor, ys: Tensor, xs: Tensor,
                        grid: tuple[int, ...]) -> Tensor:
        """Natural mask logits (P, V*U) of the positive windows of one (level, window size).

        grid: (N, H_k, W_k), the level's batch size and window grid."""
        n, h, w = grid
        if image.numel() * self.dense_decode_factor >= n * h * w:
            return self.mask_head.natural(masks, level, a)[image, :, ys, xs].float()
        return self.mask_head.natural_at(masks, level, a, image, ys, xs).float()

    # ----------------------------------------------------------------------------------------
    # windows with at most this many cells per side are decoded whole and in batches; larger ones
    # (the bipyramid's upper levels) one by one, only on the cells that overlap the image
    batch_decode_cells = 64

    def _mask_regions(self, masks: MaskPrediction, image: int, window: Tensor, windows: Windows,
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
            cells = self.mask_head.cells(level, a)
            if cells <= self.batch_decode_cells:
                chunk = max(1, (1 << 22) // (cells * cells))
                for start in range(0, sel.numel(), chunk):
                    part = sel[start:start + chunk]
                    win = window[part]
                    logits = self.mask_head.natural_at(masks, level, a, torch.full_like(win, image), windows.ys[win],
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
                logits = self.mask_head.natural_region_at(masks, level, a, image, int(windows.ys[wi]),
                                                          int(windows.xs[wi]), (v0, v1, u0, u1))
                probs[j] = logits.float().sigmoid()
                boxes[j] = torch.tensor([x0 + u0 * cw, y0 + v0 * ch, x0 + u1 * cw, y0 + v1 * ch])
        return probs, boxes  # type: ignore[return-value]

    @torch.no_grad()
    def predict(self, out: TensorMaskOutput, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]] | None = None, soft_masks: bool | None = None) -> list[Detections]:
        """Detections per image in ORIGINAL image pixels (boxes scaled from image_sizes to orig_sizes).

        Scores > score_threshold, top ``topk_candidates`` over all levels, box decode, per-class NMS
        on the regressed boxes ("bb") or the masks' boxes ("mask-bb"), ``max_detections``; the kept
        windows' masks are decoded (only theirs), pasted into the window box and thresholded.
        """
        orig_sizes = image_sizes if orig_sizes is None else orig_sizes
        soft_masks = self.soft_masks if soft_masks is None else soft_masks
        windows = self.windows(out)
        logits = flatten_per_window(out.logits, self.num_classes).float()
        deltas = flatten_per_window(out.deltas, 4).float() if out.deltas is not None else None
        n = logits.shape[0]
        candidates = [select_candidates(logits[i], self.score_threshold, self.topk_candidates) for i in range(n)]

        masks = out.masks
        if self.mask_head is not None and masks is None:
            if self.nms_boxes == "mask-bb":
                needed = torch.cat([windows.levels[c.windows] for c in candidates])
            else:
                needed = None  # decided after NMS
            if needed is not None and needed.numel() > 0:
                masks = self.mask_head(out.features, levels=needed.unique().tolist())

        kept = []
        for i, c in enumerate(candidates):
            win_boxes = windows.boxes[c.windows]
            probs = None
            if self.nms_boxes == "mask-bb":
                probs, regions = self._mask_regions(masks, i, c.windows, windows, tuple(image_sizes[i]))
                probs = list(zip(probs, regions))
                stacked = [mask_boxes(p[None], b[None], self.mask_threshold) for p, b in probs]
                boxes = torch.cat(stacked) if stacked else win_boxes.new_zeros(0, 4)
            elif deltas is not None:
                boxes = decode_boxes(win_boxes, deltas[i][c.windows].float(), self.box_weights)
            else:
                boxes = win_boxes
            keep = nms_per_class(boxes, c.scores, c.labels, self.nms_threshold, self.max_detections)
            if probs is not None:
                probs = [probs[j] for j in keep.tolist()]
            kept.append((c.scores[keep], c.labels[keep], c.windows[keep], boxes[keep], probs))

        if self.mask_head is not None and self.nms_boxes == "bb" and masks is None:  # (given: an exported network's)
            all_windows = torch.cat([k[2] for k in kept])
            if all_windows.numel() > 0:
                masks = self.mask_head(out.features, levels=windows.levels[all_windows].unique().tolist())

        results = []
        for i, (scores, labels, win, boxes, probs) in enumerate(kept):
            size, orig = tuple(image_sizes[i]), tuple(orig_sizes[i])
            out_boxes = scale_boxes(boxes.float(), size, orig)
            nonempty = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
            idx = torch.nonzero(nonempty).squeeze(1)
            det = Detections(boxes=out_boxes[idx], scores=scores[idx].float(), labels=labels[idx])
            if self.mask_head is not None:
                if probs is None:
                    probs = list(zip(*self._mask_regions(masks, i, win, windows, size)))
                probs = [probs[j] for j in idx.tolist()]
                regions = torch.stack([r for _, r in probs]) if probs else out_boxes.new_zeros(0, 4)
                paste_boxes = scale_boxes_unclipped(regions, size, orig)
                soft = paste_masks([p for p, _ in probs], paste_boxes, orig[0], orig[1])
                det.masks = soft >= self.mask_threshold
                if soft_masks:
                    det.soft_masks = soft
                if self.nms_boxes == "mask-bb":
                    # report the boxes of the pasted masks (NMS used their cell-level version)
                    det.boxes = binary_mask_boxes(det.masks, det.boxes)
                    keep = (det.boxes[:, 2] > det.boxes[:, 0]) & (det.boxes[:, 3] > det.boxes[:, 1])
                    det = Detections(det.boxes[keep], det.scores[keep], det.labels[keep], det.masks[keep],
                                     det.soft_masks[keep] if det.soft_masks is not None else None)
            results.append(det)
        return results


def binary_mask_boxes(masks: Tensor, fallback: Tensor) -> Tensor:
    """Tight xyxy boxes (D, 4) of binary masks (D, h, w); empty masks get zero-size boxes."""
    if masks.shape[0] == 0:
        return fallback
    return mask_extents(masks).float()


def scale_boxes_unclipped(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])
