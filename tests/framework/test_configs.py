"""Every config option composes and instantiates; bad values fail with the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from framework_helpers import CONF, TINY_DATA, compose_config, tiny_train_config
from tensormask.framework import ConfigError, DetectionDataModule, validate_config
from tensormask.framework.builders import build_datamodule, build_model, build_module, instantiate_list


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert options("model") == ["fasterrcnn", "maskrcnn", "retinanet", "tensormask", "tensormask_small"]
    assert options("model/mask_head") == ["aligned", "bipyramid", "instancefcn", "natural", "upscale_aligned",
                                          "upscale_natural"]
    assert options("mode") == ["box_only", "full", "mask_only"]
    assert options("data") == ["coco", "synthetic"]
    assert options("schedule") == ["1x", "6x", "quick", "quickstart"]
    assert {"cpu", "gpu", "ddp", "multinode"} <= set(options("trainer"))
    assert {"wandb", "csv", "tensorboard", "many"} <= set(options("logger"))
    assert options("experiment") == ["quickstart", "r101_6x", "r50_1x", "r50_6x", "tables_mini"]
    assert options("debug") == ["fast_dev_run", "overfit"]
    assert {"slurm", "local"} <= set(options("hydra/launcher"))


def test_primary_configs_name_every_group():
    for name, groups in {
        "train": ["data", "model", "mode", "module", "trainer", "schedule", "callbacks", "logger", "paths", "hydra",
                  "experiment", "debug"],
        "eval": ["data", "model", "mode", "module", "trainer", "callbacks", "logger", "paths", "experiment"],
    }.items():
        text = (Path(CONF) / f"{name}.yaml").read_text()
        defaults = OmegaConf.create(text).defaults
        named = {next(iter(d)) if isinstance(d, dict) or OmegaConf.is_dict(d) else d for d in defaults}
        named = {n.replace("optional ", "") for n in named}
        assert set(groups) <= named, (name, set(groups) - named)
    cfg = compose_config("train")
    assert cfg.group is None and list(cfg.tags) == ["quickstart"] and cfg.ckpt_path is None


@pytest.mark.parametrize("head", options("model/mask_head"))
@pytest.mark.parametrize("mode", options("mode"))
def test_tensormask_options_instantiate(tmp_path, head, mode):
    extra = ["model.window_sizes=[15]"] if head.startswith("upscale") or head == "instancefcn" else []
    cfg = compose_config("train", [f"model/mask_head={head}", f"mode={mode}", *extra], tmp_path)
    validate_config(cfg)
    model = build_model(cfg)
    assert (model.mask_head is None) == (mode == "box_only")
    assert (model.box_head is None) == (mode == "mask_only")
    assert model.nms_boxes == ("mask-bb" if mode == "mask_only" else "bb")
    if mode == "box_only":  # no mask head is even built
        assert list(cfg.module.evaluator.iou_types) == ["bbox"]


@pytest.mark.parametrize("mode", ["box_only", "mask_only"])
def test_run_configs_saved_with_a_mode_string_still_build(tmp_path, mode):
    """Runs saved before the mode files set the model's keys carry `model.mode`."""
    cfg = compose_config("train", [], tmp_path)
    with open_dict(cfg):
        cfg.model.mode = mode
    model = build_model(cfg)
    assert (model.mask_head is None) == (mode == "box_only") and (model.box_head is None) == (mode == "mask_only")


@pytest.mark.parametrize("model_name", ["tensormask", "maskrcnn", "fasterrcnn", "retinanet"])
def test_models_instantiate_with_module(tmp_path, model_name):
    cfg = compose_config("train", [f"model={model_name}"], tmp_path)
    validate_config(cfg)
    model = build_model(cfg)
    module = build_module(cfg, model)
    assert isinstance(module, L.LightningModule)
    assert module.lr == pytest.approx(cfg.module.base_lr * cfg.data.global_batch_size / cfg.module.base_batch_size)
    datamodule = build_datamodule(cfg, model)
    assert datamodule.size_divisibility == model.size_divisibility
    assert datamodule.bgr == (getattr(model, "input_format", "RGB") == "BGR")


@pytest.mark.parametrize("optimizer", options("module/optimizer"))
def test_optimizers(tmp_path, optimizer):
    cfg = compose_config("train", [f"module/optimizer={optimizer}", "model.backbone.out_channels=16"], tmp_path)
    module = build_module(cfg, build_model(cfg))
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, cfg.module.weight_decay]  # norm layers take weight_decay_norm


