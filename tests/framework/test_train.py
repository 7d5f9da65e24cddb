"""Tiny end-to-end runs of `train(cfg)`: every mask-head design and every mode trains and evaluates."""

from __future__ import annotations

import csv
import json
import math

import pytest
from omegaconf import open_dict

from tensormask.framework.checkpoint_io import strict_json
from tensormask.train import train

from framework_helpers import tiny_train_config

HEADS = ["bipyramid", "natural", "aligned", "upscale_natural", "upscale_aligned", "instancefcn"]


def logged_keys(run_dir) -> set[str]:
    """The metric names the csv logger wrote."""
    (metrics_csv,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics_csv) as f:
        return set(next(csv.reader(f)))


def _check_run(run_dir, metrics, steps, with_masks=True):
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "finished", summary
    assert summary["error"] is None
    assert summary["steps"] == steps
    assert summary["run_dir"] == str(run_dir)
    assert summary["metrics"] == strict_json(metrics)  # strict JSON: NaN is null
    assert set(metrics) == ({"bbox", "segm"} if with_masks else {"bbox"})
    for task in metrics:
        assert 0.0 <= metrics[task]["AP"] <= 1.0 or math.isnan(metrics[task]["AP"])
        assert len([k for k in metrics[task] if not k.startswith("AP-")]) == 12
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "config.yaml").is_file()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("head", HEADS)
def test_tiny_run_each_head(tmp_path, head):
    extra = [f"model/mask_head={head}"]
    if head.startswith("upscale") or head == "instancefcn":
        extra += ["model.window_sizes=[15]", "model.mask_head.lambda_val=3.0"]
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, *extra)
    metrics, objects = train(cfg)
    _check_run(run_dir, metrics, steps=2)
    assert type(objects["model"].mask_head).__name__.lower().startswith(
        {"bipyramid": "bipyramid", "natural": "simplenatural", "aligned": "simplealigned",
         "upscale_natural": "upscalingnatural", "upscale_aligned": "upscalingaligned",
         "instancefcn": "upscalingaligned"}[head])
    if head == "instancefcn":
        assert objects["model"].mask_head.interpolation == "nearest"
    # the losses were logged under their names
    logged = logged_keys(run_dir)
    assert {"train/loss_cls", "train/loss_box", "train/loss_mask", "train/loss", "lr", "val/segm_AP"} <= set(logged)


@pytest.mark.parametrize("mode", ["box_only", "mask_only"])
def test_tiny_run_each_mode(tmp_path, mode):
    run_dir = tmp_path / "run"
    metrics, objects = train(tiny_train_config(run_dir, f"mode={mode}"))
    _check_run(run_dir, metrics, steps=2, with_masks=mode != "box_only")
    model = objects["model"]
    assert (model.mask_head is None) == (mode == "box_only") and (model.box_head is None) == (mode == "mask_only")
    logged = logged_keys(run_dir)
    if mode == "box_only":
        assert "train/loss_mask" not in logged and model.mask_head is None
    else:
        assert "train/loss_box" not in logged and model.nms_boxes == "mask-bb"


def test_failed_run_is_recorded_and_raises(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_train_config(run_dir, "data.synthetic.num_classes=2")  # != data.num_classes: the data module refuses
    with pytest.raises(ValueError, match="num_classes"):
        train(cfg)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "failed"
    assert "num_classes" in summary["error"]


def test_channels_last_gives_the_same_losses_and_detections(tmp_path):
    """module.channels_last only changes the memory layout: same losses, gradients and detections
    (in float64, where summing in another order does not matter)."""
    import copy
    import dataclasses

    import torch

    from tensormask.framework.builders import build_datamodule, build_model, build_module

    cfg = tiny_train_config(tmp_path / "run", "model.score_threshold=0.0")
    torch.manual_seed(0)
    model = build_model(cfg).double()
    twin = copy.deepcopy(model)
    datamodule = build_datamodule(cfg, model)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = dataclasses.replace(batch, images=batch.images.double())
    results = []
    for net, channels_last in ((model, False), (twin, True)):
        with open_dict(cfg):
            cfg.module.channels_last = channels_last
        module = build_module(cfg, net)
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert module._images(batch).is_contiguous(memory_format=torch.channels_last) == channels_last
        net.train()
        out = module._forward(module._images(batch))
        losses = net.losses(out, batch.targets, batch.image_sizes)
        sum(losses.values()).backward()
        net.eval()
        with torch.no_grad():
            detections = module.detect(batch)
        results.append((losses, conv.weight.grad.clone(), detections))
    (losses_a, grad_a, det_a), (losses_b, grad_b, det_b) = results
    for name in losses_a:
        torch.testing.assert_close(losses_a[name], losses_b[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-7, atol=1e-12)
    for a, b in zip(det_a, det_b):
        assert len(a.scores) > 0
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=1e-7, atol=1e-6)
        assert torch.equal(a.labels, b.labels)
