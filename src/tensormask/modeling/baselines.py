"""torchvision's RetinaNet, Faster R-CNN and Mask R-CNN (ResNet-FPN) behind TensorMask's API.

    model = MaskRCNNBaseline(num_classes=K)
    out = model(batch.images)                                      # BaselineOutput (features)
    losses = model.losses(out, batch.targets, batch.image_sizes)   # torchvision's loss dict
    dets = model.predict(out, batch.image_sizes, batch.orig_sizes) # list[Detections]

The data pipeline resizes, normalises and pads (torchvision's own GeneralizedRCNNTransform is
bypassed), so the baselines see exactly the images TensorMask sees. The heads need the targets to
sample proposals, so `forward` runs the backbone and `losses` / `predict` run the rest.
Labels: torchvision reserves index 0 for the background, so contiguous label k is class k + 1 inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, _validate_trainable_layers
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import paste_masks_in_image, resize_boxes
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.models import resnet

from tensormask.structures import Detections

# torchvision's ImageNet weights: RGB in [0, 255] normalised with these (times 255)
TORCHVISION_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_STD = (58.395, 57.12, 57.375)


@dataclass
class BaselineOutput:
    """What a baseline's forward returns: the padded images and the FPN features.

    images:   (N, 3, Hp, Wp) the normalised input.
    features: FPN levels by name ("0", "1", ..., "pool" / "p6", "p7"), each (N, C, H_k, W_k).
    """

    images: Tensor
    features: dict[str, Tensor]


def _is_weights_file(weights_backbone: str) -> bool:
    return "/" in weights_backbone or weights_backbone.endswith((".pth", ".pt"))


def _resnet_trunk(depth: int, weights_backbone: str | None, norm: str) -> nn.Module:
    """torchvision's ResNet; `weights_backbone`: a torchvision weights name ("DEFAULT", downloaded)
    or the path of a torchvision ResNet state dict (e.g. ``resnet50-0676ba61.pth``), or None."""
    norm_layer = {"FrozenBN": misc_nn_ops.FrozenBatchNorm2d, "BN": nn.BatchNorm2d}.get(norm)
    if norm == "GN":
        norm_layer = lambda c: nn.GroupNorm(32, c)  # noqa: E731
    if norm_layer is None:
        raise ValueError(f"norm must be one of FrozenBN, BN, GN, got {norm!r}")
    builder = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}.get(depth)
    if builder is None:
        raise ValueError(f"depth must be one of 18, 34, 50, 101, got {depth}")
    if weights_backbone is not None and _is_weights_file(weights_backbone):
        trunk = builder(weights=None, norm_layer=norm_layer)
        state = torch.load(weights_backbone, map_location="cpu", weights_only=True)
        try:
            trunk.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as e:
            raise ValueError(f"{weights_backbone} is not a torchvision ResNet-{depth} state dict for norm={norm}: "
                             f"{str(e).splitlines()[0]}") from e
        return trunk
    weights = None
    if weights_backbone is not None:
        weights = resnet.__dict__[f"ResNet{depth}_Weights"].verify(weights_backbone)
    return builder(weights=weights, norm_layer=norm_layer)


class _Baseline(nn.Module):
    """Common part: the torchvision detector, its backbone, and the API adapters."""

    # TensorMask's API
    pixel_mean = TORCHVISION_MEAN
    pixel_std = TORCHVISION_STD
    input_format = "RGB"

    def __init__(self, detector: nn.Module, num_classes: int, size_divisibility: int) -> None:
        super().__init__()
        self.detector = detector
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility

    def forward(self, images: Tensor) -> BaselineOutput:
        """images (N, 3, Hp, Wp) normalised and padded -> the FPN features."""
        features = self.detector.backbone(images)
        if isinstance(features, Tensor):
            features = {"0": features}
        return BaselineOutput(images, features)

    @staticmethod
    def _torchvision_targets(targets: list[dict[str, Tensor]], with_masks: bool) -> list[dict[str, Tensor]]:
        out = []
        for t in targets:
            d = {"boxes": t["boxes"].float(), "labels": t["labels"] + 1}
            if with_masks:
                d["masks"] = t["masks"]
            out.append(d)
        return out

    def _to_detections(self, boxes: Tensor, scores: Tensor, labels: Tensor, masks: Tensor | None,
                       image_size: tuple[int, int], orig_size: tuple[int, int]) -> Detections:
        boxes = resize_boxes(boxes, image_size, orig_size)
        h0, w0 = orig_size
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
        out_masks = None
        if masks is not None:
            if len(boxes):
                probs = paste_masks_in_image(masks, boxes, (h0, w0))  # (D, 1, h0, w0)
                out_masks = probs[:, 0] > 0.5
            else:
                out_masks = torch.zeros(0, h0, w0, dtype=torch.bool, device=boxes.device)
        return Detections(boxes=boxes.float(), scores=scores.float(), labels=labels.long() - 1, masks=out_masks)


class _RCNNBaseline(_Baseline):
    with_masks = False

    def losses(self, out: BaselineOutput, targets: list[dict[str, Tensor]],
               image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        det = self.detector
        images = ImageList(out.images, [tuple(s) for s in image_sizes])
        tv_targets = self._torchvision_targets(targets, self.with_masks)
        proposals, rpn_losses = det.rpn(images, out.features, tv_targets)
        _, roi_losses = det.roi_heads(out.features, proposals, images.image_sizes, tv_targets)
        return {**rpn_losses, **roi_losses}

    @torch.no_grad()
    def predict(self, out: BaselineOutput, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[Detections]:
        det = self.detector
        images = ImageList(out.images, [tuple(s) for s in image_sizes])
        proposals, _ = det.rpn(images, out.features)
        results, _ = det.roi_heads(out.features, proposals, images.image_sizes)
        return [
            self._to_detections(r["boxes"], r["scores"], r["labels"], r.get("masks"), tuple(s), tuple(o))
            for r, s, o in zip(results, image_sizes, orig_sizes)
        ]


def _fpn_backbone(depth: int, norm: str, trainable_layers: int, weights_backbone: str | None,
                  extra_blocks: nn.Module | None = None, returned_layers: list[int] | None = None) -> nn.Module:
    trunk = _resnet_trunk(depth, weights_backbone, norm)
    trainable_layers = _validate_trainable_layers(weights_backbone is not None, trainable_layers, 5, 3)
    return _resnet_fpn_extractor(trunk, trainable_layers, returned_layers=returned_layers, extra_blocks=extra_blocks)


class FasterRCNNBaseline(_RCNNBaseline):
    """torchvision Faster R-CNN ResNet-FPN (boxes only).

    Args:
        num_classes: K foreground classes. depth: ResNet depth (50 in the paper's tables).
        norm: FrozenBN (with ImageNet weights), BN or GN. trainable_layers: ResNet stages trained (0-5).
        weights_backbone: torchvision weights name of the ResNet (e.g. "DEFAULT"; needs a download), the
            path of a torchvision ResNet state dict (``resnet50-0676ba61.pth``), or null.
        score_threshold, nms_threshold, max_detections: inference (as TensorMask's).
        size_divisibility: input padding multiple.
    """

    def __init__(self, num_classes: int = 80, depth: int = 50, norm: str = "FrozenBN", trainable_layers: int = 3,
                 weights_backbone: str | None = None, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 max_detections: int = 100, size_divisibility: int = 32, **kwargs: Any) -> None:
        backbone = _fpn_backbone(depth, norm, trainable_layers, weights_backbone)
        detector = FasterRCNN(backbone, num_classes=num_classes + 1, box_score_thresh=score_threshold,
                              box_nms_thresh=nms_threshold, box_detections_per_img=max_detections, **kwargs)
        super().__init__(detector, num_classes, size_divisibility)


class MaskRCNNBaseline(FasterRCNNBaseline):
    """torchvision Mask R-CNN ResNet-FPN (arguments as FasterRCNNBaseline)."""

    with_masks = True

    def __init__(self, num_classes: int = 80, depth: int = 50, norm: str = "FrozenBN", trainable_layers: int = 3,
                 weights_backbone: str | None = None, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 max_detections: int = 100, size_divisibility: int = 32, **kwargs: Any) -> None:
        backbone = _fpn_backbone(depth, norm, trainable_layers, weights_backbone)
        detector = MaskRCNN(backbone, num_classes=num_classes + 1, box_score_thresh=score_threshold,
                            box_nms_thresh=nms_threshold, box_detections_per_img=max_detections, **kwargs)
        _Baseline.__init__(self, detector, num_classes, size_divisibility)


class RetinaNetBaseline(_Baseline):
    """torchvision RetinaNet ResNet-FPN (P3-P7; boxes only). Arguments as FasterRCNNBaseline."""

    def __init__(self, num_classes: int = 80, depth: int = 50, norm: str = "FrozenBN", trainable_layers: int = 3,
                 weights_backbone: str | None = None, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 max_detections: int = 100, size_divisibility: int = 128, **kwargs: Any) -> None:
        in_p5 = 512 if depth < 50 else 2048
        backbone = _fpn_backbone(depth, norm, trainable_layers, weights_backbone,
                                 extra_blocks=LastLevelP6P7(in_p5, 256), returned_layers=[2, 3, 4])
        detector = RetinaNet(backbone, num_classes=num_classes + 1, score_thresh=score_threshold,
                             nms_thresh=nms_threshold, detections_per_img=max_detections, **kwargs)
        super().__init__(detector, num_classes, size_divisibility)

    def _head_outputs(self, out: BaselineOutput):
        det = self.detector
        features = list(out.features.values())
        head_outputs = det.head(features)
        anchors = det.anchor_generator(ImageList(out.images, [tuple(out.images.shape[-2:])] * len(out.images)),
                                       features)
        return features, head_outputs, anchors

    def losses(self, out: BaselineOutput, targets: list[dict[str, Tensor]],
               image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        _, head_outputs, anchors = self._head_outputs(out)
        return self.detector.compute_loss(self._torchvision_targets(targets, False), head_outputs, anchors)

    @torch.no_grad()
    def predict(self, out: BaselineOutput, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]]) -> list[Detections]:
        det = self.detector
        features, head_outputs, anchors = self._head_outputs(out)
        # split the flattened outputs per level, as torchvision's forward does
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        hw = sum(num_anchors_per_level)
        a = head_outputs["cls_logits"].size(1) // hw
        num_anchors_per_level = [n * a for n in num_anchors_per_level]
        split_head = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(x.split(num_anchors_per_level)) for x in anchors]
        results = det.postprocess_detections(split_head, split_anchors, [tuple(s) for s in image_sizes])
        return [
            self._to_detections(r["boxes"], r["scores"], r["labels"], None, tuple(s), tuple(o))
            for r, s, o in zip(results, image_sizes, orig_sizes)
        ]
