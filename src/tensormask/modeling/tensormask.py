"""The TensorMask network: backbone -> class / box / mask heads; (train) the criterion of losses.py,
(test) the decoder of inference.py. Which heads exist is the model's "mode" (appendix A.3, A.4; the
config group ``mode`` sets these keys): all three ("full"), no mask head (``mask_head=None``: box-only,
no mask branch is built), or no box head (``box_head=False``: mask-only, the windows serve as boxes
and NMS uses the masks' bounding boxes).

    model = TensorMask(backbone=ResNetFPN(...), mask_head=BipyramidMaskHead(...), num_classes=K)
    out = model(batch.images)                                      # TensorMaskOutput
    losses = model.losses(out, batch.targets, batch.image_sizes)   # {"loss_cls", "loss_box", "loss_mask"}
    dets = model.predict(out, batch.image_sizes, batch.orig_sizes) # list[Detections]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from tensormask.structures import Detections

from .heads import BoxHead, ClassHead, MaskHead, MaskPrediction
from .inference import NMS_STRATEGIES, TensorMaskDecoder
from .losses import TensorMaskCriterion
from .windows import BOX_WEIGHTS, Windows, make_windows

NMS_BOXES = tuple(NMS_STRATEGIES)


@dataclass
class TensorMaskOutput:
    """What ``TensorMask.forward`` returns.

    features: FPN levels P2.. (N, C, H_k, W_k).
    logits:   per level (N, A*K, H_k, W_k), channel a*K + k.
    deltas:   per level (N, A*4, H_k, W_k), channel a*4 + j; None without a box head.
    masks:    the mask head's raw prediction, or None: ``forward`` leaves it to what needs it, and
              each computes only the levels it uses (the training losses: the levels that hold
              positive windows; ``predict``: those of the surviving detections). Given (e.g.
              ``model.mask_head(out.features)``, all levels), losses and ``predict`` use it as is.
    """

    features: list[Tensor]
    logits: list[Tensor]
    deltas: list[Tensor] | None
    masks: MaskPrediction | None


def current_model_config(model_cfg: dict) -> dict:
    """A TensorMask config saved by an older version (``mode: full|box_only|mask_only``, a backbone
    ``weights`` key) as this version's constructor arguments: ``mode`` becomes ``mask_head: None`` /
    ``box_head: False``; ``weights`` is dropped (the caller loads it, see
    :func:`tensormask.framework.builders.build_model`). Returns a new dict; other configs unchanged."""
    model_cfg = dict(model_cfg)
    mode = model_cfg.pop("mode", None)
    if mode == "box_only":
        model_cfg["mask_head"] = None
    elif mode == "mask_only":
        model_cfg["box_head"] = False
    if isinstance(model_cfg.get("backbone"), dict):
        model_cfg["backbone"] = {k: v for k, v in model_cfg["backbone"].items() if k != "weights"}
    return model_cfg


class TensorMask(nn.Module):
    """TensorMask (Chen et al., ICCV 2019).

    Args:
        backbone: module mapping images (N, 3, H, W) to a list of levels; needs ``out_channels``
            and ``strides`` attributes (e.g. :class:`~tensormask.modeling.backbone.ResNetFPN`).
        mask_head: one of the mask-head designs in :mod:`tensormask.modeling.heads`, or None (a
            box-only model: no masks, no mask loss).
        num_classes: K foreground classes (labels 0..K-1).
        window_sizes: window sides in cells at each level's unit (must match the mask head's).
        box_head: build the box head (False: a mask-only model, Table 5; needs a mask head).
        nms_boxes: "bb" (regressed boxes, or the windows without a box head) or "mask-bb"
            (bounding boxes of the masks); these boxes are also the reported ones. Default: "bb",
            or "mask-bb" without a box head.
        class_channels, box_channels, num_convs: class / box tower widths and depth.
        prior_prob: initial class probability.
        focal_alpha, focal_gamma, focal_shift: FL* parameters (shift 0: detectron2's FL*; see
            :func:`~tensormask.modeling.losses.sigmoid_focal_loss_star`). box_weights: delta weights.
        mask_loss_weight, mask_pos_weight: mask BCE weight and foreground weight.
        scale_thresh, min_size, spatial_thresh: the assignment rule (min_size None = smallest
            window at the finest level minus its unit, 40 px for the reference).
        score_threshold, topk_candidates, nms_threshold, max_detections, mask_threshold: inference.
        soft_masks: also return soft masks in ``Detections``.
        size_divisibility: what the input padding must be a multiple of.
        pixel_mean, pixel_std, input_format: the normalisation the weights expect (for the data
            pipeline; the model itself takes normalised images).
    """

    def __init__(
        self,
        backbone: nn.Module,
        mask_head: MaskHead | None = None,
        num_classes: int = 80,
        window_sizes: tuple[int, ...] = (11, 15),
        box_head: bool = True,
        nms_boxes: str | None = None,
        class_channels: int = 256,
        box_channels: int = 128,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        focal_alpha: float = 0.3,
        focal_gamma: float = 3.0,
        focal_shift: float = 0.0,
        box_weights: tuple[float, ...] = BOX_WEIGHTS,
        mask_loss_weight: float = 2.0,
        mask_pos_weight: float = 1.5,
        scale_thresh: float = 2.0,
        min_size: float | None = None,
        spatial_thresh: float = 1.0,
        score_threshold: float = 0.05,
        topk_candidates: int = 6000,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        mask_threshold: float = 0.5,
        soft_masks: bool = False,
        size_divisibility: int = 32,
        pixel_mean: tuple[float, ...] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, ...] = (58.395, 57.12, 57.375),
        input_format: str = "RGB",
    ):
        super().__init__()
        if mask_head is None and not box_head:
            raise ValueError("a TensorMask needs a box head, a mask head or both (box_head=False and mask_head=None)")
        if nms_boxes is None:
            nms_boxes = "bb" if box_head else "mask-bb"
        if nms_boxes not in NMS_BOXES:
            raise ValueError(f"nms_boxes must be one of {NMS_BOXES}, got {nms_boxes!r}")
        if not box_head and nms_boxes != "mask-bb":
            raise ValueError("a model without a box head (box_head=False) needs nms_boxes='mask-bb'")
        if mask_head is None and nms_boxes != "bb":
            raise ValueError("a model without a mask head has no masks: nms_boxes must be 'bb'")
        if mask_head is not None:
            if tuple(mask_head.window_sizes) != tuple(window_sizes):
                raise ValueError(
                    f"mask_head.window_sizes={tuple(mask_head.window_sizes)} != window_sizes={tuple(window_sizes)}")
            if mask_head.num_levels != len(backbone.strides):
                raise ValueError(f"mask_head.num_levels={mask_head.num_levels} but the backbone has "
                                 f"{len(backbone.strides)} levels")
        self.backbone = backbone
        self.num_classes = num_classes
        self.window_sizes = tuple(int(s) for s in window_sizes)
        self.strides = tuple(backbone.strides)
        channels = backbone.out_channels
        num_windows = len(self.window_sizes)
        self.class_head = ClassHead(channels, num_classes, num_windows, class_channels, num_convs, prior_prob)
        self.box_head = BoxHead(channels, num_windows, box_channels, num_convs) if box_head else None
        self.mask_head = mask_head
        min_size = float(min(self.window_sizes) * self.strides[0] - self.strides[0]) if min_size is None else min_size
        self.criterion = TensorMaskCriterion(
            num_classes, focal_alpha=focal_alpha, focal_gamma=focal_gamma, focal_shift=focal_shift,
            box_weights=box_weights, mask_loss_weight=mask_loss_weight, mask_pos_weight=mask_pos_weight,
            scale_thresh=scale_thresh, min_size=min_size, spatial_thresh=spatial_thresh)
        self.decoder = TensorMaskDecoder(
            num_classes, nms_boxes, box_weights=box_weights, score_threshold=score_threshold,
            topk_candidates=topk_candidates, nms_threshold=nms_threshold, max_detections=max_detections,
            mask_threshold=mask_threshold, soft_masks=soft_masks)
        self.size_divisibility = size_divisibility
        self.pixel_mean, self.pixel_std, self.input_format = tuple(pixel_mean), tuple(pixel_std), input_format
        self._windows_cache: dict = {}

    # ----------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> TensorMaskOutput:
        """images (N, 3, Hp, Wp), normalised and padded to ``size_divisibility``."""
        features = self.backbone(images)
        logits = self.class_head(features)
        deltas = self.box_head(features) if self.box_head is not None else None
        # no mask branch here: the losses run it on the levels that hold positives only (a small
        # image's coarse levels hold none: 3 of the 6 at the quickstart's sizes, docs/model.md)
        return TensorMaskOutput(features, logits, deltas, None)

    def windows(self, out: TensorMaskOutput) -> Windows:
        """The windows of the output's grids (cached per grid sizes and device)."""
        grids = tuple(tuple(x.shape[-2:]) for x in out.logits)
        key = (grids, str(out.logits[0].device))
        if key not in self._windows_cache:
            self._windows_cache = {key: make_windows(list(grids), self.strides, self.window_sizes, out.logits[0].device)}
        return self._windows_cache[key]

    # ----------------------------------------------------------------------------------------
    def losses(self, out: TensorMaskOutput, targets: list[dict[str, Tensor]],
               image_sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The training losses (:class:`~tensormask.modeling.losses.TensorMaskCriterion`).

        targets: per image ``boxes`` (N, 4) xyxy, ``labels`` (N,), ``masks`` (N, h, w) uint8, in
        resized-image pixels. Returns {"loss_cls", "loss_box" (with a box head), "loss_mask"
        (with a mask head)}.
        """
        return self.criterion(out, self.windows(out), targets, self.mask_head)

    def predict(self, out: TensorMaskOutput, image_sizes: list[tuple[int, int]],
                orig_sizes: list[tuple[int, int]] | None = None, soft_masks: bool | None = None) -> list[Detections]:
        """Detections per image in ORIGINAL image pixels (boxes scaled from image_sizes to orig_sizes),
        by :class:`~tensormask.modeling.inference.TensorMaskDecoder`."""
        return self.decoder(out, self.windows(out), image_sizes, orig_sizes, self.mask_head, soft_masks)

    @property
    def nms_boxes(self) -> str:
        return self.decoder.nms_boxes

    @property
    def min_size(self) -> float:
        return self.criterion.min_size
