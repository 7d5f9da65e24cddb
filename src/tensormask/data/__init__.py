"""Data: COCO instances through pycocotools, transforms v2, collation into `Batch`, and the synthetic default."""

from tensormask.data.coco import CocoFormatError, CocoInstances, load_coco_json
from tensormask.data.collate import DETECTRON2_BGR_MEAN, DETECTRON2_BGR_STD, RGB_MEAN, RGB_STD, Collator
from tensormask.data.synthetic import SHAPES, default_cache_dir, make_synthetic_coco
from tensormask.data.transforms import ResizeShortestEdge, build_transforms

__all__ = [
    "CocoFormatError",
    "CocoInstances",
    "Collator",
    "DETECTRON2_BGR_MEAN",
    "DETECTRON2_BGR_STD",
    "RGB_MEAN",
    "RGB_STD",
    "ResizeShortestEdge",
    "SHAPES",
    "build_transforms",
    "default_cache_dir",
    "load_coco_json",
    "make_synthetic_coco",
]
