"""tensormask-eval rebuilds a checkpoint's model from the run's saved config, composed by Hydra
with the command line's model.* / data.* overrides (Hydra's grammar, not a hand parser)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tensormask.errors import UserError
from tensormask.evaluate import merge_run_config


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoints" / "config.yaml"
    path.parent.mkdir()
    path.write_text(OmegaConf.to_yaml({
        "mode": "full",
        "model": {"_target_": "M", "score_threshold": 0.05, "head": {"channels": 16}},
        "data": {"num_classes": 3, "max_val_images": None, "test_transforms": {"min_size": 128}},
    }))
    return path


def _eval_cfg():
    return OmegaConf.create({"model": {"_target_": "Other"}, "data": {"num_classes": 80}, "mode": "full",
                             "ckpt_path": "x"})


def test_the_runs_model_and_data_with_overrides_in_hydras_grammar(saved):
    overrides = ["ckpt_path=x", "model.score_threshold=0.3", "model.head.channels=32", "data.max_val_images=2",
                 "data.test_transforms.min_size=[96,128]", "+model.extra='a b'"]
    merged = merge_run_config(_eval_cfg(), saved, overrides)
    assert merged.model._target_ == "M" and merged.model.score_threshold == 0.3 and merged.model.head.channels == 32
    assert merged.data.num_classes == 3 and merged.data.max_val_images == 2
    assert list(merged.data.test_transforms.min_size) == [96, 128] and merged.model.extra == "a b"


def test_another_dataset_keeps_its_own_data(saved):
    cfg = _eval_cfg()
    merged = merge_run_config(cfg, saved, ["data=coco", "data.num_classes=80"])
    assert merged.data.num_classes == 80 and merged.model._target_ == "M"


def test_an_unknown_key_of_the_run_is_an_error_not_a_new_key(saved):
    from hydra.errors import ConfigCompositionException

    from tensormask.framework.entry import user_error_message

    with pytest.raises(ConfigCompositionException) as info:
        merge_run_config(_eval_cfg(), saved, ["model.score_treshold=0.3"])
    assert "did you mean 'model.score_threshold'" in user_error_message(info.value)


def test_the_model_group_cannot_change_at_evaluation(saved):
    with pytest.raises(UserError, match="model/mask_head=aligned: the model of a checkpoint"):
        merge_run_config(_eval_cfg(), saved, ["model/mask_head=aligned"])
