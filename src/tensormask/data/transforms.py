"""Training and evaluation transforms with torchvision.transforms.v2 and tv_tensors.

The item dict of `CocoInstances` holds a tv_tensors.Image, BoundingBoxes and Mask, so every
geometric transform moves the boxes and masks with the image. Normalisation and padding happen
in the collate (`tensormask.data.collate.Collator`), on whole batches, after these.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class ResizeShortestEdge(v2.Transform):
    """Resize so the shorter side is `short` (fixed, or drawn per call) and the longer at most `max_size`.

    Args:
        short: an int (fixed), a (lo, hi) tuple (uniform integer in [lo, hi], the 6x schedule's
            640-800), or a list of ints (one chosen uniformly).
        max_size: cap on the longer side after resizing.

    Sizes are rounded to the nearest integer (as detectron2's ResizeShortestEdge does). Images are
    resized bilinearly with antialiasing, masks with nearest neighbour, boxes scaled exactly.
    """

    def __init__(self, short: int | tuple[int, int] | Sequence[int], max_size: int) -> None:
        super().__init__()
        if isinstance(short, int):
            choices = [short]
            self.range = None
        elif isinstance(short, tuple) and len(short) == 2:
            lo, hi = int(short[0]), int(short[1])
            if not 0 < lo <= hi:
                raise ValueError(f"short side range must satisfy 0 < lo <= hi, got {short}")
            choices, self.range = [], (lo, hi)
        else:
            choices = [int(s) for s in short]
            self.range = None
            if not choices:
                raise ValueError("empty list of short side sizes")
        if any(c <= 0 for c in choices) or max_size <= 0:
            raise ValueError(f"sizes must be positive, got short={short}, max_size={max_size}")
        self.choices = choices
        self.max_size = int(max_size)

    def _draw_short(self) -> int:
        if self.range is not None:
            return int(torch.randint(self.range[0], self.range[1] + 1, ()).item())
        return self.choices[int(torch.randint(len(self.choices), ()).item())] if len(self.choices) > 1 else self.choices[0]

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"size": output_size(h, w, self._draw_short(), self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (int, float, str, tuple)) or inpt is None:
            return inpt
        return self._call_kernel(F.resize, inpt, size=list(params["size"]), antialias=True)


def output_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side `short` unless the longer would exceed `max_size`."""
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def build_transforms(
    train: bool,
    *,
    min_size: int | tuple[int, int] | Sequence[int],
    max_size: int,
    flip_prob: float = 0.5,
    sanitize: bool = True,
) -> v2.Compose:
    """The transform pipeline of one split.

    Args:
        train: training pipeline (random short side if `min_size` is a range/list, flip) or
            evaluation (fixed short side: the upper end of a range, or the largest of a list).
        min_size: short side in pixels: int, (lo, hi) range, or list of choices.
        max_size: cap on the long side.
        flip_prob: horizontal flip probability (training only).
        sanitize: drop instances whose box became smaller than one pixel (training only).

    Returns a v2.Compose taking and returning the item dict of `CocoInstances`.
    """
    if not train and not isinstance(min_size, int):
        min_size = max(min_size)
    steps: list[v2.Transform] = [ResizeShortestEdge(min_size, max_size)]
    if train:
        if flip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(p=flip_prob))
        if sanitize:
            steps.append(v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter="default"))
    return v2.Compose(steps)
