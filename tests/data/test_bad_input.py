"""Every bad input of the issue: an error naming the file and the record, or a warning with a count."""

import json
import re

import numpy as np
import pytest
from coco_files import compressed_rle

from tensormask.data import CocoFormatError, CocoInstances
from tensormask.errors import UserError

SQUARE = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]


def _good(w, n_images=2):
    for i in range(1, n_images + 1):
        w.add_image(i, 20, 30)
        w.add_ann(100 + i, i, 5, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    return w


def test_missing_image_file(coco_writer):
    image_dir, ann = _good(coco_writer).write()
    (image_dir / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances\.json.*1 image file\(s\) missing.*000002\.png") as info:
        CocoInstances(image_dir, ann, train=True)
    assert isinstance(info.value, UserError)  # the entry points end it in one line, not a traceback
    # unchecked at construction: the error comes at load time, naming the file and the image id
    ds = CocoInstances(image_dir, ann, train=True, check_files=False)
    ds[0]
    with pytest.raises(FileNotFoundError, match=r"000002\.png \(image id 2 in .*instances\.json\)") as info:
        ds[1]
    assert isinstance(info.value, UserError)


def test_corrupt_image(coco_writer):
    image_dir, ann = _good(coco_writer).write()
    (image_dir / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    ds = CocoInstances(image_dir, ann, train=True)
    with pytest.raises(CocoFormatError, match=r"cannot decode image .*000002\.png \(image id 2 in .*instances\.json\)"):
        ds[1]


def test_image_size_disagrees_with_json(coco_writer):
    _good(coco_writer)
    coco_writer.data["images"][1]["height"] = 21
    image_dir, ann = coco_writer.write()
    ds = CocoInstances(image_dir, ann, train=True)
    with pytest.raises(CocoFormatError, match=r"000002\.png \(image id 2 .*\(20, 30\).*\(21, 30\)"):
        ds[1]


def test_malformed_json(coco_writer):
    image_dir, ann = _good(coco_writer).write()
    ann.write_text('{"images": [], "annotations": [}')
    with pytest.raises(CocoFormatError, match=r"instances\.json: malformed JSON at line 1, column"):
        CocoInstances(image_dir, ann, train=True)
    ann.write_text('{"images": []}')
    with pytest.raises(CocoFormatError, match=r"instances\.json: missing top-level key 'annotations'"):
        CocoInstances(image_dir, ann, train=True)


def test_annotation_points_at_no_image(coco_writer):
    _good(coco_writer).add_ann(777, 99, 5, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"instances\.json: annotation 777 points at image id 99"):
        CocoInstances(image_dir, ann, train=True)


def test_unknown_category(coco_writer):
    _good(coco_writer).add_ann(778, 1, 42, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"instances\.json: annotation 778 has unknown category id 42"):
        CocoInstances(image_dir, ann, train=True)


def test_short_polygons_are_skipped_with_a_count(coco_writer):
    _good(coco_writer)
    coco_writer.add_ann(201, 1, 5, [[1.0, 1.0, 5.0, 5.0]], bbox=[1.0, 1.0, 4.0, 4.0])  # 2 points only
    coco_writer.add_ann(202, 2, 5, [[1.0, 1.0, 5.0, 1.0]], bbox=[1.0, 1.0, 4.0, 1.0])
    coco_writer.add_ann(203, 2, 10, [SQUARE[0], [0.0, 0.0, 1.0, 1.0]], bbox=[2.0, 2.0, 10.0, 10.0])  # one short part
    image_dir, ann = coco_writer.write()
    with pytest.warns(UserWarning) as record:
        ds = CocoInstances(image_dir, ann, train=True)
    messages = [str(r.message) for r in record]
    assert any(re.search(r"instances\.json: 2 annotation\(s\) had no polygon with at least 3 points.*201, 202", m) for m in messages)
    assert any(re.search(r"1 annotation\(s\) had a polygon with fewer than 3 points \(polygon dropped\).*203", m) for m in messages)
    assert [len(ds[i]["labels"]) for i in range(len(ds))] == [1, 2]


def test_degenerate_and_outside_boxes(coco_writer):
    _good(coco_writer)
    coco_writer.add_ann(301, 1, 5, SQUARE, bbox=[2.0, 2.0, 0.0, 10.0])  # zero width
    coco_writer.add_ann(302, 1, 5, SQUARE, bbox=[40.0, 2.0, 5.0, 5.0])  # right of a 30-wide image
    coco_writer.add_ann(303, 2, 5, SQUARE, bbox=[25.0, 2.0, 10.0, 10.0])  # partly outside: clipped
    image_dir, ann = coco_writer.write()
    with pytest.warns(UserWarning) as record:
        ds = CocoInstances(image_dir, ann, train=True)
    messages = " | ".join(str(r.message) for r in record)
    assert re.search(r"1 annotation\(s\) had a box of zero area \(skipped\) \(annotation ids 301\)", messages)
    assert re.search(r"1 annotation\(s\) had a box outside the image \(skipped\) \(annotation ids 302\)", messages)
    assert re.search(r"1 annotation\(s\) had a box partly outside the image \(clipped\) \(annotation ids 303\)", messages)
    assert len(ds[0]["labels"]) == 1
    assert ds[1]["boxes"][1].tolist() == [25.0, 2.0, 30.0, 12.0]


def test_negative_box_is_malformed_not_zero_area(coco_writer):
    _good(coco_writer).add_ann(304, 1, 5, SQUARE, bbox=[12.0, 2.0, -10.0, 10.0])  # x1 < x0
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"instances\.json: annotation 304: malformed 'bbox' .*negative width"):
        CocoInstances(image_dir, ann, train=True)
    coco_writer.data["annotations"][-1]["bbox"] = [2.0, 12.0, 10.0, -0.5]
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"annotation 304: malformed 'bbox' .*negative width or height"):
        CocoInstances(image_dir, ann, train=False)


def test_rle_of_the_wrong_size(coco_writer):
    _good(coco_writer).add_ann(401, 1, 5, compressed_rle(np.ones((10, 10), np.uint8)), bbox=[0.0, 0.0, 10.0, 10.0])
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"instances\.json: annotation 401: RLE size \[10, 10\] differs"):
        CocoInstances(image_dir, ann, train=True)


