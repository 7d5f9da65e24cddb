"""The three TensorMask losses (paper-facts section 5); each caller divides by max(1, #positives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
