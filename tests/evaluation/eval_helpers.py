"""Ground truths and predictions for the evaluation tests."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_util

from tensormask.data.coco import coco_from_dict
from tensormask.structures import Detections


def square_mask(h, w, x0, y0, size):
    m = np.zeros((h, w), np.uint8)
    m[y0 : y0 + size, x0 : x0 + size] = 1
    return m


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def gt_dict(objects, h=50, w=60, categories=((3, "a"), (8, "b")), n_images=1):
    """objects: (image_id, category_id, x0, y0, size, iscrowd) squares."""
    images = [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in range(1, n_images + 1)]
    anns = []
    for k, (image_id, cat, x0, y0, size, crowd) in enumerate(objects):
        m = square_mask(h, w, x0, y0, size)
        anns.append({
            "id": k + 1, "image_id": image_id, "category_id": cat, "segmentation": rle(m),
            "bbox": [float(x0), float(y0), float(size), float(size)], "area": float(size * size), "iscrowd": crowd,
        })
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in categories]}


def detections(items, h=50, w=60, with_masks=True):
    """items: (label, x0, y0, size, score) squares -> Detections in original pixels."""
    boxes = torch.tensor([[x0, y0, x0 + s, y0 + s] for _, x0, y0, s, _ in items], dtype=torch.float32).reshape(-1, 4)
    masks = torch.from_numpy(np.stack([square_mask(h, w, x0, y0, s) for _, x0, y0, s, _ in items])).bool() if items else torch.zeros(0, h, w, dtype=torch.bool)
    return Detections(
        boxes=boxes,
        scores=torch.tensor([it[4] for it in items], dtype=torch.float32),
        labels=torch.tensor([it[0] for it in items], dtype=torch.int64),
        masks=masks if with_masks else None,
    )


def coco(data):
    return coco_from_dict(data)


def noisy_predictions(dataset, image_index: int, seed: int = 0) -> Detections:
    """Ground truth of one image with jittered boxes/masks, random scores, and a false positive."""
    g = torch.Generator().manual_seed(seed * 1000 + image_index)
    boxes, masks, labels = dataset.load_target(image_index)
    n = len(labels)
    shift = torch.randint(-3, 4, (n, 2), generator=g)
    boxes = boxes + shift.repeat(1, 2).float()
    masks = torch.stack([torch.roll(m, (int(s[1]), int(s[0])), dims=(0, 1)) for m, s in zip(masks, shift)]) if n else masks
    scores = torch.rand(n, generator=g)
    labels = labels.clone()
    if n:
        wrong = torch.rand(n, generator=g) < 0.2
        labels[wrong] = (labels[wrong] + 1) % dataset.num_classes
    h, w = masks.shape[-2:]
    fp_mask = torch.zeros(1, h, w, dtype=torch.uint8)
    fp_mask[0, : h // 4, : w // 4] = 1
    return Detections(
        boxes=torch.cat([boxes, torch.tensor([[0.0, 0.0, w // 4, h // 4]])]),
        scores=torch.cat([scores, torch.rand(1, generator=g)]),
        labels=torch.cat([labels, torch.tensor([image_index % dataset.num_classes])]),
        masks=torch.cat([masks, fp_mask]).bool(),
    )
