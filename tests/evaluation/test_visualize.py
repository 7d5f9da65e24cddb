"""Pictures: drawn detections follow the (calibrated) threshold; side by side; PR-curve plots."""

import numpy as np
import pytest
import torch
from eval_helpers import detections, gt_dict
from PIL import Image

from tensormask.evaluation import ScoreCalibration, draw_detections, plot_pr_curves, side_by_side
from tensormask.evaluation.calibration import CategoryCurve
from tensormask.evaluation.visualize import class_colour, label_layout, place_labels, select

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
    # inside the kept mask: half grey, half the class colour (torchvision's draw_segmentation_masks
    # truncates to uint8)
    expected = torch.tensor([int(0.5 * GREY + 0.5 * c) for c in class_colour(1)], dtype=torch.uint8)
    assert torch.equal(pic[:, 30, 20], expected)
    # the 0.3 detection is below the default raw threshold 0.5: untouched
    assert (pic[:, 8:14, 43:49] == GREY).all()
    # the box outline is drawn in the class colour on the mask's border
    assert torch.equal(pic[:, 34, 10], torch.tensor(class_colour(1), dtype=torch.uint8))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), pic.permute(1, 2, 0).numpy())


def test_smaller_object_is_on_top_where_masks_overlap():
    # a big square of class 0 containing a small one of class 1: no black where they overlap
    det = detections([(0, 5, 5, 40, 0.9), (1, 20, 20, 10, 0.8)])
    pic = draw_detections(_image(), det, draw_boxes=False, draw_labels=False)
    small = torch.tensor([int(0.5 * GREY + 0.5 * c) for c in class_colour(1)], dtype=torch.uint8)
    big = torch.tensor([int(0.5 * GREY + 0.5 * c) for c in class_colour(0)], dtype=torch.uint8)
    assert torch.equal(pic[:, 25, 25], small) and torch.equal(pic[:, 10, 10], big)


def _dense(n_side=8, size=6, step=8, h=72, w=72):
    """n_side x n_side small squares of 3 classes, 2 px apart: labels of ~40x12 px cannot all fit."""
    items = [((r + c) % 3, 4 + c * step, 4 + r * step, size, 0.99 - 0.01 * (r * n_side + c))
             for r in range(n_side) for c in range(n_side)]
    return detections(items, h=h, w=w)


def test_labels_do_not_pile_up_on_dense_small_objects():
    det = _dense()
    names = ["circle", "square", "triangle"]
    kept, shown = select(det, threshold=0.0)
    layout = label_layout(kept, shown, names, (72, 72))
    rects = [r for r in layout.boxes if r is not None]
    # the property: no two labels overlap, each is inside the picture, and some are still shown
    assert 2 <= len(rects) < len(kept)
    for i, a in enumerate(rects):
        assert 0 <= a[0] < a[2] <= 72 and 0 <= a[1] < a[3] <= 72
        for b in rects[i + 1:]:
            overlap = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            assert overlap == 0, (a, b)
    # the best-scoring detections are labelled first
    assert layout.boxes[0] is not None
    # and the picture holds exactly those labels: a black frame (the padding) around white text
    pic = draw_detections(_image(72, 72), det, names, score_threshold=0.0, draw_boxes=False)
    for text, r in zip(layout.texts, layout.boxes):
        if r is None:
            continue
        x0, y0, x1, y1 = r
        assert (pic[:, y0, x0:x1] == 0).all() and (pic[:, y1 - 1, x0:x1] == 0).all(), text
        inside = pic[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1]
        assert (inside.min(0).values > 200).any(), text  # some white text pixels


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


def test_calibrated_display_threshold_is_0_6_at_its_boundary():
    # appendix A.5: pictures show detections whose calibrated score is >= 0.6. Label 0 calibrates to
    # exactly 0.6 (float32, the dtype of the calibrated scores) -> shown; label 1 to the next float32
    # below 0.6 -> hidden. Any other threshold in (0.5, 0.9] hides the first or shows the second, and
    # a strict ">" hides the first.
    just_below = float(np.nextafter(np.float32(0.6), np.float32(0.0)))
    curve = lambda p: CategoryCurve(np.array([0.9, 0.1]), np.array([p, p]), np.array([0.5, 1.0]), 2)  # noqa: E731
    calibration = ScoreCalibration([curve(0.6), curve(just_below)], ["a", "b"])
    det = detections([(0, 5, 20, 12, 0.3), (1, 40, 20, 12, 0.95)])
    kept, shown = select(det, calibration=calibration)
    assert kept.labels.tolist() == [0] and shown.tolist() == [np.float32(0.6)]
    pic = draw_detections(_image(), det, calibration=calibration)
    assert not (pic[:, 26, 11] == GREY).all()  # label 0 drawn
    assert (pic[:, 26, 46] == GREY).all()  # label 1 not drawn
    # without a calibration the raw score's threshold is 0.5, also inclusive
    raw = detections([(0, 5, 20, 12, 0.5), (1, 40, 20, 12, float(np.nextafter(np.float32(0.5), np.float32(0))))])
    assert select(raw)[0].labels.tolist() == [0]


