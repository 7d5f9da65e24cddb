"""Helpers writing small COCO files with known masks in every encoding COCO allows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of 0s then 1s in column-major order."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


class CocoWriter:
    """Builds a COCO dict plus images on disk; `write()` returns (image_dir, annotation_file)."""

    def __init__(self, root: Path, categories=((5, "five"), (10, "ten"))):
        self.root = root
        self.image_dir = root / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.data = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in categories]}

    def add_image(self, image_id: int, h: int, w: int, pixels: np.ndarray | None = None) -> str:
        name = f"{image_id:06d}.png"
        if pixels is None:
            pixels = np.full((h, w, 3), 90, np.uint8)
        Image.fromarray(pixels).save(self.image_dir / name)
        self.data["images"].append({"id": image_id, "file_name": name, "height": h, "width": w})
        return name

    def add_ann(self, ann_id: int, image_id: int, category_id: int, segmentation, bbox=None, iscrowd=0, mask=None):
        if bbox is None:
            assert mask is not None
            bbox = [float(v) for v in mask_util.toBbox(mask_util.encode(np.asfortranarray(mask.astype(np.uint8))))]
        self.data["annotations"].append({
            "id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "bbox": bbox, "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd,
        })

    def write(self, name: str = "instances.json") -> tuple[Path, Path]:
        path = self.root / name
        path.write_text(json.dumps(self.data))
        return self.image_dir, path
