"""Pictures: drawn detections follow the (calibrated) threshold; side by side; PR-curve plots."""

import numpy as np
import pytest
import torch
from eval_helpers import detections, gt_dict
from PIL import Image

from tensormask.evaluation import ScoreCalibration, draw_detections, plot_pr_curves, side_by_side
from tensormask.evaluation.calibration import CategoryCurve
from tensormask.evaluation.visualize import class_colour

GREY = 100


def _image(h=50, w=60):
    return torch.full((3, h, w), GREY, dtype=torch.uint8)


def _calibration():
    # label 0: any score maps to precision 0.5; label 1: to 0.9
    curve = lambda p: CategoryCurve(np.array([0.9, 0.1]), np.array([p, p]), np.array([0.5, 1.0]), 2)  # noqa: E731
    return ScoreCalibration([curve(0.5), curve(0.9)], ["a", "b"])


def test_masks_and_boxes_are_drawn_at_the_detections(tmp_path):
    det = detections([(1, 10, 20, 15, 0.9), (0, 40, 5, 10, 0.3)])
    pic = draw_detections(_image(), det, ["a", "b"], path=tmp_path / "p.png")
    assert pic.dtype == torch.uint8 and tuple(pic.shape) == (3, 50, 60)
    # inside the kept mask: half grey, half the class colour
    expected = torch.tensor([round(0.5 * GREY + 0.5 * c) for c in class_colour(1)], dtype=torch.uint8)
    assert torch.equal(pic[:, 30, 20], expected)
    # the 0.3 detection is below the default raw threshold 0.5: untouched
    assert (pic[:, 8:14, 43:49] == GREY).all()
    # the box outline is drawn in the class colour on the mask's border
    assert torch.equal(pic[:, 34, 10], torch.tensor(class_colour(1), dtype=torch.uint8))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), pic.permute(1, 2, 0).numpy())


def test_calibrated_threshold_decides_what_is_shown():
    det = detections([(0, 5, 20, 12, 0.95), (1, 40, 20, 12, 0.2)])
    pic = draw_detections(_image(), det, calibration=_calibration())
    # label 0 at raw 0.95 calibrates to 0.5 < 0.6: hidden; label 1 at raw 0.2 to 0.9: shown
    assert (pic[:, 26, 11] == GREY).all()
    assert not (pic[:, 26, 46] == GREY).all()
    shown_low = draw_detections(_image(), det, calibration=_calibration(), score_threshold=0.4)
    assert not (shown_low[:, 26, 11] == GREY).all()


def test_side_by_side_rows_are_the_two_models(tmp_path):
    images = [_image(), _image(40, 40)]
    a = [detections([(0, 5, 5, 20, 0.9)]), detections([], h=40, w=40)]
    b = [detections([], h=50, w=60), detections([(1, 5, 5, 20, 0.9)], h=40, w=40)]
    pic = side_by_side(images, a, b, ["a", "b"], names=("Mask R-CNN", "TensorMask"), height=100, gap=4,
                       path=tmp_path / "sbs.png")
    assert pic.shape[1] == 204 and pic.shape[2] == 70 + 120 + 4 + 100
    top, bottom = pic[:, :100], pic[:, 104:]
    # image 1 (x 70..190): drawn on top only; image 2 (x 194..294): drawn at the bottom only
    assert not (top[:, 30, 100] == GREY).all() and (bottom[:, 30, 100] == GREY).all()
    assert (top[:, 40, 230] == GREY).all() and not (bottom[:, 40, 230] == GREY).all()
    assert (tmp_path / "sbs.png").is_file()
    with pytest.raises(ValueError, match="as many detections as images"):
        side_by_side(images, a[:1], b)


def test_pr_curve_plot(tmp_path):
    gt = gt_dict([(1, 3, 0, 0, 10, 0), (1, 3, 20, 0, 10, 0)])
    from tensormask.evaluation.coco_eval import detections_to_coco_results

    res = detections_to_coco_results(1, detections([(0, 0, 0, 10, 0.9), (0, 40, 30, 10, 0.6)]), [3, 8])
    cal = ScoreCalibration.fit(gt, res, [3, 8])
    path = plot_pr_curves(cal, tmp_path / "pr" / "curves.png")
    with Image.open(path) as im:
        assert im.width > 200 and im.height > 200
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank canvas
