"""Small TensorMask models and synthetic targets for the modeling tests."""

import torch

from tensormask.modeling import ResNetFPN, TensorMask
from tensormask.modeling.heads import (
    BipyramidMaskHead, SimpleAlignedMaskHead, SimpleNaturalMaskHead, UpscalingAlignedMaskHead, UpscalingNaturalMaskHead,
)

# every mask-head design by a short name (Hydra builds them from conf/model/mask_head/ by class path)
MASK_HEADS = {
    "simple_natural": SimpleNaturalMaskHead,
    "simple_aligned": SimpleAlignedMaskHead,
    "upscaling_natural": UpscalingNaturalMaskHead,
    "upscaling_aligned": UpscalingAlignedMaskHead,
    "bipyramid": BipyramidMaskHead,
}


def make_head(name: str, channels: int = 16, window_sizes=(11, 15), **kwargs):
    kw = dict(in_channels=32, window_sizes=window_sizes, num_levels=6, channels=channels, num_convs=2)
    if name.startswith("upscaling"):
        kw.update(lambda_val=kwargs.pop("lambda_val", 1.5 if name.endswith("aligned") else 3.0),
                  interpolation=kwargs.pop("interpolation", "bilinear"))
    kw.update(kwargs)
    return MASK_HEADS[name](**kw)


def make_model(head: str = "bipyramid", mode: str = "full", num_classes: int = 3, window_sizes=(11, 15), **kwargs):
    """mode: "full", "box_only" (no mask head) or "mask_only" (no box head), as conf/mode/ sets them."""
    backbone = ResNetFPN(depth=18, norm="GN", freeze_at=0, out_channels=32)
    mask_head = make_head(head, window_sizes=window_sizes) if mode != "box_only" else None
    return TensorMask(backbone, mask_head, num_classes=num_classes, window_sizes=window_sizes,
                      box_head=mode != "mask_only", class_channels=32, box_channels=16, num_convs=2, **kwargs)


def rectangle_target(h, w, box, label):
    x0, y0, x1, y1 = box
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([label]), "masks": masks}


def empty_target(h, w):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
