"""The two records every part of the pipeline exchanges: a collated `Batch` and per-image `Detections`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """A collated batch of images and their training targets.

    images:      (B, 3, Hp, Wp) float32, normalised and zero-padded to the model's size divisibility.
    image_sizes: (h, w) of each image after resizing, before padding.
    orig_sizes:  (h0, w0) of each image as stored on disk.
    image_ids:   COCO image ids.
    targets:     per image, in resized (unpadded) pixels: ``boxes`` (N, 4) float32 xyxy,
                 ``labels`` (N,) int64 contiguous class index, ``masks`` (N, h, w) uint8.
                 Crowd regions are not training targets and are left out.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    orig_sizes: list[tuple[int, int]]
    image_ids: list[int]
    targets: list[dict[str, Tensor]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            images=self.images.to(device, non_blocking=True),
            image_sizes=self.image_sizes,
            orig_sizes=self.orig_sizes,
            image_ids=self.image_ids,
            targets=[{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in self.targets],
        )

    def __len__(self) -> int:
        return len(self.image_sizes)


@dataclass
class Detections:
    """The detections of one image, in the ORIGINAL image's pixels.

    boxes:      (D, 4) float32 xyxy.
    scores:     (D,) float32.
    labels:     (D,) int64 contiguous class index.
    masks:      (D, h0, w0) bool, or None for box-only models.
    soft_masks: (D, h0, w0) float32 mask probabilities, only when asked for.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor | None = None
    soft_masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to(self, device: torch.device | str) -> "Detections":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Detections(move(self.boxes), move(self.scores), move(self.labels), move(self.masks), move(self.soft_masks))

    @staticmethod
    def empty(height: int, width: int, with_masks: bool = True) -> "Detections":
        return Detections(
            boxes=torch.zeros(0, 4),
            scores=torch.zeros(0),
            labels=torch.zeros(0, dtype=torch.int64),
            masks=torch.zeros(0, height, width, dtype=torch.bool) if with_masks else None,
        )
