"""The baselines (Mask R-CNN, Faster R-CNN, RetinaNet of torchvision) hand their inference settings
to torchvision's detectors, and refuse unknown ResNet depths / norms by name."""

import pytest

from tensormask.modeling.baselines import FasterRCNNBaseline, MaskRCNNBaseline, RetinaNetBaseline

SETTINGS = dict(num_classes=3, depth=18, norm="BN", trainable_layers=5, score_threshold=0.125, nms_threshold=0.375,
                max_detections=7)


@pytest.mark.parametrize("cls", [FasterRCNNBaseline, MaskRCNNBaseline])
def test_rcnn_baselines_use_their_inference_settings(cls):
    heads = cls(**SETTINGS).detector.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.125, 0.375, 7)
    assert heads.box_predictor.cls_score.out_features == 4  # 3 classes + torchvision's background


def test_retinanet_baseline_uses_its_inference_settings():
    det = RetinaNetBaseline(**SETTINGS).detector
    assert (det.score_thresh, det.nms_thresh, det.detections_per_img) == (0.125, 0.375, 7)


def test_unknown_depth_or_norm_is_named():
    with pytest.raises(ValueError, match=r"depth must be one of 18, 34, 50, 101, got 42"):
        FasterRCNNBaseline(depth=42)
    with pytest.raises(ValueError, match=r"norm must be one of FrozenBN, BN, GN, got 'LN'"):
        FasterRCNNBaseline(depth=18, norm="LN")
