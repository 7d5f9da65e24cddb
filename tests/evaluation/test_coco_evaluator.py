"""COCOEvaluator: AP 1 on ground truth, hand-checked values on shifted predictions, crowd, JSON, backends."""

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import coco, detections, gt_dict, noisy_predictions
from pycocotools.coco import COCO

from tensormask.data import CocoInstances, make_synthetic_coco
from tensormask.evaluation import METRIC_NAMES, COCOEvaluator, format_metrics, format_per_category_table


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    info = make_synthetic_coco(
        tmp_path_factory.mktemp("syn") / "s", seed=5, num_train=1, num_val=8, image_size=128, min_object_size=8, progress=False
    )
    return CocoInstances(info["val_images"], info["val_annotations"], train=False)


def test_ground_truth_as_predictions_gives_ap_one(synthetic_val):
    ds = synthetic_val
    ev = COCOEvaluator(ds.coco, ds.contiguous_to_coco)
    for i in range(len(ds)):
        boxes, masks, labels = ds.load_target(i)
        ev.process([ds.image_ids[i]], [detections_from(boxes, masks, labels)])
    m = ev.evaluate()
    assert set(m) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert list(m[t]) == list(METRIC_NAMES)
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
            assert math.isnan(m[t][name]) or m[t][name] == pytest.approx(1.0), (t, name)
        assert not math.isnan(m[t]["AP"])


def detections_from(boxes, masks, labels):
    from tensormask.structures import Detections

    return Detections(boxes, torch.linspace(0.9, 0.5, len(labels)), labels, masks.bool())


def test_shifted_prediction_hand_checked():
    # one 10x10 ground-truth square (category 8 -> contiguous 1); the prediction is shifted 2 px right:
    # IoU = (8 * 10) / (100 + 100 - 80) = 2/3, so it matches at IoU 0.50, 0.55, 0.60, 0.65 (4 of the 10
    # thresholds) -> AP = AR = 0.4, AP50 = 1, AP75 = 0; the object is small (area 100 < 32^2).
    gt = coco(gt_dict([(1, 8, 20, 15, 10, 0)]))
    ev = COCOEvaluator(gt, [3, 8])
    ev.process([1], [detections([(1, 22, 15, 10, 0.9)])])
    m = ev.evaluate()
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(0.4) and m[t]["APs"] == pytest.approx(0.4)
        assert m[t]["AP50"] == pytest.approx(1.0) and m[t]["AP75"] == pytest.approx(0.0)
        assert m[t]["AR1"] == m[t]["AR10"] == m[t]["AR100"] == m[t]["ARs"] == pytest.approx(0.4)
        for name in ("APm", "APl", "ARm", "ARl"):
            assert math.isnan(m[t][name])  # no medium/large objects: COCO's -1 becomes nan
    # the right box with the wrong class is a miss
    ev.reset()
    ev.process([1], [detections([(0, 20, 15, 10, 0.9)])])
    assert ev.evaluate()["bbox"]["AP"] == 0.0


def test_ranking_hand_checked():
    # two objects; detections ranked: FP (0.9), TP (0.8), TP (0.7). Precision at recall 0.5 and 1.0 is
    # 2/3 after interpolation (max precision at recall >= r), so AP = 2/3 at every IoU threshold.
    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0), (1, 3, 30, 30, 10, 0)]))
    ev = COCOEvaluator(gt, [3, 8], iou_types=("bbox",))
    ev.process([1], [detections([(0, 15, 0, 10, 0.9), (0, 0, 0, 10, 0.8), (0, 30, 30, 10, 0.7)])])
    m = ev.evaluate()
    assert set(m) == {"bbox"}
    assert m["bbox"]["AP"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["bbox"]["AR1"] == pytest.approx(0.0) and m["bbox"]["AR10"] == pytest.approx(1.0)


def test_crowd_regions_are_honoured():
    # a detection on a crowd region is neither a true nor a false positive
    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0), (1, 3, 30, 20, 20, 1)]))
    ev = COCOEvaluator(gt, [3, 8])
    ev.process([1], [detections([(0, 30, 20, 20, 0.95), (0, 0, 0, 10, 0.9)])])
    m = ev.evaluate()
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)


def test_box_only_detections_skip_segm():
    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0)]))
    ev = COCOEvaluator(gt, [3, 8])
    ev.process([1], [detections([(0, 0, 0, 10, 0.9)], with_masks=False)])
    with pytest.warns(UserWarning, match="segm evaluation skipped"):
        m = ev.evaluate()
    assert list(m) == ["bbox"] and m["bbox"]["AP"] == pytest.approx(1.0)