def test_never_a_silent_empty_dataset(coco_writer):
    coco_writer.add_image(1, 20, 30)
    coco_writer.add_ann(1, 1, 5, SQUARE, bbox=[2.0, 2.0, 0.0, 0.0])  # the only annotation is skipped
    image_dir, ann = coco_writer.write()
    with pytest.warns(UserWarning, match="zero area"), pytest.raises(CocoFormatError, match=r"instances\.json: no image left"):
        CocoInstances(image_dir, ann, train=True)
    # evaluation keeps the image
    with pytest.warns(UserWarning, match="zero area"):
        assert len(CocoInstances(image_dir, ann, train=False)) == 1
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(CocoFormatError, match=r"instances\.json: no images"):
        CocoInstances(image_dir, ann, train=False)


def test_duplicate_ids(coco_writer):
    _good(coco_writer).add_ann(101, 2, 5, SQUARE, bbox=[2.0, 2.0, 10.0, 10.0])
    image_dir, ann = coco_writer.write()
    with pytest.raises(CocoFormatError, match=r"instances\.json: duplicate annotation id 101"):
        CocoInstances(image_dir, ann, train=True)


def test_every_bad_input_error_is_a_users_mistake(coco_writer, tmp_path):
    # the entry points print a UserError as one line naming the file (docs/framework.md#errors);
    # anything else is shown as a bug, with a traceback
    assert issubclass(CocoFormatError, UserError) and issubclass(CocoFormatError, ValueError)
    with pytest.raises(UserError, match=r"annotation file not found: .*nope\.json"):
        CocoInstances(tmp_path, tmp_path / "nope.json", train=True)
    image_dir, ann = _good(coco_writer).write()
    with pytest.raises(UserError, match=r"image folder not found: .*nothere"):
        CocoInstances(tmp_path / "nothere", ann, train=True)


