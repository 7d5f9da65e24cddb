"""TensorMask's training criterion (the paper's "Label assignment" and "Loss" paragraphs; docs/model.md):
assignment -> targets -> the three losses, each divided by max(1, #positives).

    criterion = TensorMaskCriterion(num_classes=K, ...)
    losses = criterion(out, windows, targets, mask_head)   # {"loss_cls", "loss_box", "loss_mask"}

The elementwise losses (FL*, L1, weighted BCE) are the functions at the end of this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tensormask import ops

from .assignment import assign_windows, mask_targets
from .windows import BOX_WEIGHTS, Windows, encode_boxes, flatten_per_window


@dataclass
class Positives:
    """The positive windows of a batch, P of them over all images.

    image (P,) int64 image index; window (P,) int64 index into the flattened windows (level, y, x, a);
    gt (P,) int64 index of the assigned ground truth among its image's targets.
    """

    image: Tensor
    window: Tensor
    gt: Tensor

    def __len__(self) -> int:
        return int(self.window.numel())


class TensorMaskCriterion:
    """Assignment -> targets -> FL* classification, L1 box and weighted-BCE mask losses.

    Args:
        num_classes: K foreground classes.
        focal_alpha, focal_gamma, focal_shift: FL* (see :func:`sigmoid_focal_loss_star`).
        box_weights: weights of the (dx, dy, dw, dh) deltas.
        mask_loss_weight, mask_pos_weight: mask BCE weight and its foreground weight.
        scale_thresh, min_size, spatial_thresh: the assignment rule (:mod:`.assignment`).
    """

    # How the positives' masks are decoded: from the level's dense natural tensor and a gather
    # (detectron2's way), or by the heads' sparse evaluation at the positives only. Where the compiled
    # align2nat kernels run, the dense tensor costs ~1 ns per element, while the sparse evaluation (pure
    # PyTorch) is hundreds of small operations forward and backward whatever the number of positives:
    # dense up to dense_max_elements (64 MB in float32; the quickstart's levels have < 1 M), which made the
    # quickstart's training step 0.82x (docs/framework.md "The 8-minute main job"). Otherwise
    # (larger levels, or the pure-PyTorch reference backend) the sparse evaluation, unless the positives
    # are so many that (N * H_k * W_k) / dense_decode_factor of them cost as much as the dense tensor.
    dense_max_elements = 2**24
    dense_decode_factor = 16

    def __init__(self, num_classes: int, *, focal_alpha: float = 0.3, focal_gamma: float = 3.0,
                 focal_shift: float = 0.0, box_weights: tuple[float, ...] = BOX_WEIGHTS, mask_loss_weight: float = 2.0,
                 mask_pos_weight: float = 1.5, scale_thresh: float = 2.0, min_size: float = 40.0,
                 spatial_thresh: float = 1.0):
        self.num_classes = num_classes
        self.focal_alpha, self.focal_gamma, self.focal_shift = focal_alpha, focal_gamma, focal_shift
        self.box_weights = tuple(box_weights)
        self.mask_loss_weight, self.mask_pos_weight = mask_loss_weight, mask_pos_weight
        self.scale_thresh, self.min_size, self.spatial_thresh = scale_thresh, min_size, spatial_thresh

    # -- assignment ------------------------------------------------------------------------------
    def assign(self, windows: Windows, targets: list[dict[str, Tensor]]) -> Positives:
        """The positive windows of every image (rules (a)-(d) of :func:`.assignment.assign_windows`)."""
        image, window, gt = [], [], []
        for i, target in enumerate(targets):
            assignment = assign_windows(
                target["boxes"].to(windows.boxes), windows.boxes, windows.units, scale_thresh=self.scale_thresh,
                min_size=self.min_size, spatial_thresh=self.spatial_thresh)
            pos = torch.nonzero(assignment.positive).squeeze(1)
            image.append(torch.full_like(pos, i))
            window.append(pos)
            gt.append(assignment.matched_gt[pos])
        return Positives(torch.cat(image), torch.cat(window), torch.cat(gt))

    # -- targets ---------------------------------------------------------------------------------
    def class_targets(self, positives: Positives, targets: list[dict[str, Tensor]], like: Tensor) -> Tensor:
        """(N, M, K) one-hot: 1 at (image, positive window, its object's class), 0 elsewhere."""
        cls_targets = torch.zeros_like(like)
        for i, target in enumerate(targets):
            mine = positives.image == i
            cls_targets[i, positives.window[mine], target["labels"][positives.gt[mine]]] = 1.0
        return cls_targets

    def box_targets(self, positives: Positives, windows: Windows, targets: list[dict[str, Tensor]],
                    like: Tensor) -> Tensor:
        """(P, 4) weighted deltas taking each positive window to its object's box."""
        counts = torch.tensor([0] + [len(t["boxes"]) for t in targets[:-1]], device=positives.gt.device)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(like)
        gt_boxes = all_boxes[counts.cumsum(0)[positives.image] + positives.gt]
        return encode_boxes(windows.boxes[positives.window], gt_boxes.to(like), self.box_weights)

    def mask_targets(self, positives: Positives, windows: Windows, targets: list[dict[str, Tensor]], cells: int,
                     like: Tensor) -> Tensor:
        """(P, cells * cells) {0, 1}: each object's mask cropped to its window and resized to the cells."""
        target = torch.zeros_like(like)
        for i in positives.image.unique().tolist():
            mine = positives.image == i
            target[mine] = mask_targets(targets[i]["masks"], positives.gt[mine], windows.boxes[positives.window[mine]],
                                        cells).flatten(1).to(like)
        return target

    # -- losses ----------------------------------------------------------------------------------
    def __call__(self, out, windows: Windows, targets: list[dict[str, Tensor]], mask_head=None) -> dict[str, Tensor]:
        """Losses of a :class:`~tensormask.modeling.tensormask.TensorMaskOutput` (logits; deltas unless
        the model has no box head; the mask head's prediction unless ``mask_head`` is None).

        targets: per image ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``masks`` (N, h, w) uint8, in
        resized-image pixels. Returns {"loss_cls", "loss_box" (with a box head), "loss_mask" (with a
        mask head)}.
        """
        logits = flatten_per_window(out.logits, self.num_classes).float()  # (N, M, K); float32 under AMP
        positives = self.assign(windows, targets)
        num_pos = len(positives)
        normaliser = float(max(1, num_pos))
        cls_targets = self.class_targets(positives, targets, logits)
        losses = {"loss_cls": sigmoid_focal_loss_star(logits, cls_targets, self.focal_alpha, self.focal_gamma,
                                                      self.focal_shift) / normaliser}
        if out.deltas is not None:
            deltas = flatten_per_window(out.deltas, 4).float()  # (N, M, 4)
            if num_pos == 0:
                losses["loss_box"] = deltas.sum() * 0.0
            else:
                target_deltas = self.box_targets(positives, windows, targets, deltas)
                losses["loss_box"] = box_l1_loss(deltas[positives.image, positives.window], target_deltas) / normaliser
        if mask_head is not None:
            losses["loss_mask"] = self.mask_loss(out, windows, targets, positives, mask_head) / normaliser
        return losses

    def mask_loss(self, out, windows: Windows, targets: list[dict[str, Tensor]], positives: Positives,
                  mask_head) -> Tensor:
        """Sum over the positives of the weighted BCE of their natural masks, per (level, window size)."""
        levels, anchors = windows.levels[positives.window], windows.anchors[positives.window]
        masks = out.masks
        if masks is None:
            # only the levels that hold positives: the same values as computing all of them (each
            # level is computed on its own), without the levels no object of the batch is
            # assigned to. No positives: the finest level, so that every mask parameter stays in
            # the graph (DDP-friendly, with the zero term below).
            masks = mask_head(out.features, levels=levels.unique().tolist() or [0])
        loss = sum(r.sum() * 0.0 for level in masks.raw for r in level if r is not None)
        for level in range(len(out.logits)):
            for a in range(len(mask_head.window_sizes)):
                sel = torch.nonzero((levels == level) & (anchors == a)).squeeze(1)
                if sel.numel() == 0:
                    continue
                group = Positives(positives.image[sel], positives.window[sel], positives.gt[sel])
                grid = (out.logits[level].shape[0], *out.logits[level].shape[-2:])
                pred = self.positive_masks(mask_head, masks, level, a, group, windows, grid)  # (P_la, V*U)
                target = self.mask_targets(group, windows, targets, mask_head.cells(level, a), pred)
                loss = loss + mask_bce_loss(pred, target, self.mask_pos_weight, self.mask_loss_weight)
        return loss

    def positive_masks(self, mask_head, masks, level: int, a: int, positives: Positives, windows: Windows,
                       grid: tuple[int, ...]) -> Tensor:
        """Natural mask logits (P, V*U) of positive windows of one (level, window size).

        grid: (N, H_k, W_k), the level's batch size and window grid."""
        n, h, w = grid
        ys, xs = windows.ys[positives.window], windows.xs[positives.window]
        cells = mask_head.cells(level, a)
        compiled = ops.backend.use_extension(masks.raw[level][a])
        if (compiled and n * h * w * cells * cells <= self.dense_max_elements) or (
                positives.image.numel() * self.dense_decode_factor >= n * h * w):
            return mask_head.natural(masks, level, a)[positives.image, :, ys, xs].float()
        return mask_head.natural_at(masks, level, a, positives.image, ys, xs).float()


def sigmoid_focal_loss_star(logits: Tensor, targets: Tensor, alpha: float = 0.3, gamma: float = 3.0,
                            shift: float = 0.0) -> Tensor:
    """FL* of the RetinaNet appendix, summed: alpha_t * -log(sigmoid(gamma * x_t + shift)) / gamma.

    logits, targets (R, K) with targets in {0, 1}; x_t = x for positives, -x for negatives;
    alpha_t = alpha for positives, 1 - alpha for negatives (alpha < 0: no weighting). Returns a
    scalar (sum over all elements). ``shift`` is the appendix's beta; 0 is what detectron2's
    TensorMask trains with (fvcore's ``sigmoid_focal_loss_star``; docs/model.md "Losses").
    """
    x_t = logits * (2 * targets - 1)
    loss = -F.logsigmoid(gamma * x_t + shift) / gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


def box_l1_loss(pred_deltas: Tensor, target_deltas: Tensor) -> Tensor:
    """L1 on box deltas (already weighted (1.5, 1.5, 0.75, 0.75) by the encoding), summed. (P, 4) -> ()."""
    return (pred_deltas - target_deltas).abs().sum()


def mask_bce_loss(pred_masks: Tensor, target_masks: Tensor, pos_weight: float = 1.5, loss_weight: float = 2.0) -> Tensor:
    """Per-cell BCE on positive windows, foreground weighted by ``pos_weight``, averaged over each
    window's cells, times ``loss_weight``, summed over windows.

    pred_masks (P, V*U) logits; target_masks (P, V*U) in {0, 1} -> ().
    """
    if pred_masks.numel() == 0:
        return pred_masks.sum()
    cells = pred_masks.shape[1]
    bce = F.binary_cross_entropy_with_logits(
        pred_masks, target_masks, reduction="none", pos_weight=pred_masks.new_tensor(pos_weight)
    )
    return bce.sum() * (loss_weight / cells)