def test_the_main_job_trains_with_fused_adamw(tmp_path):
    """The quickstart's recipe (conf/experiment/quickstart.yaml): AdamW in one kernel per group (0.95x a step)."""
    cfg = compose_config("train", [], tmp_path)
    opt = build_module(cfg, build_model(cfg)).configure_optimizers()["optimizer"]
    assert type(opt).__name__ == "AdamW" and opt.defaults["fused"] is True


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_build(tmp_path, experiment):
    # data=coco takes its classes from the annotation file at the start of a run: 80 for COCO
    synthetic = experiment in ("quickstart", "tables_mini")  # the CPU recipes on the synthetic shapes
    classes = [] if synthetic else ["data.num_classes=80"]
    cfg = compose_config("train", [f"experiment={experiment}", *classes], tmp_path)
    validate_config(cfg)
    if synthetic:
        assert cfg.data.synthetic is not None and cfg.trainer.accelerator == "cpu"
        assert cfg.model.backbone.depth == 18 and cfg.data.num_classes == 3
    else:
        assert cfg.data.num_classes == 80 and cfg.model._target_ == "tensormask.modeling.TensorMask"
        assert cfg.model.mask_head._target_.endswith("BipyramidMaskHead")
        assert cfg.model.backbone.depth == (101 if "r101" in experiment else 50)
        assert cfg.trainer.max_steps == (90000 if "1x" in experiment else 540000)
        assert list(cfg.module.milestones) == ([60000, 80000] if "1x" in experiment else [480000, 520000])
        assert cfg.data.global_batch_size == 16 and cfg.module.base_lr == 0.02
        assert experiment in cfg.tags
        if "6x" in experiment:
            assert list(cfg.data.train_transforms.min_size) == [640, 800]
            assert cfg.data.train_transforms.min_size_mode == "range"
        model = build_model(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params > 30e6
        # the data module is built without touching the (absent) dataset
        assert isinstance(instantiate(cfg.data), DetectionDataModule)


def test_data_coco_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COCO_ROOT", "/some/where/coco")
    cfg = compose_config("train", ["data=coco"], tmp_path)
    assert cfg.data.train_annotations == "/some/where/coco/annotations/instances_train2017.json"
    assert cfg.data.val_images == "/some/where/coco/val2017"


@pytest.mark.parametrize("schedule", options("schedule"))
def test_schedules(tmp_path, schedule):
    cfg = compose_config("train", ["~experiment", f"schedule={schedule}"], tmp_path)
    validate_config(cfg)
    assert cfg.trainer.max_steps > max([0, *cfg.module.milestones])


# ids not equal to "gpu": the root conftest skips items with a `gpu` keyword (composing needs no GPU)
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "multinode"], ids=lambda t: f"trainer={t}")
def test_trainers_compose(tmp_path, trainer):
    cfg = compose_config("train", [f"trainer={trainer}", "data.global_batch_size=16"], tmp_path)
    validate_config(cfg)
    if trainer == "cpu":
        t = instantiate(cfg.trainer)
        assert t.max_steps == cfg.trainer.max_steps
    if trainer in ("ddp", "multinode"):
        assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
        assert cfg.trainer.num_nodes == (2 if trainer == "multinode" else 1)
    # the global batch is split over the processes
    cpu_ddp = compose_config("train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                       "data.global_batch_size=4"], tmp_path)
    t = instantiate(cpu_ddp.trainer)
    assert t.world_size == 2 and type(t.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "many"])
