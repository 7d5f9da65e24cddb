"""Collation: normalise, pad to the size divisibility, and keep every image's sizes."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from tensormask.structures import Batch

# torchvision / ImageNet statistics for RGB inputs in [0, 255], and detectron2's BGR (std 1) ones.
RGB_MEAN = (123.675, 116.28, 103.53)
RGB_STD = (58.395, 57.12, 57.375)
DETECTRON2_BGR_MEAN = (103.53, 116.28, 123.675)
DETECTRON2_BGR_STD = (1.0, 1.0, 1.0)


class Collator:
    """Turns a list of `CocoInstances` items (after transforms) into a `Batch`.

    Args:
        size_divisibility: the padded height and width are multiples of this (the model's
            ``size_divisibility``; 1 or 0 means no rounding, only padding to the largest image).
        pixel_mean, pixel_std: per-channel statistics in the channel order the model sees
            (i.e. B, G, R when `bgr`), in the 0-255 pixel scale.
        bgr: feed channels as BGR (detectron2 / Caffe2 weights) instead of RGB.

    Output (see `tensormask.structures.Batch`): images float32 (B, 3, Hp, Wp), zero-padded at the
    bottom/right AFTER normalisation; targets in the resized, unpadded pixels, with masks uint8.
    """

    def __init__(
        self,
        size_divisibility: int = 32,
        pixel_mean: Sequence[float] = RGB_MEAN,
        pixel_std: Sequence[float] = RGB_STD,
        bgr: bool = False,
    ) -> None:
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need 3 values, got {pixel_mean} and {pixel_std}")
        if any(s <= 0 for s in pixel_std):
            raise ValueError(f"pixel_std must be positive, got {pixel_std}")
        self.size_divisibility = int(size_divisibility)
        self.pixel_mean = torch.tensor([float(m) for m in pixel_mean]).view(3, 1, 1)
        self.pixel_std = torch.tensor([float(s) for s in pixel_std]).view(3, 1, 1)
        self.bgr = bool(bgr)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 or float (3, h, w) RGB in 0-255 -> normalised float32 (3, h, w) in the model's channel order."""
        x = image.float()
        if self.bgr:
            x = x.flip(0)
        return (x - self.pixel_mean) / self.pixel_std

    def padded_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        hp = max(h for h, _ in sizes)
        wp = max(w for _, w in sizes)
        d = self.size_divisibility
        if d > 1:
            hp, wp = int(math.ceil(hp / d) * d), int(math.ceil(wp / d) * d)
        return hp, wp

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        sizes = [(int(it["image"].shape[-2]), int(it["image"].shape[-1])) for it in items]
        hp, wp = self.padded_size(sizes)
        images = torch.zeros(len(items), 3, hp, wp, dtype=torch.float32)
        targets = []
        for i, (it, (h, w)) in enumerate(zip(items, sizes)):
            images[i, :, :h, :w] = self.normalize(it["image"].as_subclass(torch.Tensor))
            boxes = it["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
            masks = it["masks"].as_subclass(torch.Tensor).to(torch.uint8).reshape(-1, h, w)
            labels = torch.as_tensor(it["labels"], dtype=torch.int64).reshape(-1)
            if not (boxes.shape[0] == masks.shape[0] == labels.shape[0]):
                raise ValueError(
                    f"image {it['image_id']}: {boxes.shape[0]} boxes, {masks.shape[0]} masks, {labels.shape[0]} labels"
                )
            targets.append({"boxes": boxes, "labels": labels, "masks": masks})
        return Batch(
            images=images,
            image_sizes=sizes,
            orig_sizes=[tuple(int(s) for s in it["orig_size"]) for it in items],
            image_ids=[int(it["image_id"]) for it in items],
            targets=targets,
        )