def _ground_truth_as_detections(ds) -> dict:
    """COCO metrics of the data set's own ground truth given as the detections (score 1): AP 1 if evaluated right."""
    import torch

    from tensormask.evaluation import COCOEvaluator
    from tensormask.structures import Detections

    evaluator = COCOEvaluator(ds.coco, ds.contiguous_to_coco)
    for i in range(len(ds)):
        item = ds[i]
        evaluator.process([item["image_id"]], [Detections(item["boxes"].as_subclass(torch.Tensor),
                                                          torch.ones(len(item["labels"])), item["labels"],
                                                          item["masks"].as_subclass(torch.Tensor).bool())])
    return evaluator.evaluate()


def test_skipped_segmentations_do_not_break_evaluation(coco_writer):
    # box-only annotations as some tools export them ("segmentation": []) and short polygons: skipped
    # for training, and the evaluation's ground truth (`dataset.coco`) holds the same cleaned data,
    # so COCO's segm evaluation (which rasterises every ground-truth mask) does not fail on them
    _good(coco_writer)
    coco_writer.add_ann(201, 1, 5, [], bbox=[1.0, 1.0, 4.0, 4.0])
    coco_writer.add_ann(202, 2, 5, [[1.0, 1.0]], bbox=[1.0, 1.0, 4.0, 1.0])
    coco_writer.add_ann(203, 2, 10, [SQUARE[0], [0.0, 0.0]], bbox=[2.0, 2.0, 10.0, 10.0])
    coco_writer.add_ann(204, 2, 10, [], bbox=[20.0, 2.0, 5.0, 5.0], iscrowd=1)
    image_dir, ann = coco_writer.write()
    with pytest.warns(UserWarning):
        ds = CocoInstances(image_dir, ann, train=False)
    assert sorted(ds.coco.anns) == [101, 102, 203]
    assert ds.coco.anns[203]["segmentation"] == [SQUARE[0]]
    metrics = _ground_truth_as_detections(ds)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and metrics["bbox"]["AP"] == pytest.approx(1.0)


def test_annotations_without_area_or_iscrowd_are_evaluated(coco_writer):
    # files from tools that leave out COCO's "area" and "iscrowd" (which COCOeval reads for every
    # ground-truth object): the evaluation's ground truth gets the mask's area and iscrowd 0
    _good(coco_writer)
    coco_writer.add_ann(201, 2, 10, {"size": [20, 30], "counts": [22, 4, 16, 4, 16, 4, 534]}, bbox=[1.0, 2.0, 3.0, 4.0])
    for a in coco_writer.data["annotations"]:
        del a["area"], a["iscrowd"]
    image_dir, ann = coco_writer.write()
    ds = CocoInstances(image_dir, ann, train=False)
    assert ds.coco.anns[101]["area"] == 100.0 and ds.coco.anns[201]["area"] == 12.0
    assert all(a["iscrowd"] == 0 for a in ds.coco.anns.values())
    assert _ground_truth_as_detections(ds)["segm"]["AP"] == pytest.approx(1.0)


def test_missing_files_named_with_windows_separators_say_so(coco_writer):
    # an annotation tool run on Windows writes "sub\\a.png": on Linux no such file, and the error says why
    _good(coco_writer)
    (coco_writer.image_dir / "sub").mkdir()
    (coco_writer.image_dir / "000002.png").rename(coco_writer.image_dir / "sub" / "000002.png")
    coco_writer.data["images"][1]["file_name"] = "sub\\000002.png"
    image_dir, ann = coco_writer.write()
    with pytest.raises(UserError, match=r"1 image file\(s\) missing.*1 file_name\(s\) use Windows' '\\' between "
                                        r"folders: write them with '/'"):
        CocoInstances(image_dir, ann, train=True)
