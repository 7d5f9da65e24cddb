"""Write a small COCO-format instance segmentation data set the way other tools do, for trying the
"Your own data" path (docs/data.md) on something that is not the project's synthetic generator.

    python scripts/make_own_coco.py --out /tmp/own_coco --train 160 --val 40

Images of 256-512 px (each side drawn independently) on smooth colour fields with grain, holding
1-4 objects of three categories -- 'crescent' (a disc minus an offset disc), 'bar' (a rotated
capsule), 'blob' (a star-convex polygon with a random radius profile) -- of 32-128 px, each in a
flat colour with a light texture, occluding earlier ones. The categories list a 'background'
category with id 0 that no annotation uses (as many labelling tools write), image ids start at
1000 with gaps, and every third image is listed by its absolute path (the others relative to the
split's folder). Masks are compressed RLE of the visible pixels. Layout:
<out>/{train,val}/*.jpg and <out>/annotations/{train,val}.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_util

CATEGORIES = [{"id": 0, "name": "background"}, {"id": 1, "name": "crescent"}, {"id": 2, "name": "bar"},
              {"id": 3, "name": "blob"}]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour field with grain, (h, w, 3) float."""
    a, b = rng.uniform(20, 140, 3), rng.uniform(20, 140, 3)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    t = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return a * (1 - t[..., None]) + b * t[..., None] + rng.normal(0, 6, (h, w, 1))


def _shape_mask(rng: np.random.Generator, category: int, h: int, w: int, size: float) -> np.ndarray | None:
    """A binary (h, w) mask of one object of `category` about `size` px across, or None if it does not fit."""
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2
    if category == 1:  # crescent
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        angle = rng.uniform(0, 2 * math.pi)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        draw.ellipse([ox - 0.8 * r, oy - 0.8 * r, ox + 0.8 * r, oy + 0.8 * r], fill=0)
    elif category == 2:  # bar: a rotated capsule of width ~ size / 4
        angle = rng.uniform(0, math.pi)
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=1, width=max(6, int(size / 4)))
    else:  # blob: star-convex with a smooth random radius profile
        k = np.arange(1, 4)
        amps, phases = rng.uniform(0.05, 0.25, 3), rng.uniform(0, 2 * math.pi, 3)
        thetas = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radii = r * (0.7 + (amps[:, None] * np.cos(k[:, None] * thetas + phases[:, None])).sum(0))
        draw.polygon([(cx + q * math.cos(t), cy + q * math.sin(t)) for q, t in zip(radii, thetas)], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    return mask if mask.sum() >= 64 else None


def make_split(rng: np.random.Generator, out: Path, split: str, count: int, first_id: int) -> Path:
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + 3 * i
        h, w = (int(v) for v in rng.integers(256, 513, 2))
        pixels = _background(rng, h, w)
        objects: list[tuple[int, np.ndarray]] = []
        for _ in range(int(rng.integers(1, 5))):
            category = int(rng.integers(1, 4))
            mask = _shape_mask(rng, category, h, w, float(np.exp(rng.uniform(math.log(32), math.log(128)))))
            if mask is None:
                continue
            colour = rng.uniform(90, 255, 3)
            texture = rng.normal(0, 12, (h, w, 1)) * (1 + (category == 3))
            pixels[mask] = (colour + texture[mask])
            objects = [(c, m & ~mask) for c, m in objects] + [(category, mask)]
        picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
        name = f"{split}_{image_id:05d}.jpg"
        picture.save(folder / name, quality=92)
        file_name = str((folder / name).resolve()) if i % 3 == 2 else name
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for category, mask in objects:
            if mask.sum() < 16:  # fully hidden by later objects
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle)),
            })
    path = out / "annotations" / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, count, first in (("train", args.train, 1000), ("val", args.val, 5000)):
        path = make_split(rng, args.out, split, count, first)
        data = json.loads(path.read_text())
        print(f"{path}: {len(data['images'])} images, {len(data['annotations'])} objects")


if __name__ == "__main__":
    main()
