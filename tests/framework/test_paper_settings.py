"""The paper recipes, composed as a user runs them, hold the paper's / detectron2's numbers, and the
model built from them keeps every setting it is given.

Sources: the paper (Chen et al., ICCV 2019): its "Label assignment", "Loss", "Training" and
"Inference" paragraphs and Table 3; detectron2's projects/TensorMask configs (docs/model.md).
"""

import pytest
import torch
from omegaconf import OmegaConf

from framework_helpers import compose_config
from tensormask.framework.builders import build_model

# model keys (conf/model/tensormask.yaml) -> the paper's / detectron2's value
MODEL = {
    "window_sizes": [11, 15],  # 11x11 and 15x15 windows (Table 2d)
    "class_channels": 256, "box_channels": 128, "num_convs": 4,
    "prior_prob": 0.01,
    "focal_alpha": 0.3, "focal_gamma": 3.0, "focal_shift": 0.0,  # detectron2's FL*: no shift
    "box_weights": [1.5, 1.5, 0.75, 0.75],
    "mask_loss_weight": 2.0, "mask_pos_weight": 1.5,
    "scale_thresh": 2.0, "min_size": None, "spatial_thresh": 1.0,  # None: 11 * 4 - 4 = 40 px
    "score_threshold": 0.05, "topk_candidates": 6000, "nms_threshold": 0.5, "max_detections": 100,
    "mask_threshold": 0.5,
    "size_divisibility": 32,
    "pixel_mean": [103.53, 116.28, 123.675], "pixel_std": [1.0, 1.0, 1.0], "input_format": "BGR",
}
BACKBONE = {"norm": "FrozenBN", "freeze_at": 2, "out_channels": 256, "stride_in_1x1": True}
HEAD = {"channels": 128, "num_levels": 6, "pad_val": -6.0}
MODULE = {"base_lr": 0.02, "base_batch_size": 16, "gamma": 0.1, "warmup_steps": 1000, "warmup_factor": 0.001,
          "weight_decay": 1e-4, "weight_decay_norm": 0.0}
# experiment -> (depth, max_steps, milestones, train short sides, sampling)
RECIPES = {
    "r50_1x": (50, 90_000, [60_000, 80_000], [800], "choice"),
    "r50_6x": (50, 540_000, [480_000, 520_000], [640, 800], "range"),
    "r101_6x": (101, 540_000, [480_000, 520_000], [640, 800], "range"),
}


@pytest.mark.parametrize("experiment", sorted(RECIPES))
def test_paper_recipes_compose_to_the_paper_numbers(tmp_path, experiment):
    cfg = compose_config("train", [f"experiment={experiment}"], tmp_path)
    depth, steps, milestones, sides, mode = RECIPES[experiment]
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for key, value in MODEL.items():
        assert model[key] == value, (experiment, key)
    assert model["_target_"] == "tensormask.modeling.TensorMask"
    assert model["mask_head"]["_target_"] == "tensormask.modeling.BipyramidMaskHead"
    assert {k: model["mask_head"][k] for k in HEAD} == HEAD and model["mask_head"]["window_sizes"] == [11, 15]
    assert model["backbone"]["depth"] == depth and {k: model["backbone"][k] for k in BACKBONE} == BACKBONE
    assert model["box_head"] is True and model["nms_boxes"] is None  # mode=full: every head, NMS on "bb"
    # data=coco takes its classes from the annotation file at the start of a run (80 for COCO 2017;
    # tests/framework/test_user_paths.py)
    assert model["num_classes"] is None and cfg.data.num_classes is None
    assert {k: cfg.module[k] for k in MODULE} == pytest.approx(MODULE)
    assert cfg.module.optimizer._target_ == "torch.optim.SGD" and cfg.module.optimizer.momentum == 0.9
    assert list(cfg.module.milestones) == milestones and cfg.trainer.max_steps == steps
    assert cfg.data.global_batch_size == 16
    train = cfg.data.train_transforms
    assert list(train.min_size) == sides and train.min_size_mode == mode
    assert train.max_size == 1333 and train.flip_prob == 0.5
    assert cfg.data.test_transforms.min_size == 800 and cfg.data.test_transforms.max_size == 1333
    assert list(cfg.module.evaluator.iou_types) == ["bbox", "segm"]


# a value unlike the default for every model setting
CHANGED = {
    "class_channels": 8, "box_channels": 12, "prior_prob": 0.02, "focal_alpha": 0.25, "focal_gamma": 2.0,
    "focal_shift": 1.0, "box_weights": [1.0, 1.0, 1.0, 1.0], "mask_loss_weight": 1.0, "mask_pos_weight": 1.0,
    "scale_thresh": 1.5, "min_size": 32.0, "spatial_thresh": 2.0, "score_threshold": 0.1, "topk_candidates": 100,
    "nms_threshold": 0.6, "max_detections": 10, "mask_threshold": 0.4, "size_divisibility": 64,
    "pixel_mean": [1.0, 2.0, 3.0], "pixel_std": [4.0, 5.0, 6.0], "input_format": "RGB",
}


def test_the_model_keeps_every_setting_it_is_given(tmp_path):
    """Every key of conf/model/tensormask.yaml reaches the model (the loss and decoding tests in
    tests/modeling/test_*_worked.py check that the model then uses it)."""
    cfg = compose_config("train", ["model=tensormask", "model/backbone=r18", "model.backbone.norm=GN",
                                   "model.backbone.out_channels=16", "model.mask_head.channels=8",
                                   "model.num_convs=1", *[f"model.{k}={v}" for k, v in CHANGED.items()]], tmp_path)
    model = build_model(cfg)
    for key, value in CHANGED.items():
        if key in ("class_channels", "box_channels", "prior_prob"):
            continue  # built into the heads, checked below
        # the loss settings live in the criterion, the decoding ones in the decoder, the rest in the model
        owner = next(o for o in (model.criterion, model.decoder, model) if hasattr(o, key))
        got = getattr(owner, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert model.class_head.score.in_channels == 8 and model.box_head.pred.in_channels == 12
    assert model.class_head.score.bias[0].item() == pytest.approx(-torch.log(torch.tensor(0.98 / 0.02)).item())
    configured = set(OmegaConf.to_container(compose_config("train", ["model=tensormask"]).model)) - {"_target_"}
    untested = configured - set(CHANGED) - {"backbone", "mask_head", "num_classes", "window_sizes", "num_convs", "box_head",
                                             "nms_boxes"}
    assert not untested, f"add these model keys to CHANGED: {sorted(untested)}"
