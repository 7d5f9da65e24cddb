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


def test_a_weights_file_is_loaded_and_only_the_last_stages_train(tmp_path):
    # with ImageNet weights (a torchvision ResNet state dict file), trainable_layers=2 trains layer3
    # and layer4 only; without weights every stage trains (torchvision's rule)
    import torch
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18-test.pth")
    model = FasterRCNNBaseline(num_classes=3, depth=18, norm="FrozenBN", trainable_layers=2,
                               weights_backbone=str(tmp_path / "resnet18-test.pth"))
    body = model.detector.backbone.body
    torch.testing.assert_close(body.conv1.weight, reference.conv1.weight)
    trains = {name: any(p.requires_grad for p in getattr(body, name).parameters())
              for name in ("conv1", "layer1", "layer2", "layer3", "layer4")}
    assert trains == {"conv1": False, "layer1": False, "layer2": False, "layer3": True, "layer4": True}
    body = FasterRCNNBaseline(num_classes=3, depth=18, norm="BN", trainable_layers=2).detector.backbone.body
    assert all(p.requires_grad for p in body.parameters())