def test_images_without_predictions_and_evaluated_subset():
    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0), (2, 3, 0, 0, 10, 0)], n_images=2))
    ev = COCOEvaluator(gt, [3, 8])
    ev.process([1, 2], [detections([(0, 0, 0, 10, 0.9)]), detections([])])
    assert ev.evaluate()["bbox"]["AR100"] == pytest.approx(0.5)  # the second object is missed
    ev.reset()
    ev.process([1], [detections([(0, 0, 0, 10, 0.9)])])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0)  # only the processed image is evaluated
    ev.reset()
    ev.process([2], [detections([])])
    assert ev.evaluate()["segm"]["AP"] == 0.0  # no detection at all is a valid (bad) result
    ev.reset()
    with pytest.raises(RuntimeError, match="before any process"):
        ev.evaluate()


def test_results_json_and_category_mapping(tmp_path):
    gt_data = gt_dict([(1, 8, 5, 5, 12, 0)])
    ev = COCOEvaluator(gt_data, [3, 8], output_dir=tmp_path)
    ev.process([1], [detections([(1, 5, 5, 12, 0.75)])])
    ev.evaluate()
    results = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(results) == 1
    r = results[0]
    assert r["category_id"] == 8 and r["image_id"] == 1 and r["bbox"] == [5.0, 5.0, 12.0, 12.0]
    assert r["score"] == pytest.approx(0.75) and isinstance(r["segmentation"]["counts"], str)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt_data))
    plain = COCO(str(gt_file)).loadRes(str(tmp_path / "coco_instances_results.json"))  # other tools read it
    assert plain.anns[1]["area"] == 144


def test_input_errors():
    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0)]))
    with pytest.raises(ValueError, match="backend"):
        COCOEvaluator(gt, [3, 8], backend="nope")
    with pytest.raises(ValueError, match=r"category ids \[4\]"):
        COCOEvaluator(gt, [3, 4])
    ev = COCOEvaluator(gt, [3, 8])
    with pytest.raises(ValueError, match="image id 5 is not in the ground truth"):
        ev.process([5], [detections([])])
    with pytest.raises(ValueError, match="original image pixels"):
        ev.process([1], [detections([(0, 0, 0, 10, 0.9)], h=25, w=30)])
    with pytest.raises(ValueError, match="label out of range"):
        ev.process([1], [detections([(2, 0, 0, 10, 0.9)])])


def test_faster_backend_and_per_category_match(synthetic_val):
    pytest.importorskip("faster_coco_eval")
    ds = synthetic_val
    out = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        ev = COCOEvaluator(ds.coco, ds.contiguous_to_coco, backend=backend, per_category=True)
        for i in range(len(ds)):
            ev.process([ds.image_ids[i]], [noisy_predictions(ds, i)])
        out[backend] = (ev.evaluate(), ev.per_category_table())
    (m_ref, table_ref), (m_fast, table_fast) = out["pycocotools"], out["faster_coco_eval"]
    for t in ("bbox", "segm"):
        assert 0.05 < m_ref[t]["AP"] < 0.95  # a non-trivial case
        assert set(m_ref[t]) == set(m_fast[t]) == set(METRIC_NAMES) | {f"AP-{n}" for n in ds.class_names}
        for k in m_ref[t]:
            np.testing.assert_allclose(m_fast[t][k], m_ref[t][k], atol=1e-9, err_msg=f"{t} {k}")
    assert table_ref == table_fast
    assert table_ref.splitlines()[0].split() == ["category", "bbox", "segm"]
    assert len(table_ref.splitlines()) == 1 + len(ds.class_names)


def test_format_metrics():
    m = {"bbox": {n: 0.5 for n in METRIC_NAMES}, "segm": {**{n: 0.25 for n in METRIC_NAMES}, "APl": math.nan}}
    text = format_metrics(m)
    lines = text.splitlines()
    assert lines[0].split() == list(METRIC_NAMES)
    assert lines[1].split() == ["bbox"] + ["50.0"] * 12
    assert lines[2].split()[6] == "nan" and lines[2].split()[1] == "25.0"
    assert format_per_category_table({"bbox": {"a": 0.5}}).splitlines()[1].split() == ["a", "50.0"]
    # metrics read back from a strict-JSON run summary carry NaN as null
    assert format_metrics({"segm": {**m["segm"], "APl": None}}) == "\n".join([lines[0], lines[2]])


