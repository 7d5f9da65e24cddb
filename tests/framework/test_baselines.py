"""The torchvision baselines train a few steps and evaluate through the same module, data and metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from framework_helpers import TINY_DATA, TINY_RUN, compose_config
from tensormask.modeling.baselines import MaskRCNNBaseline
from tensormask.structures import Detections
from tensormask.train import train


@pytest.mark.parametrize("name, with_masks", [("maskrcnn", True), ("fasterrcnn", False), ("retinanet", False)])
def test_baseline_trains_and_evaluates(tmp_path, name, with_masks):
    run_dir = tmp_path / "run"
    # few proposals / detections: the untrained heads would otherwise keep 100 detections per image
    # and Mask R-CNN's mask head would run on all of them
    small = ["model.max_detections=10"]
    if name == "retinanet":
        small += ["+model.topk_candidates=100"]
    else:
        small += ["+model.rpn_pre_nms_top_n_test=100", "+model.rpn_post_nms_top_n_test=20",
                  "+model.rpn_pre_nms_top_n_train=200", "+model.rpn_post_nms_top_n_train=50",
                  "+model.box_batch_size_per_image=32"]
    # FrozenBN without ImageNet weights: a plumbing test, so random weights are allowed explicitly
    cfg = compose_config("train", [f"model={name}", "model.depth=18", "model.trainable_layers=5", *small,
                                   *TINY_DATA, *TINY_RUN, "allow_random_init=true"], run_dir)
    metrics, objects = train(cfg)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert set(metrics) == ({"bbox", "segm"} if with_masks else {"bbox"})
    assert all(0 <= metrics[t]["AP"] <= 1 or math.isnan(metrics[t]["AP"]) for t in metrics)
    # torchvision normalisation reached the data pipeline
    assert objects["datamodule"].bgr is False
    assert tuple(objects["datamodule"].pixel_mean) == pytest.approx((123.675, 116.28, 103.53))


def test_baseline_adapter_api():
    torch.manual_seed(0)
    model = MaskRCNNBaseline(num_classes=3, depth=18, score_threshold=0.0)
    images = torch.randn(2, 3, 64, 96)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2]),
         "masks": torch.ones(1, 64, 90, dtype=torch.uint8)},
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 60.0]]), "labels": torch.tensor([0]),
         "masks": torch.ones(1, 60, 96, dtype=torch.uint8)},
    ]
    model.train()
    losses = model.losses(model(images), targets, [(64, 90), (60, 96)])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    sum(losses.values()).backward()
    model.eval()
    dets = model.predict(model(images), [(64, 90), (60, 96)], [(128, 180), (30, 48)])
    assert len(dets) == 2 and all(isinstance(d, Detections) for d in dets)
    for d, (h0, w0) in zip(dets, [(128, 180), (30, 48)]):
        assert d.masks is not None and d.masks.shape[1:] == (h0, w0) and d.masks.dtype == torch.bool
        if len(d):
            assert int(d.labels.min()) >= 0 and int(d.labels.max()) < 3
            assert float(d.boxes[:, 2].max()) <= w0 and float(d.boxes[:, 3].max()) <= h0
