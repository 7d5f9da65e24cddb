"""The decoding path on a worked example: one image resized to 64 x 48 (h, w) from a 128 x 72 original
(an anisotropic rescale: 2x in y, 1.5x in x), two levels (strides 8, 16), windows of 3 and 5 cells.

Six (window, class) pairs score above the threshold; everything else is at sigmoid(-10):
  W1 level 0 (y, x) = (2, 2), 24 px window, class 0, logit 3.0: box [4, 4, 28, 28]
  W2 level 0 (2, 3), class 0, logit 2.0, dx = -1/16 (1 px left): box [11, 4, 35, 28], IoU 0.548 with W1
  W3 level 0 (5, 2), class 0, logit 1.5: box [4, 28, 28, 52]
  W4 level 0 (5, 3), class 0, logit 1.0, dx = +1/16: box [13, 28, 37, 52], IoU 0.455 with W3
  W5 = W1's window, class 2, logit 0.5 (IoU 1 with W1, another class)
  W6 level 1 (0, 0), 80 px window, class 1, logit 0.0: box [-40, -40, 40, 40]
Per-class NMS at 0.5 removes W2 only. Boxes scale by (1.5, 2, 1.5, 2) and are clipped to 72 x 128.
Masks: a natural head reading the features' first S*S channels as its logits (+-20): W1 (and W5)
foreground in its left cell column, W3 in its bottom cell row, W6 in its centre cell (v, u) = (2, 2),
i.e. resized pixels [-8, 8)^2. Each is pasted bilinearly (outside the window = 0) over its window box
scaled to the original image and thresholded at 0.5; ``_pasted`` writes that out for these
separable 0/1 cell grids (foreground rows x foreground columns).
"""

import math

import pytest
import torch
from torch import nn

from tensormask.modeling import SimpleNaturalMaskHead, TensorMask, TensorMaskOutput

STRIDES, WINDOW_SIZES, K = (8, 16), (3, 5), 3
GRIDS = ((8, 8), (4, 4))
SIZE, ORIG = (64, 48), (128, 72)
# (level, y, x, a, class, logit, dx)
PAIRS = [(0, 2, 2, 0, 0, 3.0, 0.0), (0, 2, 3, 0, 0, 2.0, -0.0625), (0, 5, 2, 0, 0, 1.5, 0.0),
         (0, 5, 3, 0, 0, 1.0, 0.0625), (0, 2, 2, 0, 2, 0.5, 0.0), (1, 0, 0, 1, 1, 0.0, 0.0)]
SIG = torch.tensor([3.0, 1.5, 1.0, 0.5, 0.0]).sigmoid().tolist()  # W1, W3, W4, W5, W6


class _Levels(nn.Module):
    out_channels, strides = 25, STRIDES


def _model(**kwargs):
    head = SimpleNaturalMaskHead(in_channels=25, window_sizes=WINDOW_SIZES, num_levels=2, num_convs=0)
    with torch.no_grad():
        for predictor, s in zip(head.predictors, WINDOW_SIZES):
            predictor.weight.copy_(torch.eye(s * s, 25)[:, :, None, None])
            predictor.bias.zero_()
    model = TensorMask(_Levels(), head, num_classes=K, window_sizes=WINDOW_SIZES, class_channels=8, box_channels=8,
                       num_convs=1, **kwargs)
    return model.eval()


def _output():
    logits = [torch.full((1, 2 * K, h, w), -10.0) for h, w in GRIDS]
    deltas = [torch.zeros(1, 2 * 4, h, w) for h, w in GRIDS]
    features = [torch.full((1, 25, h, w), -20.0) for h, w in GRIDS]
    for level, y, x, a, k, logit, dx in PAIRS:
        logits[level][0, a * K + k, y, x] = logit  # channel a*K + k
        deltas[level][0, a * 4, y, x] = dx
    for v in range(3):
        features[0][0, v * 3 + 0, 2, 2] = 20.0  # W1 / W5: left column
        features[0][0, 2 * 3 + v, 5, 2] = 20.0  # W3: bottom row
    features[1][0, 2 * 5 + 2, 0, 0] = 20.0  # W6: centre cell
    return TensorMaskOutput(features, logits, deltas, None)


def _profile(cells, lo, hi, size):
    """Bilinear (pixel centres, align_corners=False) interpolation of a 0/1 cell row over [lo, hi) px."""
    out = []
    for p in range(size):
        g = (p + 0.5 - lo) / (hi - lo) * len(cells) - 0.5
        i = math.floor(g)
        t = g - i
        at = lambda j: cells[j] if 0 <= j < len(cells) else 0.0  # noqa: E731
        out.append((1 - t) * at(i) + t * at(i + 1))
    return torch.tensor(out, dtype=torch.float64)


def _pasted(rows, cols, box):
    """The thresholded paste of the cell grid rows x cols (0/1 lists) over box (original pixels)."""
    x0, y0, x1, y1 = box
    prob = _profile(rows, y0, y1, ORIG[0])[:, None] * _profile(cols, x0, x1, ORIG[1])[None, :]
    return prob >= 0.5


