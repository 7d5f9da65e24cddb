"""Helpers of the framework tests: the real configs composed once, shrunk to tiny runs (64 px images, a few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import tensormask.framework  # noqa: F401  (config resolvers)
from tensormask.framework.entry import config_dir

CONF = config_dir()

# a TensorMask small enough for a few CPU steps in a test
TINY_MODEL = [
    "model.backbone.out_channels=16",
    "model.class_channels=16",
    "model.box_channels=16",
    "model.num_convs=1",
    "model.mask_head.channels=16",
    "model.topk_candidates=200",
]
TINY_DATA = [
    "data.synthetic.num_train=8",
    "data.synthetic.num_val=4",
    "data.synthetic.image_size=64",
    "data.synthetic.max_objects=2",
    "data.train_transforms.min_size=[64]",
    "data.test_transforms.min_size=64",
    "data.global_batch_size=2",
    "data.eval_batch_size=2",
]
TINY_RUN = [
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "module.warmup_steps=1",
    "module.milestones=[]",
    "logger=csv",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.validation_images=null",
    "callbacks.progress_bar=null",
]


def compose_config(config_name: str = "train", overrides: list[str] = (), output_dir: Path | None = None) -> DictConfig:
    """The real config `config_name` with `overrides`; paths.output_dir set to `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def tiny_train_config(output_dir: Path, *extra: str, pictures: bool = False) -> DictConfig:
    """A tiny training run; `pictures` keeps the validation-pictures callback."""
    run = [o for o in TINY_RUN if not (pictures and o.startswith("callbacks.validation_images"))]
    # mode=box_only builds no mask head: nothing to shrink there
    model = [o for o in TINY_MODEL if not ("mode=box_only" in extra and o.startswith("model.mask_head."))]
    return compose_config("train", [*model, *TINY_DATA, *run, *extra], output_dir)


# A tiny model that really detects (the `detecting_run` fixture, tests/framework/conftest.py): the
# tiny TensorMask overfits 3 synthetic 64 px images (at most 2 shapes each) in 80 AdamW steps of 2
# images, and is evaluated on those same images (data.eval_split=train), so eval / predict / DDP eval
# compare real detections. 2 images per step: a batch that 2 processes share (the DDP test). Measured
# (docs/testing.md "A model that detects"): ~15 s, bbox AP 0.6-0.86, segm AP 0.38-0.45 (seeds 0-2).
DETECTING_STEPS = 80
DETECTING_RUN = [
    *TINY_MODEL,
    "data.synthetic.num_train=3",
    "data.synthetic.num_val=1",
    "data.synthetic.image_size=64",
    "data.synthetic.max_objects=2",
    "data.train_transforms.min_size=[64]",
    "data.train_transforms.flip_prob=0.0",
    "data.test_transforms.min_size=64",
    "data.global_batch_size=2",
    "data.eval_batch_size=2",
    "data.eval_split=train",
    f"trainer.max_steps={DETECTING_STEPS}",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=20",
    "module.warmup_steps=5",
    "module.milestones=[]",
    "logger=csv",
    f"callbacks.model_checkpoint.every_n_train_steps={DETECTING_STEPS}",
    "callbacks.validation_images=null",
    "callbacks.progress_bar=null",
]
# what the fixture demands of the run's own evaluation: far above an untrained model's ~0
DETECTING_MIN_AP = {"bbox": 0.4, "segm": 0.2}


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """COCO result records equal up to float rounding (same order: image, then score)."""
    assert len(got) == len(expected) > 0
    key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key)):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"]), (a, b)
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-3), (a, b)
        assert a["segmentation"] == b["segmentation"], (a["image_id"], a["score"])
