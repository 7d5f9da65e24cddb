"""The TensorMask network: backbone, windows, heads, assignment, losses, inference."""

from .assignment import Assignment, assign_windows, mask_targets
from .backbone import FrozenBatchNorm2d, ResNet, ResNetFPN
from .detectron2_import import (
    CheckpointMismatch,
    CheckpointReadError,
    build_detectron2_tensormask,
    load_backbone_weights,
    load_detectron2_checkpoint,
)
from .heads import (
    BipyramidMaskHead,
    BoxHead,
    ClassHead,
    MaskHead,
    MaskPrediction,
    SimpleAlignedMaskHead,
    SimpleNaturalMaskHead,
    UpscalingAlignedMaskHead,
    UpscalingNaturalMaskHead,
)
from .inference import NMS_STRATEGIES, MaskBoxNMS, RegressedBoxNMS, TensorMaskDecoder
from .losses import Positives, TensorMaskCriterion
from .tensormask import TensorMask, TensorMaskOutput
from .windows import Windows, decode_boxes, encode_boxes, flatten_per_window, make_windows

__all__ = [
    "TensorMask",
    "TensorMaskOutput",
    "TensorMaskCriterion",
    "Positives",
    "TensorMaskDecoder",
    "NMS_STRATEGIES",
    "RegressedBoxNMS",
    "MaskBoxNMS",
    "ResNet",
    "ResNetFPN",
    "FrozenBatchNorm2d",
    "ClassHead",
    "BoxHead",
    "MaskHead",
    "MaskPrediction",
    "SimpleNaturalMaskHead",
    "SimpleAlignedMaskHead",
    "UpscalingNaturalMaskHead",
    "UpscalingAlignedMaskHead",
    "BipyramidMaskHead",
    "Assignment",
    "assign_windows",
    "mask_targets",
    "Windows",
    "make_windows",
    "flatten_per_window",
    "encode_boxes",
    "decode_boxes",
    "CheckpointMismatch",
    "CheckpointReadError",
    "build_detectron2_tensormask",
    "load_backbone_weights",
    "load_detectron2_checkpoint",
]