def test_per_category_ap_is_read_at_all_areas_and_100_detections():
    # Category "b" (id 8): two small 10x10 squares in image 1, both found (scores 0.9, 0.8), and one
    # large 100x100 square (area 10^4 > 96^2) in image 2, missed. Over all areas the recall reaches 2/3
    # at precision 1: the 67 recall thresholds 0, 0.01, ..., 0.66 of COCO's 101 have precision 1, so
    # AP = 67/101 at every IoU. Read at another area range it would be 1 (small), nan (medium: no
    # object) or 0 (large); with 1 detection per image, 34/101. Category "a" (id 3): one object found
    # exactly -> AP 1 (a swapped category index reads 67/101 for it).
    objects = [(1, 8, 5, 5, 10, 0), (1, 8, 40, 5, 10, 0), (2, 8, 5, 5, 100, 0), (2, 3, 60, 60, 10, 0)]
    gt = coco(gt_dict(objects, h=110, w=110, n_images=2))
    ev = COCOEvaluator(gt, [3, 8], iou_types=("bbox",), per_category=True)
    ev.process([1, 2], [
        detections([(1, 5, 5, 10, 0.9), (1, 40, 5, 10, 0.8)], h=110, w=110),
        detections([(0, 60, 60, 10, 0.7)], h=110, w=110),
    ])
    m = ev.evaluate()["bbox"]
    assert m["AP-b"] == pytest.approx(67 / 101)
    assert m["AP-a"] == pytest.approx(1.0)
    # the summary numbers of the same run show the other ranges are really different here
    assert m["APs"] == pytest.approx(1.0) and m["APl"] == pytest.approx(0.0) and math.isnan(m["APm"])
    assert [line.split() for line in ev.per_category_table().splitlines()[1:]] == [["a", "100.0"], ["b", "66.3"]]


def test_per_category_ap_counts_100_detections_per_image():
    # one object of "a" found only by the 12th best of 12 detections: within 100 detections per image
    # the recall reaches 1 at precision 1/12 (AP 1/12); within 10 it would be 0
    gt = coco(gt_dict([(1, 3, 40, 30, 10, 0)]))
    ev = COCOEvaluator(gt, [3, 8], iou_types=("bbox",), per_category=True)
    misses = [(0, 2 * i, 0, 4, 0.9 - 0.01 * i) for i in range(11)]
    ev.process([1], [detections([*misses, (0, 40, 30, 10, 0.5)])])
    m = ev.evaluate()["bbox"]
    assert m["AP-a"] == pytest.approx(1 / 12) and m["AP"] == pytest.approx(1 / 12)
    assert math.isnan(m["AP-b"])  # no object of "b"


def test_per_category_table_needs_per_category():
    ev = COCOEvaluator(coco(gt_dict([(1, 3, 40, 30, 10, 0)])), [3, 8])
    with pytest.raises(RuntimeError, match=r"construct with per_category=True and call evaluate\(\)"):
        ev.per_category_table()


def test_faster_coco_eval_ground_truth_and_a_missing_backend(monkeypatch, tmp_path, caplog):
    import logging
    import sys

    # a faster_coco_eval COCO object is accepted as the ground truth (read through its dataset)
    faster = pytest.importorskip("faster_coco_eval")
    data = gt_dict([(1, 8, 20, 15, 10, 0)])
    ev = COCOEvaluator(faster.COCO(data), [3, 8], iou_types=("bbox",), output_dir=str(tmp_path))
    ev.process([1], [detections([(1, 22, 15, 10, 0.9)])])
    with caplog.at_level(logging.INFO, logger="tensormask.evaluation.coco_eval"):
        assert ev.evaluate()["bbox"]["AP"] == pytest.approx(0.4)  # as test_shifted_prediction_hand_checked
    assert f"wrote 1 COCO results to {tmp_path}" in caplog.text
    # without the package, the faster backend names what to install
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    ev = COCOEvaluator(coco(data), [3, 8], iou_types=("bbox",), backend="faster_coco_eval")
    ev.process([1], [detections([(1, 22, 15, 10, 0.9)])])
    with pytest.raises(ImportError, match=r"^backend 'faster_coco_eval' needs `pip install faster-coco-eval`$"):
        ev.evaluate()


def test_only_the_models_classes_are_evaluated(caplog):
    # the ground truth also annotates category 8, which is not one of the model's classes (a class
    # chosen out with data.category_ids, or a category only the validation file uses): the model can
    # never detect it, so it is left out of the mean over categories, with a warning naming it
    import logging

    gt = coco(gt_dict([(1, 3, 0, 0, 10, 0), (1, 8, 30, 20, 12, 0), (1, 8, 5, 30, 12, 0)]))
    ev = COCOEvaluator(gt, [3], per_category=True)
    ev.process([1], [detections([(0, 0, 0, 10, 0.9)])])
    with caplog.at_level(logging.WARNING, logger="tensormask.evaluation.coco_eval"):
        m = ev.evaluate()
    assert m["bbox"]["AP"] == pytest.approx(1.0) and m["segm"]["AP"] == pytest.approx(1.0)
    assert set(ev.per_category_results["bbox"]) == {"a"}
    assert "2 annotation(s) of 'b' (id 8)" in caplog.text and "not one of the classes" in caplog.text