def test_label_places_without_a_priority_and_at_the_left_edge():
    # two boxes, labels 10 x 8: each goes above its box's top-left corner; the first box starts at
    # x 0, so its label starts at x 0 (kept inside the canvas, not pushed further); no priority
    # given: the detections' order
    boxes = torch.tensor([[0.0, 20.0, 30.0, 40.0], [40.0, 20.0, 55.0, 40.0]])
    placed = [(0, 12, 10, 20), (40, 12, 50, 20)]
    assert place_labels(boxes, [(10, 8), (10, 8)], (50, 60)) == placed
    assert place_labels(boxes, [(10, 8), (10, 8)], (50, 60), priority=[1, 0]) == placed
    # a label that cannot fit the canvas is left out
    assert place_labels(boxes, [(70, 8), (10, 8)], (50, 60)) == [None, placed[1]]


def test_numpy_and_pil_images_are_drawn_like_tensors():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8, generator=g)
    det = detections([(0, 5, 20, 12, 0.9)])
    expected = draw_detections(image, det)
    torch.testing.assert_close(draw_detections(image.permute(1, 2, 0).numpy(), det), expected)
    torch.testing.assert_close(draw_detections(Image.fromarray(image.permute(1, 2, 0).numpy()), det), expected)
    torch.testing.assert_close(draw_detections(image.float(), det), expected)


def test_pr_curve_panels(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    curve = CategoryCurve(np.array([0.9, 0.1]), np.array([1.0, 0.5]), np.array([0.5, 1.0]), 2)
    names = ["c0", "c1", "c2", "c3", "c4"]
    calibration = ScoreCalibration([curve, None, curve, curve, curve], names)
    plot_pr_curves(calibration, tmp_path / "pr.png", columns=4)
    (fig,) = figures
    # 5 panels on a 2 x 4 grid, titled with the calibration's names (no names given)
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes] == [(2, 4)] * 5
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == names
    for ax in fig.axes:
        assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1.02)
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("recall", "precision")
        assert ax.xaxis.label.get_size() == ax.yaxis.label.get_size() == 8 and ax.title.get_size() == 9
    assert fig.axes[0].get_title() == "c0 (AP 75.0)"  # area under the curve: 0.5 * 1 + 0.5 * 0.5
    assert fig.axes[1].get_title() == "c1" and fig.axes[1].texts[0].get_text().startswith("no detections")


def test_side_by_side_leaves_the_gap_between_tiles():
    images = [_image(), _image(40, 40)]
    empty = [detections([]), detections([], h=40, w=40)]
    pic = side_by_side(images, empty, empty, height=100, gap=4)
    # tile 1: x 70..189 (60 x 50 scaled to 120 x 100), the gap 190..193 white, tile 2 from 194
    assert (pic[:, 50, 189] == GREY).all() and (pic[:, 50, 190:194] == 255).all() and (pic[:, 50, 194] == GREY).all()
    assert (pic[:, 100:104, 100] == 255).all() and (pic[:, 104, 100] == GREY).all()  # the gap between the rows


def test_wandb_overlays_of_calibrated_detections_on_a_padded_canvas():
    from tensormask.evaluation.visualize import wandb_overlays

    # a large square of class 0 (raw 0.3 -> calibrated 0.5: hidden at the default 0.6) and a small
    # one of class 1 inside it (raw 0.2 -> 0.9: shown); then every detection at threshold 0
    det = detections([(0, 5, 5, 30, 0.3), (1, 10, 10, 8, 0.2)])
    out = wandb_overlays(det, ["a", "b"], calibration=_calibration(), canvas_size=(64, 70))
    (box,) = out["boxes"]["predictions"]["box_data"]
    assert box["class_id"] == 2 and box["box_caption"] == "b 0.90" and box["scores"] == {"score": pytest.approx(0.9)}
    assert box["position"] == {"minX": 10.0, "minY": 10.0, "maxX": 18.0, "maxY": 18.0}
    out = wandb_overlays(det, ["a", "b"], calibration=_calibration(), score_threshold=0.0, canvas_size=(64, 70))
    class_map = out["masks"]["predictions"]["mask_data"]
    assert class_map.shape == (64, 70)  # padded at the bottom and right to the canvas
    assert class_map[12, 12] == 2 and class_map[30, 30] == 1 and class_map[2, 2] == 0 and class_map[60, 65] == 0
    assert out["masks"]["predictions"]["class_labels"] == {0: "background", 1: "a", 2: "b"}
    # no canvas size: the masks' own (50 x 60)
    assert wandb_overlays(det, score_threshold=0.0)["masks"]["predictions"]["mask_data"].shape == (50, 60)
