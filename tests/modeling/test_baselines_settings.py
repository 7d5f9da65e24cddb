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


def test_targets_and_detections_convert_to_and_from_torchvision():
    # torchvision counts the background as class 0: labels go in + 1 and come out - 1
    import torch

    from tensormask.modeling.baselines import _Baseline

    target = {"boxes": torch.tensor([[1, 2, 3, 4]], dtype=torch.int64), "labels": torch.tensor([0]),
              "masks": torch.ones(1, 8, 8, dtype=torch.uint8)}
    (tv,) = _Baseline._torchvision_targets([target], with_masks=False)
    assert tv.keys() == {"boxes", "labels"} and tv["boxes"].dtype == torch.float32 and tv["labels"].tolist() == [1]
    (tv,) = _Baseline._torchvision_targets([target], with_masks=True)
    assert tv["masks"] is target["masks"]

    # boxes found in a 50 x 100 resized image, reported in the 100 x 400 original: x * 4, y * 2,
    # clipped to the original image
    model = FasterRCNNBaseline(num_classes=3, depth=18, norm="BN")
    boxes = torch.tensor([[10.0, 5.0, 20.0, 30.0], [-5.0, 40.0, 120.0, 60.0]])
    det = model._to_detections(boxes.clone(), torch.tensor([0.9, 0.8]), torch.tensor([1, 3]), None, (50, 100), (100, 400))
    torch.testing.assert_close(det.boxes, torch.tensor([[40.0, 10.0, 80.0, 60.0], [0.0, 80.0, 400.0, 100.0]]))
    assert det.labels.tolist() == [0, 2] and det.masks is None
    # Mask R-CNN's 28 x 28 mask probabilities are pasted into the original image's boxes
    probs = torch.ones(2, 1, 28, 28)
    det = model._to_detections(boxes.clone(), torch.tensor([0.9, 0.8]), torch.tensor([1, 3]), probs, (50, 100), (100, 400))
    assert det.masks.shape == (2, 100, 400) and det.masks.dtype == torch.bool
    # the box (x 40-80, y 10-60) is filled; torchvision's paste spreads at most a few pixels beyond it
    m = det.masks[0]
    assert m[10:60, 40:80].all() and not m[:, :36].any() and not m[:, 84:].any() and not m[:6].any() and not m[64:].any()
    empty = model._to_detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                                 torch.zeros(0, 1, 28, 28), (50, 100), (100, 400))
    assert empty.masks.shape == (0, 100, 400)