@pytest.mark.parametrize("batch_decode_cells", [64, 2])  # 2: every window's mask decoded on its in-image cells
def test_decoding_equals_the_worked_example(batch_decode_cells):
    model = _model()
    model.decoder.batch_decode_cells = batch_decode_cells
    det = model.predict(_output(), [SIZE], [ORIG])[0]
    assert det.labels.tolist() == [0, 0, 0, 2, 1]
    assert det.scores.tolist() == pytest.approx(SIG, abs=1e-6)
    expected = [[6, 8, 42, 56], [6, 56, 42, 104], [19.5, 56, 55.5, 104], [6, 8, 42, 56], [0, 0, 60, 80]]
    assert torch.allclose(det.boxes, torch.tensor(expected, dtype=torch.float32), atol=1e-4), det.boxes
    # paste boxes: the windows in original pixels (W6's is [-60, -80, 60, 80], 24 x 32 px cells)
    w1 = _pasted([1, 1, 1], [1, 0, 0], (6, 8, 42, 56))
    masks = [w1, _pasted([0, 0, 1], [1, 1, 1], (6, 56, 42, 104)), torch.zeros(ORIG, dtype=torch.bool), w1,
             _pasted([0, 0, 1, 0, 0], [0, 0, 1, 0, 0], (-60, -80, 60, 80))]
    # the foreground lies within its cells' pixels: W1 x [6, 18), y [8, 56); W6 x [-12, 12), y [-16, 16)
    assert w1[8:56, 6:18].sum() == w1.sum() > 0.8 * 12 * 48 and masks[4][:16, :12].sum() == masks[4].sum() > 100
    for i, m in enumerate(masks):
        assert torch.equal(det.masks[i], m), (i, det.masks[i].sum().item(), m.sum().item())


def test_mask_bb_decoding_reports_the_pasted_masks_boxes():
    det = _model(nms_boxes="mask-bb").predict(_output(), [SIZE], [ORIG])[0]
    # NMS on the cell masks' boxes: W2's and W4's masks are empty (zero-size boxes, dropped at the end)
    assert det.labels.tolist() == [0, 0, 2, 1]
    expected = torch.tensor([[6, 8, 18, 56], [6, 88, 42, 104], [6, 8, 18, 56], [0, 0, 12, 16]], dtype=torch.float32)
    assert torch.equal(det.boxes, expected), det.boxes
    assert torch.equal(det.masks[0], _pasted([1, 1, 1], [1, 0, 0], (6, 8, 42, 56)))
    assert torch.equal(det.masks[3], _pasted([0, 0, 1, 0, 0], [0, 0, 1, 0, 0], (-60, -80, 60, 80)))


def test_decoding_reads_its_settings():
    """Each inference setting changes the detections the way the worked example says."""
    out = _output()
    labels = lambda **kw: _model(**kw).predict(out, [SIZE], [ORIG])[0].scores.tolist()  # noqa: E731
    assert labels(nms_threshold=0.4) == pytest.approx([SIG[0], SIG[1], SIG[3], SIG[4]])  # W4 goes too
    assert labels(nms_threshold=0.6) == pytest.approx([SIG[0], torch.tensor(2.0).sigmoid().item()] + SIG[1:])  # W2 stays
    assert labels(score_threshold=0.55) == pytest.approx(SIG[:4])  # W6 (0.5) goes
    assert labels(topk_candidates=4) == pytest.approx(SIG[:3])  # W1-W4 are the candidates, W2 suppressed
    assert labels(max_detections=2) == pytest.approx(SIG[:2])
    det = _model(mask_threshold=0.99).predict(out, [SIZE], [ORIG])[0]
    assert int(det.masks[0].sum()) < 12 * 48  # the bilinear edges fall below 0.99
    det = _model(soft_masks=True).predict(out, [SIZE], [ORIG])[0]
    assert det.soft_masks is not None and torch.equal(det.soft_masks >= 0.5, det.masks)


def test_mask_bb_edge_cases():
    out = _output()
    # one detection: its reported box is still its pasted mask's box
    det = _model(nms_boxes="mask-bb", max_detections=1).predict(out, [SIZE], [ORIG])[0]
    assert det.boxes.tolist() == [[6.0, 8.0, 18.0, 56.0]]
    # soft masks survive the removal of empty masks
    det = _model(nms_boxes="mask-bb", soft_masks=True).predict(out, [SIZE], [ORIG])[0]
    assert det.soft_masks is not None and det.soft_masks.shape == det.masks.shape
    assert torch.equal(det.soft_masks >= 0.5, det.masks)


def test_decoding_uses_its_box_weights():
    """W4's dx = 1/16 moves it 24 / 16 / wx px: 1.5 px with wx = 1 instead of 1 px with 1.5."""
    det = _model(box_weights=(1.0, 1.0, 1.0, 1.0)).predict(_output(), [SIZE], [ORIG])[0]
    assert det.boxes[2].tolist() == pytest.approx([(12 + 1.5) * 1.5, 56, (36 + 1.5) * 1.5, 104])


def test_paste_skips_an_empty_box_and_pastes_the_next():
    from tensormask.modeling.inference import paste_masks

    probs = [torch.ones(2, 2), torch.ones(2, 2)]
    out = paste_masks(probs, torch.tensor([[5.0, 5.0, 5.0, 9.0], [0.0, 0.0, 4.0, 4.0]]), 8, 8)
    assert out[0].sum() == 0 and (out[1][:4, :4] >= 0.5).all() and out[1][4:, :].max() < 0.5
