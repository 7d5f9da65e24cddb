"""CocoInstances round trips: polygons, uncompressed and compressed RLE, crowd, class mapping, empty images."""

import numpy as np
import pytest
import torch
from coco_files import compressed_rle, uncompressed_rle
from pycocotools.coco import COCO

from tensormask.data import CocoInstances, Collator, build_transforms

# plain pycocotools (annToMask) trips a harmless numpy 2 DeprecationWarning
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


@pytest.fixture
def mixed_file(coco_writer):
    """Image 1: polygon (cat 10), uncompressed RLE (cat 5), compressed RLE (cat 10), crowd; image 2: nothing."""
    h, w = 40, 60
    coco_writer.add_image(1, h, w)
    coco_writer.add_image(2, 30, 20)
    poly = [10.0, 5.0, 30.0, 5.0, 30.0, 25.0, 10.0, 25.0]
    coco_writer.add_ann(11, 1, 10, [poly], bbox=[10.0, 5.0, 20.0, 20.0])
    ring = _disk(h, w, 20, 45, 9) & (1 - _disk(h, w, 20, 45, 4))  # a hole: not expressible as a polygon
    coco_writer.add_ann(12, 1, 5, uncompressed_rle(ring), mask=ring)
    blob = _disk(h, w, 32, 15, 6)
    coco_writer.add_ann(13, 1, 10, compressed_rle(blob), mask=blob)
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:8, 40:60] = 1
    coco_writer.add_ann(14, 1, 5, uncompressed_rle(crowd), mask=crowd, iscrowd=1)
    image_dir, ann_file = coco_writer.write()
    return image_dir, ann_file, {"ring": ring, "blob": blob}


def test_round_trip_every_encoding(mixed_file):
    image_dir, ann_file, masks = mixed_file
    ds = CocoInstances(image_dir, ann_file, train=True)
    # class mapping: COCO ids 5, 10 -> contiguous 0, 1
    assert ds.contiguous_to_coco == [5, 10]
    assert ds.coco_to_contiguous == {5: 0, 10: 1}
    assert ds.class_names == ["five", "ten"]
    assert isinstance(ds.coco, COCO) and ds.annotation_file == str(ann_file)
    # image 2 has no annotations: dropped for training
    assert len(ds) == 1 and ds.image_ids == [1]
    item = ds[0]
    assert item["image_id"] == 1 and item["orig_size"] == (40, 60)
    assert tuple(item["image"].shape) == (3, 40, 60) and item["image"].dtype == torch.uint8
    # the crowd region is not a target
    assert item["labels"].tolist() == [1, 0, 1]
    m = item["masks"].numpy()
    assert m.dtype == np.uint8 and m.shape == (3, 40, 60)
    # polygon: pycocotools' own decoding, and the rectangle it covers
    plain = COCO(str(ann_file))
    np.testing.assert_array_equal(m[0], plain.annToMask(plain.anns[11]))
    assert m[0][6:24, 11:29].all() and not m[0][:, 32:].any()
    np.testing.assert_array_equal(m[1], masks["ring"])  # uncompressed RLE
    np.testing.assert_array_equal(m[2], masks["blob"])  # compressed RLE
    assert m[1][20, 45] == 0  # the hole survived
    torch.testing.assert_close(item["boxes"][0], torch.tensor([10.0, 5.0, 30.0, 25.0]))  # xywh -> xyxy


def test_evaluation_keeps_images_without_annotations(mixed_file):
    image_dir, ann_file, _ = mixed_file
    ds = CocoInstances(image_dir, ann_file, train=False)
    assert ds.image_ids == [1, 2]
    empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 20) and empty["labels"].shape == (0,)
    assert CocoInstances(image_dir, ann_file, train=True, drop_empty=False).image_ids == [1, 2]
    assert CocoInstances(image_dir, ann_file, train=False, drop_empty=True).image_ids == [1]
    # the crowd annotation stays in the ground truth that evaluation uses
    assert ds.coco.anns[14]["iscrowd"] == 1


def test_dataloader_with_workers_and_collate(mixed_file):
    image_dir, ann_file, _ = mixed_file
    ds = CocoInstances(image_dir, ann_file, train=False, transforms=build_transforms(False, min_size=80, max_size=200))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=Collator(size_divisibility=32))
    (batch,) = list(loader)
    assert batch.image_ids == [1, 2]
    assert batch.orig_sizes == [(40, 60), (30, 20)]
    assert batch.image_sizes == [(80, 120), (120, 80)]  # short side 80
    assert tuple(batch.images.shape) == (2, 3, 128, 128)
    assert batch.targets[0]["masks"].shape == (3, 80, 120)
    assert batch.targets[1]["boxes"].shape == (0, 4)