def test_loggers_instantiate(tmp_path, logger, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train", [f"logger={logger}", "group=table1", "tags=[table1,aligned]"], tmp_path)
    loggers = instantiate_list(cfg.logger)
    assert len(loggers) == (3 if logger == "many" else 1)
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            assert lg._wandb_init["group"] == "table1"
            assert lg._wandb_init["tags"] == ["table1", "aligned"]
            assert lg._wandb_init["mode"] == "offline"


def test_callbacks_and_debug_presets(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    names = {type(c).__name__ for c in instantiate_list(cfg.callbacks)}
    assert names == {"StepCheckpoint", "StepProgressBar", "ValidationImages", "EvaluationReport"}
    fast = compose_config("train", ["debug=fast_dev_run"], tmp_path)
    assert fast.trainer.fast_dev_run == 1 and fast.logger is None
    over = compose_config("train", ["debug=overfit"], tmp_path)
    assert over.data.global_batch_size == 1 and over.data.eval_split == "train"


def test_launchers_compose(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for launcher, target in [("slurm", "SlurmLauncher"), ("local", "LocalLauncher"), ("basic", "BasicLauncher")]:
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "trainer=ddp"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(target)
            if launcher == "slurm":
                assert cfg.hydra.launcher.tasks_per_node == 8 and cfg.hydra.launcher.gpus_per_node == 8
    GlobalHydra.instance().clear()


# -- validation ------------------------------------------------------------------------------------
def test_unknown_group_option_names_the_group_and_the_choices():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as info:
        compose_config("train", ["mode=fulll"])
    message = str(info.value)
    assert "mode" in message
    for choice in ("full", "box_only", "mask_only"):
        assert choice in message


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.global_batch_size=0", "data.global_batch_size", ">= 1"),
        ("trainer.max_steps=-5", "trainer.max_steps", ">= 1"),
        ("trainer.max_steps=abc", "trainer.max_steps", "an integer"),
        ("trainer.precision=17", "trainer.precision", "bf16-mixed"),
        ("module.base_lr=-0.1", "module.base_lr", "> 0"),
        ("module.channels_last=nhwc", "module.channels_last", "true or false"),
        ("data.train_transforms.flip_prob=1.5", "data.train_transforms.flip_prob", "[0.0, 1.0]"),
        ("module.evaluator.backend=fast", "module.evaluator.backend", "pycocotools, faster_coco_eval"),
        ("+model.mask_hed=3", "model.mask_hed", "did you mean mask_head"),
        ("seed=-1", "seed", ">= 0"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, override, key, allowed):
    cfg = compose_config("train", [override], tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert key in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true", "32-true", "32", "64-true", "16-true"])
def test_precision_takes_lightnings_names(tmp_path, precision):
    validate_config(compose_config("train", [f"trainer.precision={precision}"], tmp_path))


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("model.backbone.norm=LN", "model.backbone", "FrozenBN"),
        ("model.backbone.depth=42", "model.backbone", "18, 34, 50, 101"),
        ("model.nms_boxes=masks", "model", "bb"),
        ("model/mask_head=upscale_aligned model.mask_head.lambda_val=0.5", "model.mask_head", "lambda_val must be >= 1"),
    ],
)
def test_values_the_constructors_refuse_end_in_a_short_message(tmp_path, override, key, allowed):
    from hydra.errors import InstantiationException

    from tensormask.framework.builders import build_model
    from tensormask.framework.entry import user_error_message

    cfg = compose_config("train", override.split(), tmp_path)
    validate_config(cfg)  # not repeated here: the constructor checks it
    with pytest.raises(InstantiationException) as info:
        build_model(cfg)
    message = user_error_message(info.value)
    assert message.startswith(f"{key}: ") and allowed in message and "\n" not in message


def test_every_range_rule_names_a_parameter_of_its_target():
    from tensormask.framework import validation

    validation.check_rule_names()
    validation.ARG_RULES["tensormask.modeling.TensorMask"]["score_treshold"] = validation._float(0.0, 1.0)
    try:
        with pytest.raises(RuntimeError, match="score_treshold"):
            validation.check_rule_names()
    finally:
        del validation.ARG_RULES["tensormask.modeling.TensorMask"]["score_treshold"]


def test_a_renamed_key_is_an_unknown_key_not_an_unchecked_one(tmp_path):
    cfg = compose_config("train", ["+data.global_batch=0"], tmp_path)
    with pytest.raises(ConfigError, match=r"data.global_batch: .*takes no argument 'global_batch'.*global_batch_size"):
        validate_config(cfg)


def test_batch_must_split_over_processes(tmp_path):
    cfg = compose_config("train", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=3",
                                   "data.global_batch_size=4"], tmp_path)
    with pytest.raises(ConfigError, match="data.global_batch_size=4: must be divisible"):
        validate_config(cfg)


def test_mode_applies_to_tensormask_only(tmp_path):
    cfg = compose_config("train", ["model=maskrcnn", "mode=box_only"], tmp_path)
    with pytest.raises(ConfigError, match="mode=box_only / mode=mask_only apply to TensorMask only"):
        validate_config(cfg)


def test_backbone_weights_are_loaded_where_the_model_is_built(tmp_path):
    """model.backbone.weights (a torchvision-style .pth here) reaches the ResNet trunk through
    build_model; the backbone constructor itself reads no files."""
    from tensormask.modeling import ResNet

    source = ResNet(18, norm="FrozenBN")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    cfg = compose_config("train", ["model.backbone.norm=FrozenBN", "model.backbone.freeze_at=2",
                                   f"model.backbone.weights={path}"], tmp_path)
    model = build_model(cfg)
    got = model.backbone.bottom_up.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(got[name], value), name
    assert not model.backbone.bottom_up.layer1[0].conv1.weight.requires_grad  # frozen after loading
