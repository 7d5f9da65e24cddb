"""Score-to-precision calibration (A.5) on constructed detections whose precision is known by hand."""

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import detections, gt_dict

from tensormask.evaluation import COCOEvaluator, ScoreCalibration
from tensormask.evaluation.coco_eval import detections_to_coco_results


def _results(image_items, contiguous_to_coco=(3, 8)):
    out = []
    for image_id, items in image_items.items():
        out += detections_to_coco_results(image_id, detections(items), list(contiguous_to_coco))
    return out


@pytest.fixture
def case():
    """Category 3 (label 0): 4 objects over 2 images, detections TP .9, FP .8, TP .7, FP .6, TP .5,
    plus a detection on a crowd region at .95 (ignored). Category 8 (label 1): 1 object, two
    detections tied at .8, one right, one wrong."""
    gt = gt_dict(
        [(1, 3, 0, 0, 10, 0), (1, 3, 20, 0, 10, 0), (2, 3, 0, 0, 10, 0), (2, 3, 20, 0, 10, 0),
         (1, 8, 0, 30, 12, 0), (2, 3, 40, 30, 15, 1)],
        n_images=2,
    )
    results = _results({
        1: [(0, 0, 0, 10, 0.9), (0, 40, 0, 10, 0.8), (0, 20, 0, 10, 0.7), (1, 0, 30, 12, 0.8), (1, 30, 30, 12, 0.8)],
        2: [(0, 0, 40, 8, 0.6), (0, 0, 0, 10, 0.5), (0, 40, 30, 15, 0.95)],
    })
    return gt, results


def test_precision_at_each_score_by_hand(case):
    gt, results = case
    cal = ScoreCalibration.fit(gt, results, [3, 8])
    # raw precision at the cuts .9/.8/.7/.6/.5: 1, 1/2, 2/3, 2/4, 3/5; interpolated: 1, 2/3, 2/3, 3/5, 3/5.
    # A score s maps to the cut at the lowest fitted score >= s (keep everything scoring >= s).
    expect = {0.99: 1.0, 0.95: 1.0, 0.9: 1.0, 0.85: 1.0, 0.8: 2 / 3, 0.75: 2 / 3, 0.7: 2 / 3,
              0.65: 2 / 3, 0.6: 3 / 5, 0.55: 3 / 5, 0.5: 3 / 5, 0.1: 3 / 5}
    for s, p in expect.items():
        assert cal.precision_at(0, s) == pytest.approx(p), s
    c = cal.curves[0]
    assert c.num_gt == 4
    np.testing.assert_allclose(c.recall[-5:], [0.25, 0.25, 0.5, 0.5, 0.75])
    # tied scores form one cut: two detections at .8, one right -> precision 1/2 at and above .8
    assert cal.precision_at(1, 0.8) == pytest.approx(0.5) and cal.precision_at(1, 0.9) == pytest.approx(0.5)
    # batched, on tensors
    out = cal.apply(torch.tensor([0, 1, 0]), torch.tensor([0.9, 0.8, 0.65]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 2 / 3]))


def test_iou_thresholds_are_averaged():
    # one object, one detection shifted 2 px: IoU 2/3 -> a TP at 4 of COCO's 10 thresholds
    gt = gt_dict([(1, 3, 20, 15, 10, 0)])
    res = _results({1: [(0, 22, 15, 10, 0.7)]})
    assert ScoreCalibration.fit(gt, res, [3, 8]).precision_at(0, 0.7) == pytest.approx(0.4)
    assert ScoreCalibration.fit(gt, res, [3, 8], iou_thresholds=(0.5,)).precision_at(0, 0.7) == pytest.approx(1.0)
    assert ScoreCalibration.fit(gt, res, [3, 8], iou_thresholds=(0.75,), iou_type="bbox").precision_at(0, 0.7) == 0.0


def test_category_without_detections_maps_to_zero(case):
    gt, results = case
    results = [r for r in results if r["category_id"] == 3]
    cal = ScoreCalibration.fit(gt, results, [3, 8])
    assert cal.curves[1] is None and cal.precision_at(1, 0.99) == 0.0
    with pytest.raises(ValueError, match="out of range"):
        cal.apply(torch.tensor([2]), torch.tensor([0.5]))


def test_save_load_round_trip(case, tmp_path):
    gt, results = case
    cal = ScoreCalibration.fit(gt, results, [3, 8], class_names=["a", "b"])
    path = cal.save(tmp_path / "cal.json")
    back = ScoreCalibration.load(path)
    assert back.class_names == ["a", "b"] and back.iou_type == "segm"
    scores = torch.linspace(0, 1, 21)
    for k in (0, 1):
        torch.testing.assert_close(back.apply(torch.full((21,), k), scores), cal.apply(torch.full((21,), k), scores))
    # a NaN in a curve is written as null (strict JSON, readable by any parser) and read back as NaN
    cal.curves[0].precision[0] = math.nan
    strict = json.loads(cal.save(tmp_path / "nan.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["curves"][0]["precision"][0] is None
    assert math.isnan(ScoreCalibration.load(tmp_path / "nan.json").curves[0].precision[0])
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json: not a tensormask score calibration"):
        ScoreCalibration.load(tmp_path / "bad.json")


def test_from_evaluator_and_results_file(case, tmp_path):
    gt, results = case
    ev = COCOEvaluator(gt, [3, 8], output_dir=tmp_path)
    ev.process([1, 2], [
        detections([(0, 0, 0, 10, 0.9), (0, 40, 0, 10, 0.8), (0, 20, 0, 10, 0.7), (1, 0, 30, 12, 0.8), (1, 30, 30, 12, 0.8)]),
        detections([(0, 0, 40, 8, 0.6), (0, 0, 0, 10, 0.5), (0, 40, 30, 15, 0.95)]),
    ])
    ev.evaluate()
    a = ScoreCalibration.from_evaluator(ev)
    b = ScoreCalibration.fit(gt, tmp_path / "coco_instances_results.json", [3, 8])
    scores = torch.tensor([0.95, 0.85, 0.75, 0.55])
    torch.testing.assert_close(a.apply(torch.zeros(4, dtype=torch.long), scores), torch.tensor([1.0, 1.0, 2 / 3, 0.6]))
    torch.testing.assert_close(b.apply(torch.zeros(4, dtype=torch.long), scores), torch.tensor([1.0, 1.0, 2 / 3, 0.6]))


def test_segm_calibration_without_masks_is_named():
    gt = gt_dict([(1, 3, 0, 0, 10, 0)])
    results = [{"image_id": 1, "category_id": 3, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9}]
    with pytest.raises(ValueError, match=r"segm calibration needs results with 'segmentation' \(masks\); use iou_type='bbox'"):
        ScoreCalibration.fit(gt, results, [3, 8])
    assert ScoreCalibration.fit(gt, results, [3, 8], iou_type="bbox").precision_at(0, 0.9) == pytest.approx(1.0)
