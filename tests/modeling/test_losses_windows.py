"""Losses against hand computations; window layout and box coding."""

import math

import torch

from tensormask.modeling.losses import box_l1_loss, mask_bce_loss, sigmoid_focal_loss_star
from tensormask.modeling.windows import decode_boxes, encode_boxes, make_windows


def test_focal_loss_star_by_hand():
    """detectron2's (fvcore's) FL*: alpha_t * -log(sigmoid(gamma * x_t)) / gamma, no shift.

    Hand values (gamma 3, alpha 0.3): positive x=2 -> x_t=2: log(1 + e^-6) / 3 * 0.3 = 0.00024757;
    negative x=-1 -> x_t=1: log(1 + e^-3) / 3 * 0.7 = 0.01133705; sum 0.01158462.
    """
    logits = torch.tensor([[2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    got = sigmoid_focal_loss_star(logits, targets, 0.3, 3.0)
    assert abs(got.item() - 0.011584617) < 1e-7
    # misclassified: positive x=-1.5 -> log(1 + e^4.5) / 3 * 0.3 = 0.45110477; negative x=1 ->
    # log(1 + e^3) / 3 * 0.7 = 0.71133705
    got = sigmoid_focal_loss_star(torch.tensor([[-1.5, 1.0]]), targets, 0.3, 3.0)
    assert abs(got.item() - (0.45110477 + 0.71133705)) < 1e-6
    # the RetinaNet appendix's shift beta=1 (an option): log(1 + e^-7) / 3 * 0.3 + log(1 + e^-4) / 3 * 0.7
    got = sigmoid_focal_loss_star(logits, targets, 0.3, 3.0, shift=1.0)
    assert abs(got.item() - 0.004326130) < 1e-7
    # alpha < 0: no class weighting; the default shift is detectron2's 0
    got = sigmoid_focal_loss_star(logits, targets, -1.0, 3.0)
    assert abs(got.item() - (math.log1p(math.exp(-6)) + math.log1p(math.exp(-3))) / 3) < 1e-7


def test_mask_bce_weights():
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    ln2 = math.log(2)
    expected = (2 * 1.5 * ln2 + 2 * ln2) / 4 * 2.0  # fg weight 1.5, mean over 4 cells, times 2
    assert abs(mask_bce_loss(pred, target).item() - expected) < 1e-6
    assert mask_bce_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4)).item() == 0.0


def test_box_l1():
    assert box_l1_loss(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])).item() == 10.0


def test_window_layout():
    w = make_windows([(2, 3), (1, 2)], [4, 8], [11, 15])
    assert len(w) == (2 * 3 + 1 * 2) * 2 and w.level_starts == [0, 12, 16]
    # (level 0, y=1, x=2, a=1): centre (8, 4), side 60
    i = (1 * 3 + 2) * 2 + 1
    assert w.boxes[i].tolist() == [8 - 30, 4 - 30, 8 + 30, 4 + 30]
    assert (w.ys[i], w.xs[i], w.anchors[i], w.levels[i]) == (1, 2, 1, 0)
    # level 1, x=1, a=0: centre (8, 0), side 88
    j = 12 + 1 * 2 + 0
    assert w.boxes[j].tolist() == [8 - 44, -44, 8 + 44, 44] and w.units[j] == 8


def test_box_coding_round_trip_and_weights():
    windows = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 70.0, 50.0]])
    boxes = torch.tensor([[5.0, 5.0, 25.0, 45.0], [0.0, 0.0, 100.0, 60.0]])
    deltas = encode_boxes(windows, boxes)
    assert torch.allclose(deltas[0], torch.tensor([1.5 * (-5 / 40), 1.5 * (5 / 40), 0.75 * math.log(0.5), 0.0]))
    assert torch.allclose(decode_boxes(windows, deltas), boxes, atol=1e-4)
